"""Learner -> rollout weight format: transformers parameter names rewritten to the published checkpoint
layout (what vLLM's loaders expect), grouped into safetensors-serialised buckets.

Why buckets and not one call per parameter: remote calls dominate sync time (RL systems that sent one call per
parameter saw 200+ calls push a sync past 120 s). Why whole
layers per bucket, in order: vLLM's in-place reload buffers a layer until all of its tensors arrived (q/k/v
are one fused `qkv_proj`, gate/up one `gate_up_proj`), so tensors grouped by layer keep those buffers small,
and a receiver may reload bucket by bucket without ever splitting a layer across reload calls.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ARCHS = ("qwen2-audio", "qwen2.5-omni")

# transformers 5.x module names -> published checkpoint names (first matching prefix wins).
_QWEN2_AUDIO_RENAMES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
_QWEN2_AUDIO_PUBLISHED = ("language_model.model.", "language_model.lm_head.", "audio_tower.", "multi_modal_projector.")
_OMNI_THINKER_ROOTS = ("model.", "lm_head.", "audio_tower.", "visual.")

_LAYER_RE = re.compile(r"^(.*?\.(?:layers|blocks)\.\d+)\.")


def hf_to_checkpoint_names(name: str, arch: str) -> str:
    """One transformers parameter name -> its name in the published checkpoint.

    qwen2-audio: `Qwen2AudioForConditionalGeneration` (transformers 5.x) names -> `language_model.model.*`,
    `language_model.lm_head.*`, `audio_tower.*`, `multi_modal_projector.*`.
    qwen2.5-omni: `Qwen2_5OmniThinkerForConditionalGeneration` names -> `thinker.*`.
    Already-published names pass through unchanged; anything else is an error (never a silent skip).
    """
    if arch == "qwen2-audio":
        if name.startswith(_QWEN2_AUDIO_PUBLISHED):
            return name
        for old, new in _QWEN2_AUDIO_RENAMES:
            if name.startswith(old):
                return new + name[len(old) :]
    elif arch == "qwen2.5-omni":
        if name.startswith("thinker."):
            return name
        if name.startswith(_OMNI_THINKER_ROOTS):
            return "thinker." + name
    else:
        raise ValueError(f"unknown arch {arch!r}; valid: {list(ARCHS)}")
    raise ValueError(f"parameter {name!r} has no published-checkpoint name for arch {arch!r}")


def detect_arch_from_names(names: Iterable[str]) -> str:
    """Which arch a transformers state_dict belongs to (Qwen2-Audio nests its towers under `model.`)."""
    names = list(names)
    if any(n.startswith(("model.audio_tower.", "audio_tower.")) for n in names) and any(
        n.startswith(("model.language_model.", "language_model.")) for n in names
    ):
        return "qwen2-audio"
    if any(n.startswith(("audio_tower.", "thinker.audio_tower.")) for n in names):
        return "qwen2.5-omni"
    raise ValueError("cannot tell the arch from these parameter names; pass arch= explicitly")


def layer_group(name: str) -> str:
    """The unit vLLM reloads as a whole: `...layers.N` / `...blocks.N`, else the owning module."""
    match = _LAYER_RE.match(name)
    return match.group(1) if match else name.rpartition(".")[0]


def group_by_layer(state_dict: Mapping[str, "torch.Tensor"], arch: str,
                   skip_prefixes: tuple[str, ...] = ()) -> dict[str, dict[str, "torch.Tensor"]]:
    """{layer group: {published name: tensor}} in state_dict order (the bucket boundaries)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for hf_name, tensor in state_dict.items():
        name = hf_to_checkpoint_names(hf_name, arch)
        if skip_prefixes and name.startswith(skip_prefixes):
            continue
        groups.setdefault(layer_group(name), {})[name] = tensor
    return groups


def iter_tensor_buckets(groups: Iterable[Mapping[str, "torch.Tensor"]], bucket_bytes: int, *,
                        dtype: "torch.dtype | None" = None, device: "str | torch.device | None" = "cpu"
                        ) -> Iterator[dict[str, "torch.Tensor"]]:
    """Whole layer groups (published names, in order) -> buckets {name: tensor}, each yielded as soon as it is
    full, so a caller that gathers groups one at a time (ZeRO-3) never holds more than a bucket and a group.

    Buckets are at most `bucket_bytes` unless one group alone is larger. `dtype` casts floating tensors
    (e.g. bf16 to halve the transfer); `device` None leaves tensors where they are (meta tensors: a plan).
    Tied / aliased tensors are cloned (safetensors refuses shared storage).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    current: dict[str, torch.Tensor] = {}
    current_bytes = 0
    seen_storage: set[int] = set()
    for group in groups:
        prepared = {}
        for name, tensor in group.items():
            t = tensor.detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if device is not None:
                t = t.to(device)
            t = t.contiguous()
            if t.device.type != "meta":
                if t.untyped_storage().data_ptr() in seen_storage:
                    t = t.clone()
                seen_storage.add(t.untyped_storage().data_ptr())
            prepared[name] = t
        size = sum(t.numel() * t.element_size() for t in prepared.values())
        if current and current_bytes + size > bucket_bytes:
            yield current
            current, current_bytes = {}, 0
            seen_storage = {t.untyped_storage().data_ptr() for t in prepared.values() if t.device.type != "meta"}
        current.update(prepared)
        current_bytes += size
    if current:
        yield current


def iter_weight_buckets(groups: Iterable[Mapping[str, "torch.Tensor"]], bucket_bytes: int, *,
                        dtype: "torch.dtype | None" = None) -> Iterator[bytes]:
    """`iter_tensor_buckets`, each bucket serialised with safetensors (the object-store path)."""
    from safetensors.torch import save

    for bucket in iter_tensor_buckets(groups, bucket_bytes, dtype=dtype):
        yield save(bucket)


def export_weight_buckets(
    state_dict: Mapping[str, "torch.Tensor"],
    bucket_bytes: int,
    *,
    arch: str | None = None,
    dtype: "torch.dtype | None" = None,
    skip_prefixes: tuple[str, ...] = (),
) -> list[bytes]:
    """Serialise a transformers state_dict as safetensors buckets in the published key layout.

    `skip_prefixes` drops published names (e.g. `("thinker.visual.",)`: a vLLM engine serving audio only
    holds no vision tower and would ignore them anyway). See `iter_weight_buckets`.
    """
    arch = arch or detect_arch_from_names(state_dict)
    return list(iter_weight_buckets(group_by_layer(state_dict, arch, skip_prefixes).values(), bucket_bytes,
                                    dtype=dtype))


def frozen_audio_prefixes(arch: str) -> tuple[str, ...]:
    """Published-name prefix of the audio encoder: what a sync skips when `learner.train_audio_encoder` is
    false (the engines load the same base encoder, and it never changes)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {list(ARCHS)}")
    return ("audio_tower.",) if arch == "qwen2-audio" else ("thinker.audio_tower.",)


# ---------------------------------------------------------------- the collective path: flat byte buffers
# A bucket travels as one uint8 tensor (one broadcast per bucket, no pickling); its layout -- (name, dtype,
# shape, byte offset) per tensor -- travels by the actor call. Offsets are aligned so that every slice can be
# viewed as its dtype.
_ALIGN = 64
LayoutEntry = tuple  # (name: str, dtype: str, shape: tuple[int, ...], offset: int)


def bucket_layout(bucket: Mapping[str, "torch.Tensor"]) -> list[LayoutEntry]:
    """Where each tensor of a bucket sits in its flat buffer (plain tuples: picklable, comparable)."""
    layout, offset = [], 0
    for name, t in bucket.items():
        layout.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return layout


def layout_nbytes(layout: list[LayoutEntry]) -> int:
    """Size of the flat buffer a layout needs."""
    import torch

    if not layout:
        return 0
    _, dtype, shape, offset = layout[-1]
    numel = 1
    for d in shape:
        numel *= d
    return offset + numel * getattr(torch, dtype).itemsize


def pack_bucket(bucket: Mapping[str, "torch.Tensor"], layout: list[LayoutEntry],
                device: "str | torch.device" = "cpu") -> "torch.Tensor":
    """One uint8 buffer holding every tensor of `bucket` where `layout` says; a tensor whose name, dtype or shape
    differs from the layout is an error (sender and receivers must agree before anything is sent)."""
    import torch

    if [name for name, *_ in layout] != list(bucket):
        raise ValueError(f"bucket tensors {list(bucket)[:3]}... do not match the layout "
                         f"{[e[0] for e in layout][:3]}...")
    buffer = torch.empty(layout_nbytes(layout), dtype=torch.uint8, device=device)
    for view, (name, *_), t in zip(_views(buffer, layout), layout, bucket.values()):
        if view.dtype != t.dtype or view.shape != t.shape:
            raise ValueError(f"tensor {name!r}: {t.dtype} {tuple(t.shape)} but the layout says {view.dtype} "
                             f"{tuple(view.shape)}")
        view.copy_(t)
    return buffer


def unpack_bucket(buffer: "torch.Tensor", layout: list[LayoutEntry]) -> dict[str, "torch.Tensor"]:
    """{name: view into buffer}: no copy (the loader copies into the model's parameters)."""
    return {name: view for (name, *_), view in zip(layout, _views(buffer, layout))}


def _views(buffer: "torch.Tensor", layout: list[LayoutEntry]) -> list["torch.Tensor"]:
    import torch

    views = []
    for _, dtype, shape, offset in layout:
        dt = getattr(torch, dtype)
        numel = 1
        for d in shape:
            numel *= d
        views.append(buffer[offset: offset + numel * dt.itemsize].view(dt).view(shape))
    return views


def load_bucket(data: bytes) -> dict[str, "torch.Tensor"]:
    """Inverse of one bucket of `export_weight_buckets`."""
    from safetensors.torch import load

    return load(data)


def tensors_checksum(tensors: Iterable["torch.Tensor"]) -> float:
    """Sum of all elements in float64: cheap, order-free, and comparable with `VLLMEngine.weights_checksum`
    (fused vLLM tensors are concatenations of the checkpoint's, so their sums agree)."""
    import torch

    total = torch.zeros((), dtype=torch.float64)
    for t in tensors:
        total += t.detach().to("cpu", torch.float64).sum()
    return float(total)


_FUSED = (  # vLLM fuses these checkpoint tensors into one parameter (concatenated, so their sums add up)
    (re.compile(r"\.self_attn\.[qkv]_proj\."), ".self_attn.qkv_proj."),
    (re.compile(r"\.mlp\.(?:gate|up)_proj\."), ".mlp.gate_up_proj."),
)
_WRAPPERS = re.compile(r"^(?:(?:thinker|language_model|model)\.)+")


def _bare(name: str) -> str:
    """A name without the wrappers both sides nest differently (`thinker.`, `language_model.`, `model.`)."""
    return _WRAPPERS.sub("", name)


def fuse_param_sums(checkpoint_sums: Mapping[str, float], engine_names: Iterable[str]) -> dict[str, float]:
    """Per-tensor sums in the published layout -> the same sums keyed by the engine's parameter names,
    adding the parts of tensors the engine fuses (q/k/v -> qkv_proj, gate/up -> gate_up_proj, where the
    engine has the fused one). A checkpoint name the engine has no parameter for is an error: a tensor
    that would never be synced must not pass unseen."""
    by_bare = {_bare(n): n for n in engine_names}
    out: dict[str, float] = {}
    for name, value in checkpoint_sums.items():
        bare = _bare(name)
        if bare not in by_bare:
            for pattern, fused in _FUSED:
                candidate = pattern.sub(fused, bare)
                if candidate in by_bare:
                    bare = candidate
                    break
        if bare not in by_bare:
            raise KeyError(f"checkpoint tensor {name!r} has no engine parameter (engine names look like "
                           f"{sorted(by_bare.values())[:3]} ...)")
        key = by_bare[bare]
        out[key] = out.get(key, 0.0) + value
    return out


def compare_param_sums(checkpoint_sums: Mapping[str, float], engine_sums: Mapping[str, float], *,
                       rel_tol: float = 1e-5, abs_tol: float = 1e-4) -> list[str]:
    """Tensor-by-tensor differences between a learner's and an engine's weights ([] when they agree): a swapped
    pair or one tensor left unsynced shows by name, which a whole-model sum cannot show."""
    import math

    fused = fuse_param_sums(checkpoint_sums, engine_sums)
    problems = [f"{n}: engine has no value" for n in fused if n not in engine_sums]
    problems += [f"{n}: learner has no value" for n in engine_sums if n not in fused]
    problems += [f"{n}: learner {fused[n]:.6g} != engine {engine_sums[n]:.6g}" for n in fused
                 if n in engine_sums and not math.isclose(fused[n], engine_sums[n], rel_tol=rel_tol, abs_tol=abs_tol)]
    return problems
