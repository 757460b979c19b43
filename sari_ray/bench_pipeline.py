"""`sari-ray bench pipeline`: the same short GRPO run twice on this machine, synchronous (rollout.max_staleness=0)
then asynchronous (1): their throughput per wall-second of a whole step, and the peak memory (PSS) of each run.
`--compare rollout-workers`: one rollout worker against two, asynchronous, at a step where generation dominates
(16 prompts x 4 completions of up to 128 tokens): what adding a rollout worker buys. `--compare sync-backend`:
the object-store sync against the collective broadcast, both asynchronous: what the broadcast's barrier (it waits
for the generation in flight) costs when the transfer itself is small.

Tiny random Qwen2-Audio, synthetic data, no SFT, G=4, 64-token completions, 1 rollout worker + 1 learner with one
thread each: real Ray, vLLM and DeepSpeed, as `sari-ray train` runs them. Random weights are fine for timing.
The first `--warmup` steps of each run (engine and kernel warm-up) are left out of the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# --compare: the two runs' overrides (the speedup is the first's step time over the second's)
COMPARISONS = {
    "staleness": {"sync": ["rollout.max_staleness=0"], "async": ["rollout.max_staleness=1"]},
    "rollout-workers": {"1 worker": ["rollout.max_staleness=1"],
                        "2 workers": ["rollout.max_staleness=1", "rollout.num_workers=2", "cluster.num_cpus=3"]},
    "sync-backend": {"object store": ["rollout.max_staleness=1", "learner.sync_backend=object_store"],
                     "collective": ["rollout.max_staleness=1", "learner.sync_backend=collective"]},
}
GENERATION_HEAVY = ["grpo.prompts_per_step=16", "grpo.max_completion_length=128", "rollout.max_model_len=1024"]

# What the benchmark fixes, on top of configs/demo_cpu.yaml (the setting: 1 + 1 actors, one thread each).
BENCH_OVERRIDES = [
    "sft.steps=0", "grpo.num_generations=4", "grpo.max_completion_length=64", "grpo.prompts_per_step=8",
    "rollout.num_workers=1", "learner.num_workers=1", "cluster.torch_threads_per_actor=1", "cluster.num_cpus=2",
    "grpo.vllm_importance_sampling_correction=true", "eval.max_samples=1", "eval.silent_audio=false",
    "checkpoint.every=1000", "tracking.completions_table_every=0", "curriculum.mode=shuffled",
    # the data it was measured on: the one-tier demo's 500 items (configs/overlays/demo_one_tier.yaml)
    "data.synth_if_missing=500", "data.synth_set=mixed", "data.eval_fraction=0.2", "curriculum.num_tiers=1",
]


def pipeline_benchmark(steps: int = 20, warmup: int = 2, workdir: str | None = None,
                       extra_overrides: list[str] | None = None, compare: str = "staleness") -> dict[str, Any]:
    from sari_ray.train_cli import demo_config_path

    root = Path(workdir or tempfile.mkdtemp(prefix="sari-bench-pipeline-"))
    out: dict[str, Any] = {}
    heavy = GENERATION_HEAVY if compare == "rollout-workers" else []
    for mode, mode_overrides in COMPARISONS[compare].items():
        overrides = [*BENCH_OVERRIDES, *heavy, f"grpo.steps={steps}", *mode_overrides,
                     f"model.path={root / 'tiny-qwen2-audio'}", f"data.train={root / 'data' / 'data.jsonl'}",
                     f"run.output_dir={root / mode.replace(' ', '_')}", *(extra_overrides or [])]
        out[mode] = _timed_run([str(demo_config_path())], overrides, warmup)
    first, second = COMPARISONS[compare]
    out["speedup"] = out[first]["step_s"] / out[second]["step_s"]
    out["encoder_forwards_per_clip_per_pass"] = out[second].pop("encoder_forwards_per_clip_per_pass")
    out[first].pop("encoder_forwards_per_clip_per_pass")
    return out


def _timed_run(configs: list[str], overrides: list[str], warmup: int) -> dict[str, Any]:
    """One run, step by step as `Trainer.fit` does it, timing the steps after the warm-up; and the peak memory of
    the whole process tree (this driver, the local Ray cluster, its actors) from start to shutdown."""
    from sari_ray.config import load_config
    from sari_ray.resources import PeakPSS
    from sari_ray.train import Trainer

    cfg = load_config(configs, overrides)
    # one sample every 5 s: reading the tree's memory maps takes ~0.25 s of a core (20 processes), so finer
    # sampling would slow the run it measures; the peak is the steady state (weights, KV cache) after start
    with PeakPSS(interval_s=5.0) as peak:
        trainer = Trainer(cfg)
        try:
            trainer.sft()  # sft.steps=0: straight to GRPO
            per_step, t0 = [], None
            for step in range(1, cfg.grpo.steps + 1):
                if step == warmup + 1:
                    t0 = time.perf_counter()
                trainer.state["step"] = step
                per_step.append(trainer.grpo_step(step))
            wall = time.perf_counter() - t0
            trainer.tracker.finish()
        finally:
            trainer.shutdown()
    measured = per_step[warmup:]
    completions = len(measured) * cfg.grpo.prompts_per_step * cfg.grpo.num_generations
    tokens = sum(m["throughput/tokens_per_s"] * m["time/step"] for m in measured)
    phases = sorted({k for m in measured for k in m if k.startswith("time/") and not k.endswith("_frac")})
    encoder = [m["learn/encoder_forwards_per_clip_per_pass"] for m in measured
               if "learn/encoder_forwards_per_clip_per_pass" in m]
    return {"completions_per_s": completions / wall, "tokens_per_s": tokens / wall, "step_s": wall / len(measured),
            "steps": len(measured), "peak_pss_gib": peak.peak_bytes / 2**30,
            "phases": {k.removeprefix("time/"): statistics.fmean(m.get(k, 0.0) for m in measured) for k in phases},
            "rollout_busy_frac": statistics.fmean(m["time/rollout_busy_frac"] for m in measured),
            "learner_busy_frac": statistics.fmean(m["time/learner_busy_frac"] for m in measured),
            "encoder_forwards_per_clip_per_pass": max(encoder) if encoder else None}


def add_parser(kinds) -> None:
    p = kinds.add_parser("pipeline", help="a short GRPO run synchronous then asynchronous on this machine "
                                          "(completions/s, tokens/s, speedup)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the figures")
    p.add_argument("--workdir", default=None, help="where the model, data and runs go (default: a temp dir)")
    p.add_argument("--compare", choices=sorted(COMPARISONS), default="staleness",
                   help="staleness: synchronous vs asynchronous; rollout-workers: 1 vs 2 rollout workers "
                        "(asynchronous, generation-heavy steps); sync-backend: object store vs collective "
                        "(asynchronous)")
    p.add_argument("--json", action="store_true", help="last line: the figures as one JSON object")
    p.add_argument("overrides", nargs="*", help="extra config overrides (key=value) for both runs")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.steps <= args.warmup:
        raise ValueError(f"--steps={args.steps} must exceed --warmup={args.warmup}")
    result = pipeline_benchmark(args.steps, args.warmup, args.workdir, args.overrides, args.compare)
    for mode in COMPARISONS[args.compare]:
        r = result[mode]
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items())
        print(f"{mode:12s}: {r['step_s']:.2f} s/step, {r['completions_per_s']:.1f} completions/s, "
              f"{r['tokens_per_s']:.0f} tokens/s, rollout busy {r['rollout_busy_frac']:.0%}, "
              f"learner busy {r['learner_busy_frac']:.0%}, peak memory {r['peak_pss_gib']:.2f} GiB PSS "
              f"(phases, s: {phases})")
    print(f"speedup {result['speedup']:.2f}x; audio encoder forwards per clip per pass: "
          f"{result['encoder_forwards_per_clip_per_pass']}")
    if args.json:
        print(json.dumps(result))
    return 0
