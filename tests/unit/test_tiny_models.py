"""Tiny checkpoints (real architectures, built locally), the weight-bucket format, and the transformers
policy's batching / log-prob path, all on real transformers and safetensors (no vLLM here)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sari_ray.engines.weight_buckets import (
    export_weight_buckets,
    hf_to_checkpoint_names,
    layer_group,
    load_bucket,
    tensors_checksum,
)
from sari_ray.models.tiny import OMNI_SPECIALS, QWEN2_AUDIO_SPECIALS, TAGS, build_tiny, register_cli

pytestmark = pytest.mark.unit

ARCHS = ("qwen2-audio", "qwen2.5-omni")


@pytest.fixture(params=ARCHS)
def tiny(request):
    fixture = {"qwen2-audio": "tiny_qwen2_audio", "qwen2.5-omni": "tiny_qwen2_5_omni"}[request.param]
    return request.param, request.getfixturevalue(fixture)


@pytest.fixture(scope="module")
def policies(tiny_qwen2_audio, tiny_qwen2_5_omni):
    from sari_ray.models.policy import load_policy

    return {"qwen2-audio": load_policy(tiny_qwen2_audio), "qwen2.5-omni": load_policy(tiny_qwen2_5_omni)}


def _file_keys(path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


def _tone(freq: float, seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _prompt(processor, text: str = "Is the tone high or low?") -> str:
    messages = [{"role": "user", "content": [{"type": "audio", "audio": "clip.wav"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_published_key_layout(tiny):
    arch, path = tiny
    keys = _file_keys(path)
    assert not any(".model.model." in k or k.startswith("model.") for k in keys), keys[:5]
    if arch == "qwen2-audio":
        roots = ("language_model.model.", "language_model.lm_head.", "audio_tower.", "multi_modal_projector.")
        assert all(k.startswith(roots) for k in keys)
        assert {r for r in roots if any(k.startswith(r) for k in keys)} == set(roots)
    else:
        roots = ("thinker.model.", "thinker.lm_head.", "thinker.audio_tower.", "thinker.visual.")
        assert all(k.startswith(roots) for k in keys)
        assert {r for r in roots if any(k.startswith(r) for k in keys)} == set(roots)


def test_reloads_with_transformers_and_names_map_back(tiny, policies):
    from sari_ray.models.policy import detect_arch

    arch, path = tiny
    assert detect_arch(path) == arch
    model, processor = policies[arch]
    state = model.state_dict()
    from safetensors.torch import load_file

    on_disk = load_file(str(path / "model.safetensors"))
    assert sorted(hf_to_checkpoint_names(k, arch) for k in state) == sorted(on_disk)
    assert all(torch.equal(v, on_disk[hf_to_checkpoint_names(k, arch)]) for k, v in state.items())
    text_config = model.config.get_text_config()
    assert text_config.hidden_size // text_config.num_attention_heads == 64  # vLLM CPU rejects head_dim 16
    assert not text_config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_tokenizer_special_tokens_and_tags(tiny, policies):
    arch, path = tiny
    model, processor = policies[arch]
    tok = processor.tokenizer
    specials = QWEN2_AUDIO_SPECIALS if arch == "qwen2-audio" else OMNI_SPECIALS
    ids = tok.convert_tokens_to_ids(list(specials))
    first = ids[0]
    assert ids == list(range(first, first + len(specials)))  # published order, right after the base vocab
    for word in ("high", " low", " tone", " answer", " pitch", "What", " option"):  # whole words: learnable
        assert len(tok(word).input_ids) == 1 and tok(word).input_ids[0] < first, word
    text = "<think> The tone is high. </think> <answer> high </answer>"
    encoded = tok(text).input_ids
    for tag in TAGS:
        assert len(tok(tag).input_ids) == 1, tag
    assert tok.decode(encoded, skip_special_tokens=True) == text  # tags are text, not special tokens
    assert tok.decode(tok("<|im_end|>").input_ids, skip_special_tokens=True) == ""
    assert len(tok) == model.config.get_text_config().vocab_size


def test_config_token_ids_match_tokenizer(tiny, policies):
    arch, path = tiny
    model, processor = policies[arch]
    tok = processor.tokenizer
    config = model.config
    assert config.audio_token_id == tok.convert_tokens_to_ids("<|AUDIO|>")
    assert config.get_text_config().pad_token_id == tok.pad_token_id
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert generation["pad_token_id"] == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    if arch == "qwen2.5-omni":
        pairs = {
            "image_token_id": "<|IMAGE|>", "video_token_id": "<|VIDEO|>", "audio_start_token_id": "<|audio_bos|>",
            "audio_end_token_id": "<|audio_eos|>", "vision_start_token_id": "<|vision_bos|>",
            "vision_end_token_id": "<|vision_eos|>",
        }  # fmt: skip
        for attr, token in pairs.items():
            assert getattr(config, attr) == tok.convert_tokens_to_ids(token), attr
        assert config.user_token_id == tok.convert_tokens_to_ids("user")
        assert tok.audio_token == "<|AUDIO|>" and tok.vision_bos_token == "<|vision_bos|>"


def test_chat_template_renders_audio_like_the_published_one(tiny, policies):
    arch, _ = tiny
    _, processor = policies[arch]
    rendered = _prompt(processor)
    audio = "<|audio_bos|><|AUDIO|><|audio_eos|>"
    expected_audio = f"Audio 1: {audio}\n" if arch == "qwen2-audio" else audio
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"{expected_audio}Is the tone high or low?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_deterministic_for_a_seed(arch, tmp_path, request):
    fixture = {"qwen2-audio": "tiny_qwen2_audio", "qwen2.5-omni": "tiny_qwen2_5_omni"}[arch]
    reference = request.getfixturevalue(fixture)  # built with seed 0
    from safetensors.torch import load_file

    def checksum(path):
        return tensors_checksum(load_file(str(path / "model.safetensors")).values())

    again = build_tiny(arch, tmp_path / "again", seed=0)
    other = build_tiny(arch, tmp_path / "other", seed=1)
    assert (again / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_text() == (reference / "tokenizer.json").read_text()
    assert checksum(again) == checksum(reference) != checksum(other)


def test_cli_registers_model_tiny(tmp_path):
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["model", "tiny", "--arch", "qwen2-audio", "--out", str(tmp_path / "m"), "--seed", "3"])
    assert args.func(args) == 0
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "chat_template.jinja").exists()


def test_importing_the_package_does_not_import_vllm():
    code = (
        "import sys, sari_ray.engines.vllm_engine, sari_ray.engines.vllm_worker_ext, sari_ray.models.policy, "
        "sari_ray.models.tiny; bad = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_weight_buckets_round_trip_and_size(tiny, policies):
    arch, _ = tiny
    model, _ = policies[arch]
    state = model.state_dict()
    bucket_bytes = 100_000
    buckets = export_weight_buckets(state, bucket_bytes)
    loaded = [load_bucket(b) for b in buckets]
    merged = {k: v for bucket in loaded for k, v in bucket.items()}
    assert sorted(merged) == sorted(hf_to_checkpoint_names(k, arch) for k in state)
    assert all(torch.equal(merged[hf_to_checkpoint_names(k, arch)], v) for k, v in state.items())
    assert len(buckets) > 3
    for bucket in loaded:
        payload = sum(t.numel() * t.element_size() for t in bucket.values())
        assert payload <= bucket_bytes or len({layer_group(k) for k in bucket}) == 1
    owner = {}
    for i, bucket in enumerate(loaded):  # a layer (vLLM fuses q/k/v, gate/up) never straddles two buckets
        for key in bucket:
            assert owner.setdefault(layer_group(key), i) == i, key
    skipped = export_weight_buckets(state, 10**9, skip_prefixes=("thinker.visual.",), dtype=torch.bfloat16)
    assert len(skipped) == 1
    only = load_bucket(skipped[0])
    assert not any(k.startswith("thinker.visual.") for k in only)
    assert all(t.dtype == torch.bfloat16 for t in only.values())


def test_hf_to_checkpoint_names_rules():
    assert hf_to_checkpoint_names("model.language_model.layers.0.mlp.up_proj.weight", "qwen2-audio") == (
        "language_model.model.layers.0.mlp.up_proj.weight"
    )
    assert hf_to_checkpoint_names("lm_head.weight", "qwen2-audio") == "language_model.lm_head.weight"
    assert hf_to_checkpoint_names("model.audio_tower.conv1.weight", "qwen2-audio") == "audio_tower.conv1.weight"
    assert hf_to_checkpoint_names("audio_tower.conv1.weight", "qwen2-audio") == "audio_tower.conv1.weight"
    assert hf_to_checkpoint_names("model.norm.weight", "qwen2.5-omni") == "thinker.model.norm.weight"
    assert hf_to_checkpoint_names("thinker.lm_head.weight", "qwen2.5-omni") == "thinker.lm_head.weight"
    with pytest.raises(ValueError, match="no published"):
        hf_to_checkpoint_names("talker.model.norm.weight", "qwen2.5-omni")
    with pytest.raises(ValueError, match="unknown arch"):
        hf_to_checkpoint_names("lm_head.weight", "llama")
    assert layer_group("thinker.model.layers.12.self_attn.q_proj.weight") == "thinker.model.layers.12"
    assert layer_group("audio_tower.conv1.weight") == "audio_tower.conv1"


def test_batched_logprobs_equal_the_plain_forward(tiny, policies):
    """Left-padded rows, per-pair audio encoding and the sliced LM head give exactly the model's own
    forward on each unpadded (prompt + completion, clip)."""
    from sari_ray.models.policy import build_batch, completion_logprobs

    arch, _ = tiny
    model, processor = policies[arch]
    tok = processor.tokenizer
    long_prompt, short_prompt = _prompt(processor), _prompt(processor, "Which?")
    high, low = _tone(880, 1.5), _tone(220, 0.7)
    c1 = tok("<think> The tone is high. </think> <answer> high </answer>").input_ids
    c2 = tok("<answer> low </answer>").input_ids
    c3 = c2 + [tok.convert_tokens_to_ids("<|AUDIO|>")]  # a random policy can sample <|AUDIO|>: plain text then
    rows = [(long_prompt, high, c1), (long_prompt, high, c2), (short_prompt, low, c3)]
    batch = build_batch(processor, *map(list, zip(*rows)), pad_to=40)
    assert batch["input_features"].shape[0] == 2 and batch["audio_index"].tolist() == [0, 0, 1]
    assert batch["completion_ids"].shape == batch["completion_mask"].shape == (3, 40)
    with torch.no_grad():
        logprobs, entropy = completion_logprobs(model, batch, temperature=0.7, with_entropy=True)
    assert logprobs.shape == entropy.shape == (3, 40)
    assert logprobs[2, len(c2)] < 0  # the trailing <|AUDIO|> is scored as a token
    for i, (prompt, audio, completion) in enumerate(rows):
        completion = completion[: len(c2)] if i == 2 else completion  # the plain forward cannot take it
        enc = processor(text=[prompt], audio=[audio], sampling_rate=16000, return_tensors="pt")
        ids = torch.cat([enc["input_ids"], torch.tensor([completion])], 1)
        with torch.no_grad():
            logits = model(
                input_ids=ids, attention_mask=torch.ones_like(ids), input_features=enc["input_features"],
                feature_attention_mask=enc["feature_attention_mask"],
            ).logits  # fmt: skip
        n_prompt = enc["input_ids"].shape[1]
        logp = torch.log_softmax(logits[0, n_prompt - 1 : n_prompt - 1 + len(completion)].float() / 0.7, -1)
        ref = logp.gather(-1, torch.tensor(completion)[:, None])[:, 0]
        torch.testing.assert_close(logprobs[i, : len(completion)], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy[i, : len(completion)], -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=0)
        assert not logprobs[i, len(rows[i][2]) :].any() and not entropy[i, len(rows[i][2]) :].any()


def test_build_batch_refuses_to_drop_audio(policies):
    from sari_ray.models.policy import build_batch

    _, processor = policies["qwen2-audio"]

    class WrongKeyword:  # what a processor does with a misspelt audio keyword: text only
        tokenizer = processor.tokenizer

        def __call__(self, text, audio, sampling_rate):
            return processor(text=text, audios=audio, sampling_rate=sampling_rate)

    with pytest.raises(RuntimeError, match="audio was not processed"):
        build_batch(WrongKeyword(), [_prompt(processor)], [_tone(440, 1.0)], [[1, 2]])
