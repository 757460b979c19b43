"""Audio encoded once per pass and shared across micro-batches (`policy.SharedAudio`) gives the gradient of
encoding per micro-batch (the learner's earlier path), in fp32 within 1e-6, for both architectures, with a
trainable and a frozen tower, when a clip's rows span micro-batches; and the tower runs once per clip.
Real transformers on the tiny checkpoints; no DeepSpeed (tests/integration/test_learner_gradients.py runs
the learner itself)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sari_ray.models import policy

pytestmark = pytest.mark.unit

CLIP_OF_ROW = [0, 0, 1, 0, 2, 1, 0]  # micro-batches of 2: clips 0 and 1 span several
LENGTHS = [3, 5, 2, 6, 4, 1, 5]
MICRO = 2


def _tone(freq: float, seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _setup(path, frozen_tower):
    model, processor = policy.load_policy(path)
    if frozen_tower:
        policy.audio_tower(model).requires_grad_(False)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}, {"type": "text", "text": "High?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    clips = [_tone(880, 1.5), _tone(220, 0.7), _tone(440, 2.0)]
    completions = [[20 + (i * 7 + t) % 40 for t in range(n)] for i, n in enumerate(LENGTHS)]
    advantages = torch.tensor([(-1.0) ** i * (1 + i / 7) for i in range(len(LENGTHS))])
    calls = []
    policy.audio_tower(model).register_forward_hook(
        lambda _m, args, kwargs, _out: calls.append(policy.clips_in_tower_call(args, kwargs)), with_kwargs=True)
    return model, processor, prompt, clips, completions, advantages, calls


def _loss(model, batch, index, advantages):
    logprobs, _ = policy.completion_logprobs(model, batch, temperature=0.9)
    return -(advantages[index][:, None] * logprobs * batch["completion_mask"]).sum() / sum(LENGTHS)


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("frozen_tower", [False, True], ids=["trained-tower", "frozen-tower"])
@pytest.mark.parametrize("arch", ["qwen2-audio", "qwen2.5-omni"])
def test_shared_audio_gradient_equals_per_micro_batch_encoding(arch, frozen_tower, request):
    path = request.getfixturevalue({"qwen2-audio": "tiny_qwen2_audio", "qwen2.5-omni": "tiny_qwen2_5_omni"}[arch])
    model, processor, prompt, clips, completions, advantages, calls = _setup(path, frozen_tower)
    chunks = [list(range(i, min(i + MICRO, len(LENGTHS)))) for i in range(0, len(LENGTHS), MICRO)]

    for index in chunks:  # the earlier path: every micro-batch encodes its own clips
        batch = policy.build_batch(processor, [prompt] * len(index), [clips[CLIP_OF_ROW[j]] for j in index],
                                   [completions[j] for j in index])
        _loss(model, batch, index, advantages).backward()
    per_micro_batch, old_calls = _grads(model), sum(calls)

    calls.clear()
    encoded = [policy.encode_prompt_audio(processor, prompt, clips[c]) for c in CLIP_OF_ROW]
    first = [CLIP_OF_ROW.index(c) for c in range(len(clips))]
    features = torch.stack([encoded[i]["input_features"] for i in first])
    mask = torch.stack([encoded[i]["feature_attention_mask"] for i in first])
    states = None
    if frozen_tower:  # the learner computes a frozen tower's outputs once per step, without grad
        with torch.no_grad():
            states = policy.tower_states_in_chunks(model, features, mask, chunk=MICRO)
    audio = policy.SharedAudio(model, features, mask, chunk=MICRO, tower_states=states)
    for k, index in enumerate(chunks):
        last = k == len(chunks) - 1
        batch = policy.assemble_batch([encoded[j] for j in index], [CLIP_OF_ROW[j] for j in index],
                                      [completions[j] for j in index], processor.tokenizer.pad_token_id)
        batch["audio_embeds"] = audio.embeds(batch["clip_ids"], last)
        loss = _loss(model, batch, index, advantages)
        (loss + audio.backward_term() if last else loss).backward()
    shared = _grads(model)

    assert old_calls == 6 and sum(calls) == len(clips)  # micro-batches encoded 1+2+2+1 clips; now once each
    assert shared.keys() == per_micro_batch.keys()
    tower = [n for n in shared if "audio_tower" in n]
    assert (not tower) if frozen_tower else len(tower) > 5
    for name in tower or [n for n in shared if "projector" in n or "embed_tokens" in n]:
        assert float(shared[name].abs().max()) > 1e-7, f"{name}: no gradient to compare"
    diff = max(float((shared[n] - per_micro_batch[n]).abs().max()) for n in shared)
    assert diff <= 1e-6, f"shared-audio gradient differs from per-micro-batch encoding by {diff}"


def test_prompt_audio_cache_extracts_once_per_clip_and_prompt_and_stays_bounded(tiny_qwen2_audio, tmp_path):
    import os

    from transformers import AutoProcessor

    from sari_ray.data.audio import AudioDecodeError, file_identity, load_audio, write_wav

    processor = AutoProcessor.from_pretrained(str(tiny_qwen2_audio))
    paths = [write_wav(tmp_path / f"{i}.wav", _tone(300 + 200 * i, 1.0)) for i in range(3)]
    loads = []

    def loader(path):
        return lambda: loads.append(path) or load_audio(path).samples

    P, Q = (f"<|audio_bos|><|AUDIO|><|audio_eos|>{text}" for text in ("High?", "Low?"))
    entry_bytes = 128 * 3000 * 4 + 3000 * 8  # fp32 features + int64 mask of one 30 s window
    cache = policy.PromptAudioCache(processor, max_bytes=2 * entry_bytes)
    first = cache.get(P, file_identity(paths[0]), loader(paths[0]))
    assert cache.get(P, file_identity(paths[0]), loader(paths[0])) is first and loads == [paths[0]]
    want = policy.encode_prompt_audio(processor, P, load_audio(paths[0]).samples)
    assert first["input_ids"] == want["input_ids"] and torch.equal(first["input_features"], want["input_features"])
    cache.get(Q, file_identity(paths[0]), loader(paths[0]))  # another prompt: its own token ids
    cache.get(P, file_identity(paths[1]), loader(paths[1]))  # over the bound: (P, clip 0) goes, least recent
    cache.get(Q, file_identity(paths[0]), loader(paths[0]))
    cache.get(P, file_identity(paths[0]), loader(paths[0]))
    assert loads == [paths[0], paths[0], paths[1], paths[0]] and (cache.hits, cache.misses) == (2, 4)

    before = file_identity(paths[2])
    write_wav(paths[2], _tone(1000, 1.5))  # rewritten in place: size changes, so does the key
    os.utime(paths[2], ns=(before[2] + 10**9, before[2] + 10**9))
    assert file_identity(paths[2]) != before
    with pytest.raises(AudioDecodeError, match="missing.wav"):
        file_identity(tmp_path / "missing.wav")


@pytest.mark.parametrize("seconds", [[0.3, 1.5, 0.05], [2.0, 30.0, 29.99]], ids=["short", "full-window"])
def test_tower_on_filled_frames_gives_the_full_window_outputs(tiny_qwen2_audio, seconds):
    """Qwen2-Audio's encoder runs on the frames the batch's clips fill (`audio_tower_states`), not the whole 30 s
    window, and every clip's outputs are those of transformers' own encoder on the full padded window."""
    from transformers.masking_utils import create_bidirectional_mask

    model, processor = policy.load_policy(tiny_qwen2_audio)
    tower = policy.audio_tower(model)
    encoded = [policy.encode_prompt_audio(processor, "<|audio_bos|><|AUDIO|><|audio_eos|>Hi?", _tone(300 + 97 * i, s))
               for i, s in enumerate(seconds)]
    features = torch.stack([e["input_features"] for e in encoded])
    mask = torch.stack([e["feature_attention_mask"] for e in encoded])
    assert features.shape[-1] == 3000  # the processor pads to the window
    feat_lens, out_lens = tower._get_feat_extract_output_lengths(mask.sum(-1))
    mask_2d = (torch.arange(1500)[None, :] < feat_lens[:, None]).long()
    attn = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(len(seconds), 1500, 1),
                                     attention_mask=mask_2d)
    with torch.no_grad():
        full = type(tower).forward(tower, features, attention_mask=attn).last_hidden_state  # transformers' own
        frames_in = []
        tower.register_forward_hook(lambda _m, args, kwargs, _o: frames_in.append(args[0].shape[-1]), with_kwargs=True)
        states = policy.audio_tower_states(model, features, mask)

    assert frames_in == [min(3000, int(mask.sum(-1).max()) + 2)]  # 0.3-1.5 s: 152 frames, not 3000
    for j, state in enumerate(states):
        assert state.shape[0] == int(out_lens[j]) > 0
        torch.testing.assert_close(state, full[j, : int(out_lens[j])], rtol=1e-5, atol=1e-5)
