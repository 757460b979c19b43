"""The transformers side of the policy: load, batch (prompt + audio + completion), and score completions.

Used by the DeepSpeed learners and by the vLLM parity test; no Ray, no DeepSpeed here.

Batch layout (one row per completion): `[left pad | prompt | completion | right pad]`, every prompt ending
at the same column P, so the logits that predict the completion are one contiguous slice `[P-1, P-1+Tc)`
and the LM head runs on that slice only (with a 152k vocab the full-sequence logits would dominate memory).

Each distinct (prompt, clip) pair is feature-extracted and audio-encoded once, then its embeddings are
scattered into all rows that share it (the G completions of a GRPO group): Qwen2-Audio pads every clip to
30 s (1500 encoder positions per clip), so the encoder is most of the cost on small models.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

SAMPLING_RATE = 16000
_MODEL_TYPES = {"qwen2_audio": "qwen2-audio", "qwen2_5_omni": "qwen2.5-omni", "qwen2_5_omni_thinker": "qwen2.5-omni"}


def detect_arch(path: str | Path) -> str:
    """`qwen2-audio` or `qwen2.5-omni`, from the checkpoint's config.json `model_type`."""
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; known: {sorted(_MODEL_TYPES)}")
    return _MODEL_TYPES[model_type]


def load_policy(path: str | Path, arch: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """(model, processor) for `path`. Omni loads only the thinker (text out) from the full checkpoint: its
    `base_model_prefix = "thinker"` strips the published `thinker.` prefix. The model is in eval mode."""
    import torch
    from transformers import AutoProcessor

    arch = arch or detect_arch(path)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if arch == "qwen2-audio":
        from transformers import Qwen2AudioForConditionalGeneration as cls
    elif arch == "qwen2.5-omni":
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration as cls
    else:
        raise ValueError(f"unknown arch {arch!r}; valid: ['qwen2-audio', 'qwen2.5-omni']")
    model = cls.from_pretrained(str(path), dtype=torch_dtype).to(device).eval()
    return model, AutoProcessor.from_pretrained(str(path))


def _digest(prompt: str, audio: "np.ndarray") -> tuple[str, str]:
    import numpy as np

    a = np.ascontiguousarray(audio, dtype=np.float32)
    return prompt, hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest() + str(a.shape)


def build_batch(
    processor,
    prompts: list[str],
    audios: list["np.ndarray"],
    completions: list[list[int]],
    pad_to: int | None = None,
) -> dict[str, Any]:
    """Tensors for `completion_logprobs`; one row per completion, `prompts[i]` already chat-rendered with
    one `<|audio_bos|><|AUDIO|><|audio_eos|>` and `audios[i]` a mono float array at 16 kHz.

    Returns input_ids / attention_mask (B, P+Tc), completion_ids / completion_mask (B, Tc), logits_slice
    (P-1, P-1+Tc), and the audio of the U distinct (prompt, clip) pairs: input_features (U, mels, frames),
    feature_attention_mask (U, frames), audio_index (B,) row -> pair. `pad_to` is a minimum for Tc.
    """
    import numpy as np
    import torch

    if not (len(prompts) == len(audios) == len(completions)):
        raise ValueError(
            f"lengths differ: {len(prompts)} prompts, {len(audios)} audios, {len(completions)} completions"
        )
    keys = [_digest(p, a) for p, a in zip(prompts, audios)]
    pair_of: dict[tuple[str, str], int] = {}
    uniq_rows: list[int] = []
    for i, key in enumerate(keys):
        if key not in pair_of:
            pair_of[key] = len(uniq_rows)
            uniq_rows.append(i)
    audio_index = torch.tensor([pair_of[k] for k in keys], dtype=torch.long)

    enc = processor(
        text=[prompts[i] for i in uniq_rows],
        audio=[np.asarray(audios[i], dtype=np.float32) for i in uniq_rows],  # transformers 5.x: `audio=`
        sampling_rate=SAMPLING_RATE,
    )
    missing = {"input_features", "feature_attention_mask"} - set(enc)
    if missing:  # a misspelt audio keyword is dropped with only a warning: refuse to score without audio
        raise RuntimeError(f"processor output lacks {sorted(missing)}: the audio was not processed")

    pad_id = processor.tokenizer.pad_token_id
    prompt_ids = [enc["input_ids"][audio_index[i]] for i in range(len(prompts))]
    P = max(len(p) for p in prompt_ids)
    Tc = max([len(c) for c in completions] + [pad_to or 0, 1])
    B = len(prompts)
    input_ids = torch.full((B, P + Tc), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + Tc), dtype=torch.long)
    completion_ids = torch.full((B, Tc), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((B, Tc), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        input_ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, P - len(p) : P + len(c)] = 1
        if c:
            input_ids[i, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
            completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            completion_mask[i, : len(c)] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "logits_slice": (P - 1, P - 1 + Tc),
        "input_features": torch.as_tensor(np.asarray(enc["input_features"]), dtype=torch.float32),
        "feature_attention_mask": torch.as_tensor(np.asarray(enc["feature_attention_mask"]), dtype=torch.long),
        "audio_index": audio_index,
    }


def _arch_of(model) -> str:
    return _MODEL_TYPES[model.config.model_type]


def _encode_audio(model, features: "torch.Tensor", feature_mask: "torch.Tensor") -> list["torch.Tensor"]:
    """Audio embeddings per clip, each (n_tokens, hidden), exactly as the model's own forward computes them."""
    import torch

    if _arch_of(model) == "qwen2.5-omni":
        tower = model.audio_tower
        _, out_lens = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
        flat = model.get_audio_features(features.to(tower.dtype), feature_mask, return_dict=True).last_hidden_state
        return list(torch.split(flat, out_lens.tolist()))

    # Qwen2-Audio (transformers 5.19 Qwen2AudioModel.forward has no get_audio_features; same steps as there)
    from transformers.masking_utils import create_bidirectional_mask

    inner = model.model
    tower = inner.audio_tower
    feat_lens, out_lens = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
    n, _, max_mel = features.shape
    max_len = (max_mel - 2) // 2 + 1
    mask_2d = (torch.arange(max_len, device=features.device)[None, :] < feat_lens[:, None]).long()
    dummy = torch.zeros((n, max_len, 1), dtype=tower.dtype, device=features.device)
    attn = create_bidirectional_mask(config=tower.config, inputs_embeds=dummy, attention_mask=mask_2d)
    hidden = tower(features.to(tower.dtype), attention_mask=attn).last_hidden_state
    projected = inner.multi_modal_projector(hidden)
    return [projected[j, : int(out_lens[j])] for j in range(n)]


@contextmanager
def _lm_head_on(model, start: int, stop: int):
    """Run the LM head on positions [start, stop) only (a pre-hook slices its input)."""
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0][:, start:stop],) + tuple(args[1:]))
    try:
        yield
    finally:
        handle.remove()


def completion_logprobs(
    model, batch: dict[str, Any], temperature: float = 1.0, with_entropy: bool = False
) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """Per-token log-probs (B, Tc) of the completion tokens under softmax(logits / temperature) in fp32,
    zero at padding; plus the entropy (B, Tc) of that distribution when `with_entropy`.

    This is what vLLM reports with `logprobs_mode="processed_logprobs"` and top_p=1, top_k off
    (see `VLLMEngine`), so it is the denominator-compatible quantity for the GRPO ratio.
    """
    import torch

    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    clips = _encode_audio(model, batch["input_features"].to(device), batch["feature_attention_mask"].to(device))
    audio = torch.cat([clips[j] for j in batch["audio_index"].tolist()])
    embeds = model.get_input_embeddings()(input_ids)
    start, stop = batch["logits_slice"]
    audio_mask = input_ids == model.config.audio_token_id
    audio_mask[:, start + 1 :] = False  # a sampled <|AUDIO|> in a completion is plain text to the engine
    if int(audio_mask.sum()) != audio.shape[0]:
        raise RuntimeError(f"{int(audio_mask.sum())} audio tokens in the prompts but {audio.shape[0]} audio embeddings")
    embeds = embeds.masked_scatter(audio_mask.unsqueeze(-1), audio.to(embeds.dtype))

    with _lm_head_on(model, start, stop):
        if _arch_of(model) == "qwen2-audio":  # Qwen2's forward takes positions as given; left padding needs them
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            out = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        else:  # the thinker derives its (M-RoPE) positions from input_ids and the attention mask
            out = model(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
    logits = out.logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    targets = batch["completion_ids"].to(device)
    mask = batch["completion_mask"].to(device)
    logprobs = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1) * mask
    return logprobs, entropy
