"""The model shapes that size memory (`sari-ray plan`): Qwen2-Audio and the Qwen2.5-Omni thinker, from a
checkpoint's config.json, or the published 7B shapes when it is not on disk; exact parameter counts from the
safetensors headers. Pure: json and struct only."""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

@dataclass(frozen=True)
class ModelShape:
    """The shapes that size memory. Defaults: Qwen2-Audio-7B-Instruct's config.json (text fields it leaves out
    take Qwen2Config's defaults: hidden 4096, 32 layers, 32 heads, 32 KV heads)."""

    arch: str = "qwen2-audio"
    hidden: int = 4096
    layers: int = 32
    intermediate: int = 11008
    vocab: int = 156032
    heads: int = 32
    kv_heads: int = 32
    head_dim: int | None = None  # None: hidden // heads
    tied: bool = False
    audio_d: int = 1280  # Whisper-large-v3-like encoder
    audio_layers: int = 32
    audio_ffn: int = 5120
    audio_mels: int = 128
    audio_positions: int = 1500
    vision: dict[str, int] | None = None  # Omni thinker's vision tower (the learner holds it, the engines not)
    source: str = "shipped 7B shapes"

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def params(self) -> dict[str, int]:
        """Parameters by part: text (decoder, embeddings, LM head), audio (encoder), projector, vision."""
        h, i, v, q, kv = self.hidden, self.intermediate, self.vocab, self.heads * self.hd, self.kv_heads * self.hd
        layer = 2 * h + (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * i
        text = v * h * (1 if self.tied else 2) + self.layers * layer + h
        d, f = self.audio_d, self.audio_ffn
        enc_layer = 4 * d + (d * d + d) + d * d + (d * d + d) + (d * d + d) + (d * f + f) + (f * d + d)
        audio = self.audio_mels * d * 3 + d + d * d * 3 + d + self.audio_layers * enc_layer + 2 * d
        if self.arch == "qwen2-audio":
            audio += self.audio_positions * d  # a learned (frozen) position table; Omni's is sinusoidal
            projector = d * h + h
        else:
            projector = d * h + h + 2 * h  # proj to the text width, and the audio bos / eos embedding
        return {"text": text, "audio": audio, "projector": projector, "vision": vision_params(self.vision)}

    def kv_bytes_per_token(self, b: int) -> int:
        return 2 * self.layers * self.kv_heads * self.hd * b


def vision_params(v: dict[str, int] | None) -> int:
    """Qwen2.5-Omni's vision tower from its config (patch conv, blocks with SwiGLU, the 2x2 merger)."""
    if not v:
        return 0
    hv, iv, out = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    patch = v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * v.get("patch_size", 14) ** 2 * hv
    block = 2 * hv + (hv * 3 * hv + 3 * hv) + (hv * hv + hv) + 2 * (hv * iv + iv) + (iv * hv + hv)
    merge = hv * v.get("spatial_merge_size", 2) ** 2
    return patch + v["depth"] * block + hv + (merge * merge + merge) + (merge * out + out)


OMNI_7B = ModelShape(arch="qwen2.5-omni", hidden=3584, layers=28, intermediate=18944, vocab=152064, heads=28,
                     kv_heads=4, vision={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                                         "out_hidden_size": 3584})
SHIPPED = {"qwen2-audio": ModelShape(), "qwen2.5-omni": OMNI_7B}


def shape_from_config(config: dict[str, Any], source: str = "config.json") -> ModelShape:
    """A ModelShape from a checkpoint's config.json (Qwen2-Audio or Qwen2.5-Omni, full or thinker)."""
    thinker = config.get("thinker_config")
    arch = "qwen2.5-omni" if thinker or "omni" in str(config.get("model_type", "")) else "qwen2-audio"
    root = thinker or config
    base = SHIPPED[arch]
    text, audio = root.get("text_config") or {}, root.get("audio_config") or {}
    pick = lambda d, key, default: d.get(key) if d.get(key) is not None else default  # noqa: E731
    vision = root.get("vision_config") if arch == "qwen2.5-omni" else None
    return ModelShape(
        arch=arch, hidden=pick(text, "hidden_size", base.hidden), layers=pick(text, "num_hidden_layers", base.layers),
        intermediate=pick(text, "intermediate_size", base.intermediate),
        vocab=pick(text, "vocab_size", root.get("vocab_size", base.vocab)),
        heads=pick(text, "num_attention_heads", base.heads),
        kv_heads=pick(text, "num_key_value_heads", pick(text, "num_attention_heads", base.kv_heads)),
        head_dim=text.get("head_dim"),
        tied=bool(pick(text, "tie_word_embeddings", config.get("tie_word_embeddings", False))),
        audio_d=pick(audio, "d_model", base.audio_d), audio_layers=pick(audio, "encoder_layers", base.audio_layers),
        audio_ffn=pick(audio, "encoder_ffn_dim", base.audio_ffn),
        audio_mels=pick(audio, "num_mel_bins", base.audio_mels),
        audio_positions=pick(audio, "max_source_positions", base.audio_positions),
        vision={k: vision[k] for k in ("depth", "hidden_size", "intermediate_size", "out_hidden_size", "in_channels",
                                       "patch_size", "temporal_patch_size", "spatial_merge_size") if k in vision}
        if vision else None, source=source)


def load_shape(model_path: str, arch: str = "auto") -> ModelShape:
    """The checkpoint's config.json when it is on disk, else the shipped 7B shapes of `arch` (auto: by name)."""
    config = Path(model_path) / "config.json"
    if config.is_file():
        return shape_from_config(json.loads(config.read_text()), f"{config}")
    if arch == "auto":
        arch = "qwen2.5-omni" if "omni" in str(model_path).lower() else "qwen2-audio"
    return replace(SHIPPED[arch], source=f"shipped {arch} 7B shapes ({model_path} is not on disk)")


def model_shape(cfg, model_path: str | None = None) -> ModelShape:
    """The shapes of `model_path` (default model.path); a tiny model the run will build (model.build_tiny_if_missing)
    has the tiny shapes (sari_ray/models/tiny.py)."""
    path = model_path or cfg.model.path
    if cfg.model.build_tiny_if_missing and not (Path(path) / "config.json").is_file():
        from sari_ray.models import tiny

        return ModelShape(arch="qwen2-audio", hidden=tiny.HIDDEN, layers=tiny.LAYERS, intermediate=tiny.FFN,
                          vocab=753, heads=tiny.HEADS, kv_heads=tiny.KV_HEADS, audio_d=tiny.HIDDEN,
                          audio_layers=tiny.LAYERS, audio_ffn=tiny.FFN,
                          source="the tiny model the run builds (vocab 753 assumed)")
    return load_shape(path, cfg.model.arch)


def checkpoint_params(model_path: str) -> dict[str, int]:
    """Exact parameter counts by part from the safetensors headers (no tensor is read), {} without them."""
    counts: dict[str, int] = {}
    for path in sorted(Path(model_path).glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, meta in header.items():
            if name != "__metadata__":
                part = next((p for key, p in (("audio_tower", "audio"), ("multi_modal_projector", "projector"),
                                              ("visual", "vision")) if key in name), "text")
                counts[part] = counts.get(part, 0) + math.prod(meta["shape"])
    return counts
