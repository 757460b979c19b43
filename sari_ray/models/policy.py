"""The transformers side of the policy: load, batch (prompt + audio + completion), and score completions.

Used by the DeepSpeed learners and by the vLLM parity test; no Ray, no DeepSpeed here.

Batch layout (one row per completion): `[left pad | prompt | completion | right pad]`, every prompt ending
at the same column P, so the logits that predict the completion are one contiguous slice `[P-1, P-1+Tc)`
and the LM head runs on that slice only (with a 152k vocab the full-sequence logits would dominate memory).

Each distinct (prompt, clip) pair is feature-extracted once (`PromptAudioCache` keeps it across passes and
steps) and each distinct clip audio-encoded once per pass, its embeddings scattered into all rows that share
it (the G completions of a GRPO group), across micro-batches too (`SharedAudio`): Qwen2-Audio pads every
clip to 30 s (1500 encoder positions per clip), so the encoder is most of the cost on small models.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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


def _digest(audio: "np.ndarray") -> str:
    """A clip's identity from its samples (for callers that hold arrays, not files)."""
    import numpy as np

    a = np.ascontiguousarray(audio, dtype=np.float32)
    return hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest() + str(a.shape)


def encode_prompt_audio(processor, prompt: str, audio: "np.ndarray") -> dict[str, Any]:
    """The processor's output for one (prompt, clip): input_ids (list of ints, the `<|AUDIO|>` expanded),
    input_features (mels, frames) fp32, feature_attention_mask (frames,). Both processors pad every clip to
    the 30 s window and do not pad text, so one pair at a time gives what a batched call gives."""
    import numpy as np
    import torch

    enc = processor(text=[prompt], audio=[np.asarray(audio, dtype=np.float32)],  # transformers 5.x: `audio=`
                    sampling_rate=SAMPLING_RATE)
    missing = {"input_features", "feature_attention_mask"} - set(enc)
    if missing:  # a misspelt audio keyword is dropped with only a warning: refuse to score without audio
        raise RuntimeError(f"processor output lacks {sorted(missing)}: the audio was not processed")
    return {
        "input_ids": [int(t) for t in enc["input_ids"][0]],
        "input_features": torch.as_tensor(np.asarray(enc["input_features"]), dtype=torch.float32)[0],
        "feature_attention_mask": torch.as_tensor(np.asarray(enc["feature_attention_mask"]), dtype=torch.long)[0],
    }


class PromptAudioCache:
    """Bounded LRU of `encode_prompt_audio` outputs keyed by (prompt, clip key), so a clip is decoded and
    feature-extracted once however many passes and steps read it. The caller's clip key must change when
    the clip does (the learner uses path, size, mtime: `audio.file_identity`). ~1.5 MB per entry (128 mels x
    3000 frames in fp32); the least recently used entries go once `max_bytes` is exceeded."""

    def __init__(self, processor, max_bytes: int = 512 * 2**20):
        from collections import OrderedDict

        self.processor, self.max_bytes = processor, max_bytes
        self._entries: OrderedDict = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def get(self, prompt: str, clip_key, load_audio: Callable[[], "np.ndarray"]) -> dict[str, Any]:
        key = (prompt, clip_key)
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        entry = encode_prompt_audio(self.processor, prompt, load_audio())
        self._entries[key] = entry
        self._bytes += _entry_bytes(entry)
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self._bytes -= _entry_bytes(old)
        return entry


def _entry_bytes(entry: dict[str, Any]) -> int:
    return sum(entry[k].numel() * entry[k].element_size() for k in ("input_features", "feature_attention_mask"))


def build_batch(
    processor,
    prompts: list[str],
    audios: list["np.ndarray"],
    completions: list[list[int]],
    pad_to: int | None = None,
) -> dict[str, Any]:
    """Tensors for `completion_logprobs`; one row per completion, `prompts[i]` already chat-rendered with
    one `<|audio_bos|><|AUDIO|><|audio_eos|>` and `audios[i]` a mono float array at 16 kHz. Each distinct
    (prompt, clip) pair goes through the processor once. See `assemble_batch` for what it returns."""
    if not (len(prompts) == len(audios) == len(completions)):
        raise ValueError(
            f"lengths differ: {len(prompts)} prompts, {len(audios)} audios, {len(completions)} completions"
        )
    clip_ids = [_digest(a) for a in audios]
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for prompt, audio, clip in zip(prompts, audios, clip_ids):
        if (prompt, clip) not in pairs:
            pairs[prompt, clip] = encode_prompt_audio(processor, prompt, audio)
    encoded = [pairs[p, c] for p, c in zip(prompts, clip_ids)]
    return assemble_batch(encoded, clip_ids, completions, processor.tokenizer.pad_token_id, pad_to)


def assemble_batch(
    encoded: list[dict[str, Any]],
    clip_ids: list,
    completions: list[list[int]],
    pad_id: int,
    pad_to: int | None = None,
) -> dict[str, Any]:
    """Rows from per-row `encode_prompt_audio` outputs; `clip_ids[i]` names row i's clip (rows with equal ids
    share the clip's features and audio embeddings).

    Returns input_ids / attention_mask (B, P+Tc), completion_ids / completion_mask (B, Tc), logits_slice
    (P-1, P-1+Tc), and the audio of the U distinct clips: clip_ids (U, in first-row order), input_features
    (U, mels, frames), feature_attention_mask (U, frames), audio_index (B,) row -> clip. `pad_to` is a
    minimum for Tc.
    """
    import torch

    first_row: dict[Any, int] = {}
    for i, clip in enumerate(clip_ids):
        first_row.setdefault(clip, i)
    distinct = list(first_row)
    number = {clip: j for j, clip in enumerate(distinct)}
    prompt_ids = [e["input_ids"] for e in encoded]
    P = max(len(p) for p in prompt_ids)
    Tc = max([len(c) for c in completions] + [pad_to or 0, 1])
    B = len(encoded)
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
        "clip_ids": distinct,
        "input_features": torch.stack([encoded[first_row[c]]["input_features"] for c in distinct]),
        "feature_attention_mask": torch.stack([encoded[first_row[c]]["feature_attention_mask"] for c in distinct]),
        "audio_index": torch.tensor([number[c] for c in clip_ids], dtype=torch.long),
    }


def _arch_of(model) -> str:
    return _MODEL_TYPES[model.config.model_type]


def audio_tower(model) -> "torch.nn.Module":
    """The Whisper-style audio encoder module (what `learner.train_audio_encoder` freezes)."""
    return model.audio_tower if _arch_of(model) == "qwen2.5-omni" else model.model.audio_tower


def clips_in_tower_call(args: tuple, kwargs: dict) -> int:
    """How many clips one call of `audio_tower(model)` encodes, from a forward hook's (args, kwargs):
    Qwen2-Audio's tower takes (clips, mels, frames); Omni's takes the clips' frames concatenated, with
    `feature_lens` (one per clip)."""
    if "feature_lens" in kwargs:
        return len(kwargs["feature_lens"])
    features = args[0] if args else kwargs["input_features"]
    return int(features.shape[0])


def audio_tower_states(model, features: "torch.Tensor", feature_mask: "torch.Tensor") -> list["torch.Tensor"]:
    """The audio tower's output per clip, each (n_tokens, d): everything `learner.train_audio_encoder` covers
    (Omni's tower ends in its own projection; Qwen2-Audio's projector comes after, see `project_audio`)."""
    import torch

    if _arch_of(model) == "qwen2.5-omni":
        tower = model.audio_tower
        _, out_lens = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
        flat = model.get_audio_features(features.to(tower.dtype), feature_mask, return_dict=True).last_hidden_state
        return list(torch.split(flat, out_lens.tolist()))

    # Qwen2-Audio (transformers 5.19 Qwen2AudioModel.forward has no get_audio_features; same steps as there)
    from transformers.masking_utils import create_bidirectional_mask

    tower = model.model.audio_tower
    encode_filled_frames_only(tower)
    feat_lens, out_lens = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
    features = filled_frames(features, feature_mask)
    n, _, max_mel = features.shape
    max_len = (max_mel - 2) // 2 + 1
    mask_2d = (torch.arange(max_len, device=features.device)[None, :] < feat_lens[:, None]).long()
    dummy = torch.zeros((n, max_len, 1), dtype=tower.dtype, device=features.device)
    attn = create_bidirectional_mask(config=tower.config, inputs_embeds=dummy, attention_mask=mask_2d)
    hidden = tower(features.to(tower.dtype), attention_mask=attn).last_hidden_state
    return [hidden[j, : int(out_lens[j])] for j in range(n)]


def filled_frames(features: "torch.Tensor", feature_mask: "torch.Tensor") -> "torch.Tensor":
    """Qwen2-Audio features (clips, mels, 3000) cut after the last mel frame any clip's outputs depend on.

    A valid encoder position i reads frames 2i-2..2i+2 (two 3-wide convolutions, the second of stride 2), and
    attention never reads padded positions (masked), so the frames past a batch's longest clip + 2 change
    nothing. Needs `encode_filled_frames_only` on the tower."""
    needed = int(feature_mask.sum(-1).max()) + 2
    return features[..., : min(features.shape[-1], needed + needed % 2)]


def encode_filled_frames_only(tower) -> None:
    """Let Qwen2-Audio's encoder take fewer mel frames than its 30 s window (idempotent).

    Why: the processor pads every clip to 30 s, and transformers' encoder refuses any other length, so a 1 s
    clip paid for 1500 positions, ~97% of them padding that masked attention never reads; on small models
    that was most of a learner step. The learner (`audio_tower_states`) and the vLLM rollout worker
    (`vllm_worker_ext`) cut each batch at `filled_frames`. The same steps as `Qwen2AudioEncoder.forward`
    (transformers 5.19) with position embeddings for as many positions as there are, installed on the
    instance so that the tower's own hooks (ZeRO-3 parameter gathering, the learner's call counter) still
    run. tests/unit/test_shared_audio.py compares it against transformers' own forward on the full window.
    """
    import types

    import torch
    from transformers.modeling_outputs import BaseModelOutput

    if getattr(tower, "encodes_filled_frames_only", False):
        return

    def forward(self, input_features, attention_mask=None, **kwargs):
        gelu = torch.nn.functional.gelu
        x = gelu(self.conv1(input_features.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)))
        x = gelu(self.conv2(x)).permute(0, 2, 1)
        hidden = x + self.embed_positions.weight[: x.shape[1]]
        hidden = torch.nn.functional.dropout(hidden, p=self.dropout, training=self.training)
        for layer in self.layers:
            if self.training and torch.rand([]) < self.layerdrop:  # LayerDrop, drawn as transformers draws it
                continue
            hidden = layer(hidden, attention_mask, **kwargs)
        hidden = self.avg_pooler(hidden.permute(0, 2, 1)).permute(0, 2, 1)
        return BaseModelOutput(last_hidden_state=self.layer_norm(hidden))

    tower.forward = types.MethodType(forward, tower)
    tower.encodes_filled_frames_only = True


def tower_states_in_chunks(model, features: "torch.Tensor", feature_mask: "torch.Tensor", chunk: int
                           ) -> list["torch.Tensor"]:
    """`audio_tower_states` of all clips, at most `chunk` clips per tower call (bounds activation memory)."""
    chunk = max(chunk, 1)
    states: list["torch.Tensor"] = []
    for i in range(0, features.shape[0], chunk):
        states += audio_tower_states(model, features[i : i + chunk], feature_mask[i : i + chunk])
    return states


def project_audio(model, states: list["torch.Tensor"]) -> list["torch.Tensor"]:
    """Tower states -> the embeddings that replace the `<|AUDIO|>` tokens (Qwen2-Audio's projector, a per
    position linear map, run once on all clips; identity for Omni)."""
    import torch

    if _arch_of(model) == "qwen2.5-omni" or not states:
        return list(states)
    projected = model.model.multi_modal_projector(torch.cat(states))
    return list(torch.split(projected, [s.shape[0] for s in states]))


def _encode_audio(model, features: "torch.Tensor", feature_mask: "torch.Tensor") -> list["torch.Tensor"]:
    """Audio embeddings per clip, each (n_tokens, hidden), exactly as the model's own forward computes them."""
    return project_audio(model, audio_tower_states(model, features, feature_mask))


class SharedAudio:
    """The audio embeddings of one pass over a step's rows: each distinct clip encoded once (in forward calls
    of at most `chunk` clips) and shared by every micro-batch that holds one of its rows.

    Why: a GRPO group's G completions share a clip and may span micro-batches; encoding per micro-batch ran
    the encoder (most of the cost on small models: 30 s windows) once per micro-batch and pass.

    With a trainable encoder or projector, micro-batches read detached leaf copies whose gradients
    accumulate over the pass; the last micro-batch reads the live embeddings and adds `backward_term()` to
    its loss, whose gradient through the encoder is the sum of the earlier micro-batches' embedding
    gradients. So the encoder's backward runs once, inside the last micro-batch's backward: in DeepSpeed that
    is the same micro-step on every rank (each runs the same number), so the gradient reductions of ZeRO 2/3
    line up, and gradient accumulation sums exactly what per-micro-batch encoding summed. The cost: the
    encoder's activations for all of the pass's clips stay alive until the last micro-batch (gradient
    checkpointing keeps that to the layer inputs). Not valid with fp16 loss scaling (unsupported here).

    `tower_states`: the pass reuses these tower outputs (a frozen tower, computed once per step) and only
    runs the projector.
    """

    def __init__(self, model, features: "torch.Tensor", feature_mask: "torch.Tensor", *, chunk: int,
                 tower_states: list["torch.Tensor"] | None = None):
        import torch

        if tower_states is None:
            tower_states = tower_states_in_chunks(model, features, feature_mask, chunk)
        self.live = project_audio(model, tower_states)
        self.trains = any(e.requires_grad for e in self.live)
        # fp32 leaves: the micro-batches' gradients on a clip sum in fp32 (bf16 models), rounded once at the end
        self.leaves = [e.detach().float().requires_grad_(True) for e in self.live] if self.trains else self.live
        self._zero = torch.zeros((), device=features.device)

    def embeds(self, clips: list[int], last: bool) -> list["torch.Tensor"]:
        """Embeddings of the pass's clips numbered `clips`; `last`: for the pass's last micro-batch."""
        source = self.live if last else self.leaves
        return [source[j] for j in clips]

    def backward_term(self) -> "torch.Tensor":
        """sum_j <live_j, dL/d leaf_j> over the clips the earlier micro-batches read: add it to the last
        micro-batch's loss before its backward. Only its gradient means something (do not report its value)."""
        total = self._zero
        for live, leaf in zip(self.live, self.leaves):
            if self.trains and leaf.grad is not None:
                total = total + (live * leaf.grad.to(live.dtype)).sum().float()
        return total


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
    clips = batch.get("audio_embeds")  # shared by a pass's micro-batches (`SharedAudio`), else encoded here
    if clips is None:
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
