"""`sari-ray check gpu [--json]`: one command for a GPU box, within a 10-minute budget.

    bash docker/install.sh gpu && .venv/bin/sari-ray check gpu

Steps (each says ok, skipped with the reason, or failed): the GPU profile's packages import together; CUDA is
there; the filled-frames encoder patch matches the installed vLLM; `sari-ray plan` of the flagship config on
this GPU; `bench learner-step` at the 7B shape, its peak memory against the plan's arithmetic for the same
batch; the tiny flagship config on CUDA (`sari-ray train` of the flagship with configs/overlays/tiny_cpu.yaml
moved to the GPUs: vLLM's GPU engine, DeepSpeed ZeRO-3 in bf16, the NCCL weight broadcast, a few GRPO steps);
`bench sync` at the 7B shape (GB/s). On a machine without CUDA the GPU steps are skipped, each saying so.
Prints one table, then one JSON line.

The tiny flagship takes what the box has: with 2 or more GPUs the engine gets one and up to two learner ranks
one each, synced by the flagship's NCCL broadcast; with one GPU the engine and a single learner rank share it
(half a GPU each in Ray's accounting) and sync through the object store, since NCCL refuses two ranks of one
group on one device.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

PACKAGES = ("torch", "torchaudio", "transformers", "vllm", "deepspeed", "ray")
FLAGSHIP = Path(__file__).resolve().parent.parent / "configs" / "sari_qwen2_audio_7b.yaml"
TINY_OVERLAY = FLAGSHIP.parent / "overlays" / "tiny_cpu.yaml"
TINY_GRPO_STEPS = 3
TINY_TIMEOUT_S = 300.0  # Ray start, a tiny model built, vLLM's CUDA engine (eager), SFT and 3 GRPO steps
BUDGET_S = 600.0
# bench learner-step's batch for the check: one clip, 4 completions, 10 s audio, 256 tokens, checkpointing
BENCH = dict(prompts=1, num_generations=4, prompt_text_len=64, completion_len=256, audio_seconds=10.0)


def step(name: str, status: str, detail: str = "", **figures: Any) -> dict[str, Any]:
    return {"step": name, "status": status, "detail": detail, **figures}


def check_imports(packages=PACKAGES) -> dict[str, Any]:
    import importlib

    found, missing = {}, {}
    for name in packages:
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as err:  # noqa: BLE001 - any import failure is the finding
            missing[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    detail = ", ".join(f"{k} {v}" for k, v in found.items())
    if missing:
        return step("imports", "failed", detail + "; missing: " + "; ".join(f"{k} ({v})" for k, v in missing.items()),
                    versions=found, missing=missing)
    return step("imports", "ok", detail, versions=found)


def cuda_device() -> dict[str, Any] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gib": props.total_memory / 2**30, "count": torch.cuda.device_count()}


def check_patch() -> dict[str, Any]:
    import types

    try:
        from vllm.model_executor.models.qwen2_audio import Qwen2AudioForConditionalGeneration as cls
    except Exception as err:  # noqa: BLE001
        return step("filled-frames patch", "skipped", f"vLLM's Qwen2-Audio does not import ({type(err).__name__})")
    from sari_ray.engines.vllm_worker_ext import filled_frames_patch_problem

    method = getattr(cls, "_process_audio_input", None)
    problem = filled_frames_patch_problem(types.MethodType(method, object()) if method else None)
    return step("filled-frames patch", "failed" if problem else "ok",
                problem or "vLLM's _process_audio_input(audio_input) as expected")


def check_plan(gpu_gib: float | None) -> dict[str, Any]:
    from sari_ray import plan as plan_lib
    from sari_ray.config import load_config
    from sari_ray.plan_cli import make_plan

    cfg = load_config(str(FLAGSHIP))
    p = make_plan(cfg, gpu_gib=gpu_gib or plan_lib.DEFAULT_GPU_GIB)
    verdict = p.to_json()["verdict"]
    return step("plan (flagship, KubeRay pods)", "failed" if verdict == "error" else "ok",
                ("" if gpu_gib else f"no GPU: {plan_lib.DEFAULT_GPU_GIB} GiB assumed; ") + p.summary_line(),
                verdict=verdict, learner_gib=sum(p.learner.values()) / 2**30,
                engine_gib=sum(p.rollout.values()) / 2**30)


def learner_step_prediction(shape: str = "7b", dtype: str = "bfloat16", gradient_checkpointing: bool = True,
                            **batch: Any) -> float:
    """Bytes `bench learner-step` should peak at: the plan's activation arithmetic for its one micro-batch of
    prompts x G sequences, plus weights, gradients and torch AdamW's m and v (in the parameters' dtype: plain
    torch, no DeepSpeed master copy)."""
    from sari_ray import plan as plan_lib
    from sari_ray.benchmarks import SHAPES
    from sari_ray.config import audio_tokens, mel_frames

    b = {**BENCH, **batch}
    t, a = SHAPES[shape]["text"], SHAPES[shape]["audio"]
    model = plan_lib.ModelShape(hidden=t["hidden_size"], layers=t["num_hidden_layers"],
                                intermediate=t["intermediate_size"], vocab=t["vocab_size"],
                                heads=t["num_attention_heads"], kv_heads=t["num_key_value_heads"], audio_d=a["d_model"],
                                audio_layers=a["encoder_layers"], audio_ffn=a["encoder_ffn_dim"])
    params = sum(model.params().values())
    seq = audio_tokens(b["audio_seconds"]) + b["prompt_text_len"] + b["completion_len"]
    acts = plan_lib.activation_bytes(model, micro_batch=b["prompts"] * b["num_generations"], seq_len=seq,
                                     completion_len=b["completion_len"], dtype=dtype,
                                     checkpointing=gradient_checkpointing, audio_clips=b["prompts"],
                                     audio_positions=math.ceil(mel_frames(b["audio_seconds"]) / 2))
    return params * plan_lib.BYTES[dtype] * 4 + sum(acts.values())


def check_learner_step(cuda: dict | None) -> dict[str, Any]:
    if not cuda:
        return step("bench learner-step 7B", "skipped", "no CUDA device")
    from sari_ray.benchmarks import learner_step_benchmark

    r = learner_step_benchmark(shape="7b", device="cuda", dtype="bfloat16", steps=2, warmup=1,
                               gradient_checkpointing=True, **BENCH)
    predicted = learner_step_prediction() / 2**30
    ratio = r["max_memory_gib"] / predicted
    return step("bench learner-step 7B", "ok", f"{r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']:.1%}; peak "
                f"{r['max_memory_gib']:.1f} GiB vs plan {predicted:.1f} GiB ({ratio:.2f}x)", mfu=r["mfu"],
                tokens_per_s=r["tokens_per_s"], peak_gib=r["max_memory_gib"], plan_gib=predicted, ratio=ratio)


def check_sync(cuda: dict | None) -> dict[str, Any]:
    from sari_ray.benchmarks import sync_benchmark

    if not cuda:
        r = sync_benchmark("tiny", ("object_store",), repeats=1)
        return step("bench sync", "skipped", f"no CUDA device: the 7B broadcast skipped; tiny object-store path "
                    f"{r['object_store']['gb_per_s']:.2f} GB/s", gb_per_s=r["object_store"]["gb_per_s"])
    backends = ("object_store", "collective") if cuda["count"] >= 2 else ("object_store",)
    r = sync_benchmark("7b", backends, device="cuda", repeats=1)
    rates = {k: r[k]["gb_per_s"] for k in backends}
    return step("bench sync 7B", "ok", ", ".join(f"{k} {v:.2f} GB/s" for k, v in rates.items())
                + ("" if cuda["count"] >= 2 else "; collective skipped (NCCL needs 2 GPUs)"), gb_per_s=rates)


def tiny_flagship_overrides(gpus: int) -> list[str]:
    """key=value moving the tiny flagship (FLAGSHIP + TINY_OVERLAY) onto `gpus` CUDA devices (see the docstring)."""
    if gpus < 1:
        raise ValueError("the tiny flagship on CUDA needs a GPU")
    common = ["run.device=cuda", f"grpo.steps={TINY_GRPO_STEPS}", "rollout.kv_cache_memory_gb=1",
              "rollout.gpu_memory_utilization=0.3", "cluster.torch_threads_per_actor=null", "cluster.num_cpus=null"]
    if gpus == 1:
        return [*common, "learner.num_workers=1", "learner.num_gpus_per_worker=0.5",
                "rollout.num_gpus_per_worker=0.5", "learner.sync_backend=object_store"]
    return [*common, f"learner.num_workers={min(2, gpus - 1)}", "learner.num_gpus_per_worker=1",
            "rollout.num_gpus_per_worker=1", "learner.sync_backend=collective"]


def check_tiny_flagship(cuda: dict | None, timeout_s: float = TINY_TIMEOUT_S) -> dict[str, Any]:
    """`sari-ray train` of the tiny flagship on CUDA, in a scratch directory (its model, data and run)."""
    name = "tiny flagship on CUDA"
    if not cuda:
        return step(name, "skipped", "no CUDA device")
    import subprocess
    import sys
    import tempfile

    overrides = tiny_flagship_overrides(cuda["count"])
    with tempfile.TemporaryDirectory(prefix="sari-check-gpu-") as scratch:
        cmd = [sys.executable, "-m", "sari_ray.cli", "train", str(FLAGSHIP), str(TINY_OVERLAY), *overrides,
               f"run.output_dir={scratch}/run"]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return step(name, "failed", f"not done within {timeout_s:.0f} s: {' '.join(cmd[3:])}")
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            return step(name, "failed", f"exit {proc.returncode} after {seconds:.0f} s: {' | '.join(tail)[-400:]}")
        return tiny_flagship_result(name, json.loads((Path(scratch) / "run" / "summary.json").read_text()),
                                    overrides, seconds)


def tiny_flagship_result(name: str, summary: dict, overrides: list[str], seconds: float) -> dict[str, Any]:
    """ok when every GRPO step ran; the figures from the run's summary.json."""
    backend = next(o.split("=", 1)[1] for o in overrides if o.startswith("learner.sync_backend="))
    learners = next(o.split("=", 1)[1] for o in overrides if o.startswith("learner.num_workers="))
    done = summary.get("grpo_steps") == TINY_GRPO_STEPS
    return step(name, "ok" if done else "failed",
                f"{summary.get('grpo_steps')} of {TINY_GRPO_STEPS} GRPO steps with {learners} learner rank(s), "
                f"{backend} sync ({summary.get('sync_seconds', 0.0):.2f} s per sync), "
                f"{summary.get('completions_per_s', 0.0):.0f} completions/s; {seconds:.0f} s in all",
                seconds=seconds, sync_backend=backend, grpo_steps=summary.get("grpo_steps"),
                completions_per_s=summary.get("completions_per_s"), sync_seconds=summary.get("sync_seconds"))


def run_checks(packages=PACKAGES, budget_s: float = BUDGET_S) -> list[dict[str, Any]]:
    """Every step in order; a step that raises is `failed` with its error, and the rest still run while the
    budget lasts (a step started after it is spent is skipped, saying so)."""
    start = time.monotonic()
    cuda = cuda_device()
    results = [check_imports(packages),
               step("CUDA", "ok" if cuda else "skipped",
                    f"{cuda['count']} x {cuda['name']}, {cuda['memory_gib']:.0f} GiB" if cuda else "no CUDA device")]
    steps: list[tuple[str, Callable[[], dict]]] = [
        ("filled-frames patch", check_patch),
        ("plan (flagship, KubeRay pods)", lambda: check_plan(cuda["memory_gib"] if cuda else None)),
        ("tiny flagship on CUDA", lambda: check_tiny_flagship(cuda)),
        ("bench learner-step 7B", lambda: check_learner_step(cuda)),
        ("bench sync", lambda: check_sync(cuda)),
    ]
    for name, fn in steps:
        if time.monotonic() - start > budget_s:
            results.append(step(name, "skipped", f"the {budget_s:.0f} s budget is spent"))
            continue
        try:
            results.append(fn())
        except Exception as err:  # noqa: BLE001 - report and go on
            first = str(err).splitlines()[0] if str(err) else ""
            results.append(step(name, "failed", f"{type(err).__name__}: {first}"))
    return results


def register_cli(subparsers) -> None:
    check = subparsers.add_parser("check", help="environment checks")
    kinds = check.add_subparsers(dest="check_command", required=True)
    gpu = kinds.add_parser("gpu", help="the GPU profile, CUDA, the encoder patch, plan vs measured memory, sync GB/s",
                           description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    gpu.add_argument("--budget-s", type=float, default=BUDGET_S, help="stop starting steps after this long")
    gpu.set_defaults(func=lambda a: _cli(a))


def _cli(args) -> int:
    from rich.console import Console
    from rich.table import Table

    results = run_checks(budget_s=args.budget_s)
    table = Table(title="sari-ray check gpu")
    for col in ("step", "status", "detail"):
        table.add_column(col)
    for r in results:
        style = {"ok": "green", "skipped": "yellow", "failed": "red"}[r["status"]]
        table.add_row(r["step"], f"[{style}]{r['status']}", r["detail"])
    Console(highlight=False).print(table)
    print(json.dumps({"check": "gpu", "results": results}, default=str))
    return 1 if any(r["status"] == "failed" for r in results) else 0
