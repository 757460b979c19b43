"""Benchmarks that print figures (not timed tests).

    sari-ray bench learner-step --shape 7b --device cuda --batch 16 --num-generations 8 --completion-len 256

A learner-only GRPO step (the engine layer, no Ray, one device) on a randomly initialised model of the chosen
shape: the completion log-prob forward of `sari_ray.models.policy` (each clip encoded once per prompt), the
clipped GRPO loss of `sari_ray.grpo`, backward and an AdamW step. Prints tokens/s and model FLOPs utilisation
(MFU = model FLOPs per second / the device's peak; FLOPs counted as 6 * params * tokens for the decoder plus
the causal attention term, and 6 * encoder params * encoder frames for the audio tower).
"""
from __future__ import annotations

import argparse
import json
import time

SHAPES = {
    # Qwen2-Audio-7B-Instruct: Qwen-7B decoder + Whisper-large-v3-sized audio encoder.
    "7b": dict(text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=156032, max_position_embeddings=8192),
               audio=dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                          num_mel_bins=128, max_source_positions=1500)),
    # A 0.5B-class audio LM (Qwen2.5-0.5B decoder, untied head, whisper-base-sized encoder): ~0.6 B parameters.
    "0.5b": dict(text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, vocab_size=151936, max_position_embeddings=8192),
                 audio=dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                            num_mel_bins=128, max_source_positions=1500)),
    # Same code path on CPU in seconds (a test runs it).
    "tiny": dict(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=1024, max_position_embeddings=4096),
                 audio=dict(d_model=64, encoder_layers=2, encoder_attention_heads=1, encoder_ffn_dim=128,
                            num_mel_bins=128, max_source_positions=1500)),
}
AUDIO_TOKEN_ID = 151646  # Qwen2-Audio's <|AUDIO|>; kept inside the vocab for the tiny shape below


def build_random_model(shape: str, dtype, device):
    import torch
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    spec = SHAPES[shape]
    audio_token = AUDIO_TOKEN_ID if spec["text"]["vocab_size"] > AUDIO_TOKEN_ID else spec["text"]["vocab_size"] - 1
    config = Qwen2AudioConfig(audio_config={**spec["audio"], "model_type": "qwen2_audio_encoder"},
                              text_config={**spec["text"], "model_type": "qwen2"}, audio_token_id=audio_token)
    config.text_config.head_dim = spec["text"]["hidden_size"] // spec["text"]["num_attention_heads"]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2AudioForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model, config


def synthetic_batch(config, *, prompts: int, num_generations: int, prompt_text_len: int, completion_len: int,
                    audio_seconds: float, device):
    """A GRPO batch in the layout `policy.build_batch` produces: `prompts` clips, G completions each."""
    import torch

    from sari_ray.config import audio_tokens as tokens_of, mel_frames

    frames = mel_frames(30.0)  # Qwen2-Audio's feature extractor pads every clip to 30 s
    valid = mel_frames(audio_seconds)
    audio_tokens = tokens_of(audio_seconds)
    rows = prompts * num_generations
    P = prompt_text_len + audio_tokens
    vocab = config.text_config.vocab_size
    text = torch.randint(0, min(vocab, 150000) - 1, (rows, P + completion_len), device=device)
    text[:, prompt_text_len // 2: prompt_text_len // 2 + audio_tokens] = config.audio_token_id
    features = torch.randn(prompts, config.audio_config.num_mel_bins, frames, device=device)
    feature_mask = torch.zeros(prompts, frames, dtype=torch.long, device=device)
    feature_mask[:, :valid] = 1
    return {
        "input_ids": text, "attention_mask": torch.ones_like(text),
        "completion_ids": text[:, P:], "completion_mask": torch.ones(rows, completion_len, dtype=torch.bool, device=device),
        "logits_slice": (P - 1, P - 1 + completion_len), "input_features": features,
        "feature_attention_mask": feature_mask,
        "audio_index": torch.arange(prompts, device=device).repeat_interleave(num_generations),
    }, {"rows": rows, "seq_len": P + completion_len, "audio_frames": valid // 2}


def model_flops(config, audio_params: int, decoder_params: int, info: dict, prompts: int) -> float:
    t = config.text_config
    tokens = info["rows"] * info["seq_len"]
    decoder = 6 * decoder_params * tokens + 6 * t.num_hidden_layers * t.hidden_size * info["seq_len"] * tokens
    encoder = 6 * audio_params * prompts * 1500  # the encoder runs over the padded 30 s window
    return float(decoder + encoder)


def learner_step_benchmark(shape="tiny", device="cpu", dtype="bfloat16", prompts=2, num_generations=8,
                           prompt_text_len=64, completion_len=256, audio_seconds=10.0, steps=3, warmup=1,
                           gradient_checkpointing=False, peak_tflops=989.0) -> dict:
    import torch

    from sari_ray import grpo
    from sari_ray.models.policy import completion_logprobs

    torch_dtype = getattr(torch, dtype)
    model, config = build_random_model(shape, torch_dtype, device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    audio_params = sum(p.numel() for n, p in model.named_parameters() if "audio_tower" in n)
    decoder_params = sum(p.numel() for n, p in model.named_parameters() if "audio_tower" not in n)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    batch, info = synthetic_batch(config, prompts=prompts, num_generations=num_generations,
                                  prompt_text_len=prompt_text_len, completion_len=completion_len,
                                  audio_seconds=audio_seconds, device=device)
    advantages = torch.randn(info["rows"], device=device)

    def step():
        logprobs, _ = completion_logprobs(model, batch)
        loss, _ = grpo.policy_loss(logprobs, None, advantages, batch["completion_mask"].float(), loss_type="grpo")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    flops = model_flops(config, audio_params, decoder_params, info, prompts)
    result = {
        "shape": shape, "device": device, "dtype": dtype, "params": audio_params + decoder_params,
        "rows": info["rows"], "seq_len": info["seq_len"], "seconds_per_step": seconds,
        "tokens_per_s": info["rows"] * info["seq_len"] / seconds,
        "completion_tokens_per_s": info["rows"] * completion_len / seconds,
        "model_tflops_per_s": flops / seconds / 1e12, "mfu": flops / seconds / (peak_tflops * 1e12),
        "peak_tflops": peak_tflops,
    }
    if device.startswith("cuda"):
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["gpu"] = torch.cuda.get_device_name()
    return result


# ---------------------------------------------------------------- bench sync
# Both weight-sync paths on a random state dict of a model shape, without Ray or vLLM (so it runs on a GPU box
# that has only torch): the object-store path as the real one does it per bucket -- safetensors serialise, the
# copies the bytes go through (into the object store, into the engine's worker process), deserialise, apply
# (copy into a same-shaped state dict) -- and the collective path as a real torch.distributed broadcast between
# two local processes (gloo on CPU, NCCL on two GPUs), bucket by bucket, as `engines.weight_sync_group` does.
def random_state_dict(shape: str, dtype, fill: bool = True) -> dict:
    """The published-layout state dict of a SHAPES model (random values, or zeros when fill=False)."""
    import torch

    from sari_ray.engines.weight_buckets import hf_to_checkpoint_names

    model, _ = build_random_model(shape, dtype, "meta")
    out = {}
    for name, t in model.state_dict().items():
        tensor = torch.empty(t.shape, dtype=t.dtype)
        out[hf_to_checkpoint_names(name, "qwen2-audio")] = tensor.normal_() if fill and tensor.is_floating_point() \
            else tensor.zero_()
    return out


def state_bytes(shape: str, dtype) -> int:
    model, _ = build_random_model(shape, dtype, "meta")
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def available_memory_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _buckets(state: dict, bucket_bytes: int):
    from sari_ray.engines.weight_buckets import group_by_layer, iter_tensor_buckets

    return iter_tensor_buckets(group_by_layer(state, "qwen2-audio").values(), bucket_bytes, device=None)


def object_store_sync(source: dict, target: dict, bucket_bytes: int) -> dict:
    """Per bucket: serialise, two copies of the bytes, deserialise, copy into `target`. Seconds per phase."""
    from safetensors.torch import load, save

    phases = dict.fromkeys(("serialise_s", "copy_s", "deserialise_s", "apply_s"), 0.0)
    total_bytes = buckets = 0
    t_start = time.perf_counter()
    for bucket in _buckets(source, bucket_bytes):
        t0 = time.perf_counter()
        data = save(bucket)
        t1 = time.perf_counter()
        data = memoryview(memoryview(data).tobytes()).tobytes()  # ray.put into the store; RPC into the worker
        t2 = time.perf_counter()
        loaded = load(data)
        t3 = time.perf_counter()
        for name, tensor in loaded.items():
            target[name].copy_(tensor)
        t4 = time.perf_counter()
        for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[key] += dt
        total_bytes += len(data)
        buckets += 1
        del data, loaded
    return {"seconds": time.perf_counter() - t_start, "bytes": total_bytes, "buckets": buckets, "phases": phases}


def _collective_rank(rank: int, shape: str, dtype_name: str, bucket_bytes: int, port: int, device: str, queue,
                     repeats: int):
    """One of the two processes of the collective path: rank 0 sends `shape`'s random weights, rank 1 receives
    them into zeros and reports seconds and whether the per-tensor sums agree."""
    import torch

    from sari_ray.engines.weight_buckets import bucket_layout, tensors_checksum
    from sari_ray.engines.weight_sync_group import (backend_for, broadcast_from_rank0, join_group,
                                                  receive_buckets, send_buckets)

    try:
        torch.manual_seed(0)
        dev = f"cuda:{rank}" if device == "cuda" else "cpu"
        if device == "cuda":
            torch.cuda.set_device(rank)
        state = {k: v.to(dev) for k, v in random_state_dict(shape, getattr(torch, dtype_name), fill=rank == 0).items()}
        plan = [bucket_layout(b) for b in _buckets(state, bucket_bytes)]
        group = join_group("127.0.0.1", port, rank, 2, backend=backend_for(dev), timeout_s=600)
        runs = []
        for _ in range(repeats):
            _allreduce(group, torch.zeros(1, device=dev))  # both sides start together
            t0 = time.perf_counter()
            if rank == 0:
                sent = send_buckets(group, _buckets(state, bucket_bytes), plan, dev)
            else:
                sent = 0
                for name, tensor in receive_buckets(group, plan, dev):
                    state[name].copy_(tensor)
                    sent += tensor.numel() * tensor.element_size()
            if device == "cuda":
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - t0)
        seconds = min(runs)
        mine = torch.tensor([tensors_checksum([t]) for t in state.values()], dtype=torch.float64, device=dev)
        senders = mine.clone()
        broadcast_from_rank0(group, senders)  # the sender's per-tensor sums, to compare with what arrived
        queue.put((rank, {"seconds": seconds, "runs_s": runs, "bytes": sent, "buckets": len(plan),
                          "backend": backend_for(dev),
                          "delivered_exactly": bool(torch.equal(senders, mine))}))
    except BaseException as err:  # reported by the parent
        queue.put((rank, {"error": repr(err)}))
        raise


def _allreduce(group, tensor) -> None:
    import torch.distributed as dist

    options = dist.AllreduceOptions()
    options.reduceOp = dist.ReduceOp.SUM
    group.allreduce([tensor], options).wait()


def collective_sync(shape: str, dtype_name: str, bucket_bytes: int, device: str = "cpu", repeats: int = 3) -> dict:
    """Two spawned processes and a real torch.distributed broadcast, bucket by bucket (the receiver's view)."""
    import torch.multiprocessing as mp

    from sari_ray.engines.weight_sync_group import open_store

    store, port, listener = open_store("127.0.0.1", 2, 600)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_collective_rank,
                         args=(r, shape, dtype_name, bucket_bytes, port, device, queue, repeats)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    del store, listener
    errors = {r: v["error"] for r, v in results.items() if "error" in v}
    if errors:
        raise RuntimeError(f"collective sync benchmark failed: {errors}")
    return results[1]


def sync_benchmark(shape: str = "tiny", backends: tuple[str, ...] = ("object_store", "collective"),
                   dtype: str = "bfloat16", bucket_mb: float = 64.0, device: str = "cpu", repeats: int = 3) -> dict:
    """Bytes, seconds (the best of `repeats` runs: other work on the machine only adds) and GB/s of each
    weight-sync path for a random state dict of `shape`. Refuses a shape
    whose two copies (sender's and receiver's) do not fit in the memory available now."""
    import torch

    torch_dtype = getattr(torch, dtype)
    model_bytes = state_bytes(shape, torch_dtype)
    bucket_bytes = int(bucket_mb * 2**20)
    need = 2 * model_bytes + 4 * bucket_bytes + 2**30
    available = available_memory_bytes()
    if need > available:
        raise MemoryError(f"bench sync --shape {shape}: needs about {need / 2**30:.1f} GiB (the sender's and the "
                          f"receiver's copy of a {model_bytes / 2**30:.1f} GiB {dtype} state dict, plus buckets) but "
                          f"{available / 2**30:.1f} GiB are available; run it on a machine with more memory or "
                          "take a smaller --shape")
    if device == "cuda" and "collective" in backends and torch.cuda.device_count() < 2:
        raise RuntimeError("bench sync --device cuda: the collective path broadcasts between two GPUs (NCCL refuses "
                           f"two ranks on one), and this machine has {torch.cuda.device_count()}")
    result: dict = {"shape": shape, "dtype": dtype, "bucket_mb": bucket_mb, "model_bytes": model_bytes,
                    "params": sum(p.numel() for p in build_random_model(shape, torch_dtype, "meta")[0].parameters()),
                    "device": device}
    if "object_store" in backends:
        source = random_state_dict(shape, torch_dtype)
        target = {k: torch.zeros_like(v) for k, v in source.items()}
        runs = [object_store_sync(source, target, bucket_bytes) for _ in range(repeats)]
        figures = {**min(runs, key=lambda r: r["seconds"]), "runs_s": [r["seconds"] for r in runs]}
        figures["delivered_exactly"] = all(torch.equal(source[k], target[k]) for k in source)
        del source, target
        result["object_store"] = figures
    if "collective" in backends:
        result["collective"] = collective_sync(shape, dtype, bucket_bytes, device, repeats)
    for name in ("object_store", "collective"):
        if name in result:
            result[name]["gb_per_s"] = result[name]["bytes"] / result[name]["seconds"] / 1e9
    return result


def register_cli(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks that print figures")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    step = kinds.add_parser("learner-step", help="learner-only GRPO step on a random model (tokens/s, MFU)")
    step.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    step.add_argument("--device", default="cuda")
    step.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    step.add_argument("--prompts", type=int, default=2, help="distinct clips per step")
    step.add_argument("--num-generations", type=int, default=8)
    step.add_argument("--prompt-text-len", type=int, default=64)
    step.add_argument("--completion-len", type=int, default=256)
    step.add_argument("--audio-seconds", type=float, default=10.0)
    step.add_argument("--steps", type=int, default=3)
    step.add_argument("--warmup", type=int, default=1)
    step.add_argument("--gradient-checkpointing", action="store_true")
    step.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    step.set_defaults(func=_run_learner_step)
    sync = kinds.add_parser("sync", help="weight sync, object store vs collective, on a random state dict (GB/s)")
    sync.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    sync.add_argument("--backend", choices=("object_store", "collective", "both"), default="both")
    sync.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    sync.add_argument("--bucket-mb", type=float, default=64.0, help="as learner.sync_bucket_mb")
    sync.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                      help="cuda: the collective path between two GPUs (NCCL); the object-store path is host memory")
    sync.add_argument("--repeats", type=int, default=3, help="runs per path; the best is reported")
    sync.add_argument("--json", action="store_true", help="last line: the figures as one JSON object")
    sync.set_defaults(func=_run_sync)
    from sari_ray.bench_pipeline import add_parser as add_pipeline_parser  # bench pipeline (real Ray and vLLM)

    add_pipeline_parser(kinds)


def _run_learner_step(args: argparse.Namespace) -> int:
    result = learner_step_benchmark(
        shape=args.shape, device=args.device, dtype=args.dtype, prompts=args.prompts,
        num_generations=args.num_generations, prompt_text_len=args.prompt_text_len,
        completion_len=args.completion_len, audio_seconds=args.audio_seconds, steps=args.steps, warmup=args.warmup,
        gradient_checkpointing=args.gradient_checkpointing, peak_tflops=args.peak_tflops)
    print(json.dumps(result, indent=1))
    return 0


def _run_sync(args: argparse.Namespace) -> int:
    backends = ("object_store", "collective") if args.backend == "both" else (args.backend,)
    try:
        result = sync_benchmark(args.shape, backends, dtype=args.dtype, bucket_mb=args.bucket_mb, device=args.device,
                                repeats=args.repeats)
    except (MemoryError, RuntimeError) as err:
        print(f"error: {err}")
        return 2
    print(f"weight sync, shape {args.shape} ({result['params'] / 1e9:.3g} B parameters, {args.dtype}, "
          f"{result['model_bytes'] / 2**20:.1f} MiB), buckets of {args.bucket_mb:g} MiB")
    for name in backends:
        r = result[name]
        extra = ", ".join(f"{k} {v:.3f}" for k, v in r.get("phases", {}).items())
        print(f"  {name:<12} {r['bytes'] / 2**20:9.1f} MiB in {r['buckets']:4d} buckets  {r['seconds']:8.3f} s  "
              f"{r['gb_per_s']:6.2f} GB/s  exact={r['delivered_exactly']}" + (f"  ({extra})" if extra else ""))
    if args.json:
        print(json.dumps(result))
    return 0
