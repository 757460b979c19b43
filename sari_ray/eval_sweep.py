"""Checkpoint sweep: evaluate every `RUN_DIR/checkpoints/step_*/model`, tabulate, plot, log to MLflow.

    sari-ray eval --run runs/NAME [--data FILE] [--limit N]

Why: GRPO on audio QA is noisy from run to run and the best checkpoint is often an early one (R1-AQA's
users evaluate every ~100 steps for that reason). The sweep evaluates them all the same way, marks the
best, and shows which checkpoints are inside the best one's 95% interval, i.e. not distinguishable from it.

Outputs in RUN_DIR/eval_sweep/: step_XXXXXX/ (predictions, metrics, report per checkpoint), sweep.csv,
sweep.md, accuracy_vs_step.png; and `sweep/accuracy` per step in the run's own MLflow run (run id and
tracking URI from the checkpoint's trainer_state.json). Checkpoints already evaluated with the same
settings are reused, so a sweep can be re-run while training adds checkpoints. One engine serves all
checkpoints: each one's weights are pushed into it in place and verified by checksum (an engine start
costs ~30 s on CPU, minutes on GPU); `--fresh-engine` starts one per checkpoint instead. A checkpoint
whose evaluation stopped part-way continues from its predictions file when the settings are the same.

This module also owns the `sari-ray eval` command line: a single checkpoint goes to
`evaluate.checkpoint_command`, `--run` is swept here. That way `evaluate` never imports this module (which
reaches the trainer's data preparation), so `evaluate` stays importable by the rollout actor without a cycle.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from sari_ray import evaluate

STEP_RE = re.compile(r"step_(\d+)$")
REUSE_KEYS = ("data", "style", "max_tokens", "audio_mode", "temperature", "seed")


class SweepLoggingError(RuntimeError):
    """The sweep finished and wrote its files, but could not log to the run's MLflow run."""


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, checkpoint dir) of every complete checkpoint, by step.

    Complete = model/config.json and trainer_state.json (the trainer writes that last); an incomplete one
    (being written, or a crash) is named and left out rather than evaluated half-written.
    """
    found = []
    for path in sorted((Path(run_dir) / "checkpoints").glob("step_*")):
        m = STEP_RE.search(path.name)
        if not m:
            continue
        if (path / "model" / "config.json").is_file() and (path / "trainer_state.json").is_file():
            found.append((int(m.group(1)), path))
        else:
            print(f"sweep: {path} is incomplete (no model/config.json or trainer_state.json); left out", flush=True)
    return sorted(found)


def _resolve(path: str | None, run_dir: Path) -> str | None:
    """A path from the run's config: as written if it exists (relative to the cwd), else next to the run."""
    if path is None or Path(path).is_absolute() or Path(path).exists():
        return path
    for base in (run_dir, *run_dir.parents):
        if (base / path).exists():
            return str(base / path)
    return path


def run_config(run_dir: Path):
    """RUN_DIR/config.yaml loaded and validated as the trainer did, data paths made findable from here."""
    from omegaconf import OmegaConf

    from sari_ray.config import load_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a sweep needs the run's resolved config (or is this not a run dir?)")
    raw = OmegaConf.load(path)
    fixes = [f"data.{k}={_resolve(raw.data.get(k), run_dir)}" for k in ("train", "eval", "audio_dir")
             if raw.data.get(k) is not None]
    return load_config(path, fixes)


def sweep_samples(run_dir: Path, cfg, data: str | None, format: str | None, audio_dir: str | None,
                  limit: int | None) -> tuple[list, str]:
    """(samples, description): `data` if given, else the run's data.eval, else the very held-out split the
    trainer made off data.train (same reader, validation policy, fraction and seed)."""
    if data:
        samples = evaluate.read_eval_samples(data, format or cfg.data.format, audio_dir or cfg.data.audio_dir, limit)
        return samples, str(data)
    from rich.console import Console

    from sari_ray.data.prepare import prepare_data

    _, held_out = prepare_data(cfg, Console(stderr=True))
    what = cfg.data.eval or f"{cfg.data.train} (held-out split, eval_fraction={cfg.data.eval_fraction}, seed={cfg.run.seed})"
    return held_out[:limit] if limit else held_out, what


def _reusable(metrics_path: Path, wanted: dict[str, Any], n_items: int) -> dict[str, Any] | None:
    """A checkpoint's earlier metrics, if made with the same settings on as many items."""
    if not metrics_path.is_file():
        return None
    metrics = json.loads(metrics_path.read_text())
    meta = metrics.get("meta", {})
    same = all(meta.get(k) == wanted[k] for k in REUSE_KEYS) and metrics.get("num_samples") == wanted["num_samples"]
    return metrics if same and metrics.get("n_items") == n_items else None


def load_checkpoint_weights(engine: Any, model_dir: Path, version: int, dtype: str = "float32",
                            bucket_mb: float = 256.0) -> int:
    """Push a checkpoint's safetensors into a running engine (no restart), verified by checksum.

    Why: an engine start costs ~30 s on CPU and minutes on GPU per checkpoint; reading the weights does
    not. Tensors are grouped by layer across shard files (vLLM finalises a layer only when all of it came in
    one reload call) and streamed bucket by bucket, so the whole checkpoint is never in memory twice.
    """
    from collections import defaultdict

    import torch
    from safetensors import safe_open
    from safetensors.torch import save

    from sari_ray.engines.weight_buckets import layer_group, tensors_checksum

    where: dict[str, Path] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            where.update({name: shard for name in f.keys()})
    if engine.arch == "qwen2.5-omni":  # the engine holds the thinker only, without its vision tower
        where = {k: v for k, v in where.items() if k.startswith("thinker.") and not k.startswith("thinker.visual.")}
    groups: dict[str, list[str]] = defaultdict(list)
    for name in where:
        groups[layer_group(name)].append(name)
    dtype = getattr(torch, str(dtype).replace("torch.", ""))  # as vLLM casts on load: same checksum
    checksum, bucket, size, limit = 0.0, {}, 0, int(bucket_mb * 2**20)

    def flush():
        nonlocal bucket, size
        if bucket:
            engine.load_weights([save(bucket)], version)
            bucket, size = {}, 0

    for names in groups.values():
        tensors = {}
        for name in names:
            with safe_open(str(where[name]), "pt") as f:
                t = f.get_tensor(name)
            tensors[name] = t.to(dtype) if t.is_floating_point() else t
        checksum += tensors_checksum(tensors.values())
        group_size = sum(t.numel() * t.element_size() for t in tensors.values())
        if bucket and size + group_size > limit:
            flush()
        bucket.update(tensors)
        size += group_size
    flush()
    loaded = engine.weights_checksum()
    if not math.isclose(loaded, checksum, rel_tol=1e-6, abs_tol=1e-3):
        raise RuntimeError(f"weights of {model_dir} did not load into the engine intact (checksum {loaded} vs "
                           f"{checksum}); rerun with --fresh-engine")
    return len(where)


def sweep_run(run_dir: str | Path, *, data: str | None = None, format: str | None = None,
              audio_dir: str | None = None, style: str | None = None, max_tokens: int | None = None,
              limit: int | None = None, skip_missing: bool = False, audio_mode: str = "real",
              num_samples: int = 1, temperature: float | None = None, seed: int = 0, batch_size: int = 64,
              progress: bool = True, engine_kwargs: dict[str, Any] | None = None, reuse: bool = True,
              fresh_engine: bool = False, log_mlflow: bool = True) -> list[dict[str, Any]]:
    """Evaluate each checkpoint, write the table and plot, log to MLflow. Returns one row per checkpoint.

    Settings not given come from the run's config.yaml (prompt.style, grpo.max_completion_length,
    rollout.max_model_len, model.dtype; the questions as in `sweep_samples`). One engine serves every
    checkpoint (weights reloaded in place, checksum-verified) unless `fresh_engine`.
    """
    run_dir = Path(run_dir)
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"no complete checkpoints/step_*/ (model/ + trainer_state.json) under {run_dir}")
    cfg = run_config(run_dir)
    samples, what = sweep_samples(run_dir, cfg, data, format, audio_dir, limit)
    _, skipped = evaluate.split_missing(samples, skip_missing, progress=progress)  # before any engine starts
    if skipped:
        print(f"sweep: skipping {len(skipped)} of {len(samples)} items (audio missing or undecodable):\n"
              f"{evaluate.describe_problems(skipped)}", file=sys.stderr, flush=True)
    style, max_tokens = style or cfg.prompt.style, max_tokens or cfg.grpo.max_completion_length
    if temperature is None:
        temperature = 0.0 if num_samples == 1 else 1.0
    engine_kwargs = {"max_model_len": cfg.rollout.max_model_len, "dtype": cfg.model.dtype,
                     **{k: v for k, v in (engine_kwargs or {}).items() if v is not None}}
    out_root = run_dir / "eval_sweep"
    wanted = {"data": what, "style": str(style), "max_tokens": max_tokens, "audio_mode": audio_mode,
              "temperature": temperature, "seed": seed, "num_samples": num_samples}
    rows, engine, processor = [], None, None
    try:
        for step, ckpt in checkpoints:
            out = out_root / f"step_{step:06d}"
            metrics = _reusable(evaluate.output_paths(out, audio_mode)["metrics"], wanted, len(samples)) if reuse else None
            if metrics is None:
                meta = {"model": str(ckpt / "model"), "data": what, "step": step}
                settings = evaluate.eval_settings(style=style, audio_mode=audio_mode, temperature=temperature,
                                                  max_tokens=max_tokens, seed=seed, num_samples=num_samples, meta=meta)
                resume = reuse and evaluate.resumable(out, audio_mode, settings)
                print(f"sweep: step {step}: {'continuing' if resume else 'evaluating'} {ckpt / 'model'}", flush=True)
                if engine is not None and fresh_engine:
                    engine.shutdown()
                    engine = None
                if engine is None:
                    engine, processor = evaluate.load_engine(ckpt / "model", seed=seed, **engine_kwargs)
                else:
                    load_checkpoint_weights(engine, ckpt / "model", step, engine_kwargs.get("dtype") or "float32")
                metrics = evaluate.evaluate_samples(
                    engine, processor, samples, style=style, num_samples=num_samples, temperature=temperature,
                    max_tokens=max_tokens, audio_mode=audio_mode, skip_missing=skip_missing, batch_size=batch_size,
                    progress=progress, seed=seed, out_dir=out, meta=meta, resume=resume)
            rows.append(_row(step, ckpt, metrics))
    finally:
        if engine is not None:
            engine.shutdown()
    best = write_sweep(rows, out_root)
    if log_mlflow:
        try:
            log_sweep_to_mlflow(rows, checkpoints[-1][1], out_root, best)
        except Exception as e:  # server down, run deleted: the results on disk stand, say what did not happen
            raise SweepLoggingError(f"sweep results are in {out_root}, but logging them to MLflow failed: "
                                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Rerun when the "
                                    "tracking server is reachable (evaluated checkpoints are reused), or pass "
                                    "--no-mlflow") from e
    return rows


def _row(step: int, ckpt: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    total = metrics["total"]
    row = {"step": step, "accuracy": total["accuracy"], "ci_low": total["ci95"][0], "ci_high": total["ci95"][1],
           "correct": total["correct"], "n": total["n"], "n_skipped": metrics["n_skipped_missing_audio"],
           "n_no_answer": metrics["n_no_answer"], "checkpoint": str(ckpt / "model")}
    row.update({f"acc_{task}": b["accuracy"] for task, b in metrics["by_task"].items()})
    return row


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Highest accuracy; the earliest step among equals (cheaper to have trained, less drift)."""
    return max(rows, key=lambda r: (r["accuracy"], -r["step"]))


def write_sweep(rows: list[dict[str, Any]], out_root: Path) -> dict[str, Any]:
    """sweep.csv, sweep.md (best marked, steps within its 95% CI flagged) and accuracy_vs_step.png."""
    out_root.mkdir(parents=True, exist_ok=True)
    best = best_row(rows)
    for r in rows:
        r["is_best"] = r is best
        r["within_best_ci"] = best["ci_low"] <= r["accuracy"] <= best["ci_high"]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_root / "sweep.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tasks = [k for k in fields if k.startswith("acc_")]
    lines = ["| step | accuracy % [95% CI] | n | " + " | ".join(t[4:] for t in tasks) + " | |",
             "|" + "---|" * (4 + len(tasks))]
    for r in rows:
        mark = "**best**" if r["is_best"] else ("within best's CI" if r["within_best_ci"] else "")
        lines.append(f"| {r['step']} | {100 * r['accuracy']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
                     f" | {r['n']} | " + " | ".join(f"{100 * r[t]:.1f}" if t in r else "—" for t in tasks)
                     + f" | {mark} |")
    skipped = max(r["n_skipped"] for r in rows)
    if skipped:
        lines += ["", f"> {skipped} items skipped for missing audio: accuracies are over {best['n']} items."]
    (out_root / "sweep.md").write_text("\n".join(lines) + "\n")
    plot_sweep(rows, best, out_root / "accuracy_vs_step.png")
    return best


def plot_sweep(rows: list[dict[str, Any]], best: dict[str, Any], path: Path) -> Path:
    """Accuracy vs step with 95% CI bars, per-task lines, the best starred and its CI shaded.

    Uses the Agg canvas directly (no pyplot), so it works headless and leaves a notebook's backend alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [r["step"] for r in rows]
    acc = [100 * r["accuracy"] for r in rows]
    err = [[a - 100 * r["ci_low"] for a, r in zip(acc, rows)], [100 * r["ci_high"] - a for a, r in zip(acc, rows)]]
    ax.axhspan(100 * best["ci_low"], 100 * best["ci_high"], color="tab:orange", alpha=0.12,
               label="best's 95% CI")
    ax.errorbar(steps, acc, yerr=err, marker="o", capsize=3, color="tab:blue", label="total (95% CI)")
    for task in sorted({k for r in rows for k in r if k.startswith("acc_")}):
        ax.plot(steps, [100 * r.get(task, float("nan")) for r in rows], lw=1, alpha=0.6, label=task[4:])
    ax.plot([best["step"]], [100 * best["accuracy"]], marker="*", ms=16, color="tab:orange", ls="none",
            label=f"best: step {best['step']} ({100 * best['accuracy']:.1f}%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Checkpoint sweep (n = {best['n']} items)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return path


def log_sweep_to_mlflow(rows: list[dict[str, Any]], ckpt: Path, out_root: Path, best: dict[str, Any]) -> bool:
    """Log `sweep/accuracy` (and per task) per step into the run's existing MLflow run, plus the artifacts.

    The run may be finished; MlflowClient logs into it by id without reopening it. No trainer_state.json
    or no run id: say so and skip (the files on disk are the result either way).
    """
    state_path = ckpt / "trainer_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    run_id, uri = state.get("mlflow_run_id"), state.get("tracking_uri")
    if not run_id:
        print(f"sweep: {state_path} names no mlflow_run_id; not logging to MLflow", flush=True)
        return False
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    now = int(time.time() * 1000)
    metrics = []
    for r in rows:
        for key, value in r.items():
            if key == "accuracy" or key.startswith("acc_"):
                name = "sweep/accuracy" if key == "accuracy" else f"sweep/accuracy_{key[4:]}"
                metrics.append(Metric(name, float(value), now, r["step"]))
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i: i + 500])
    client.set_tag(run_id, "sweep.best_step", str(best["step"]))
    for name in ("sweep.csv", "sweep.md", "accuracy_vs_step.png"):
        client.log_artifact(run_id, str(out_root / name), artifact_path="eval_sweep")
    return True


# -------------------------------------------------------------------------------------------------- CLI
def _usage_error(args: argparse.Namespace) -> str | None:
    if args.run and (args.model or args.out):
        return "--run sweeps the run's own checkpoints into RUN_DIR/eval_sweep; drop --model / --out"
    if args.run and args.resume:
        return "--run continues by itself (evaluated checkpoints are reused, a stopped one resumes); drop --resume"
    if not args.run and not (args.model and args.data and args.out):
        return "give --model, --data and --out (or --run RUN_DIR for a sweep)"
    for name in ("samples", "batch_size", "max_tokens", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}"
    return None


def _sweep_command(args: argparse.Namespace) -> int:
    engine_kwargs = {"max_model_len": args.max_model_len, "dtype": args.dtype,
                     "gpu_memory_utilization": args.gpu_memory_utilization}
    fmt = args.format or (("mmau" if str(args.data).endswith(".json") else "jsonl") if args.data else None)
    try:
        rows = sweep_run(args.run, data=args.data, format=fmt, audio_dir=args.audio_dir, style=args.style,
                         max_tokens=args.max_tokens, limit=args.limit, skip_missing=args.skip_missing,
                         audio_mode=args.audio, engine_kwargs=engine_kwargs, fresh_engine=args.fresh_engine,
                         log_mlflow=not args.no_mlflow, num_samples=args.samples, temperature=args.temperature,
                         batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress)
    except evaluate.EvalInterrupted as e:
        print(f"sari-ray eval: {e}".replace("with --resume", "(the sweep resumes it)"), file=sys.stderr)
        return 2 if isinstance(e.cause, (OSError, ValueError)) else 1
    except (OSError, ValueError) as e:  # AudioCheckError, DataFormatError, ConfigError, a bad path
        print(f"sari-ray eval: {e}", file=sys.stderr)
        return 2
    except SweepLoggingError as e:  # results written, MLflow not reached
        print(f"sari-ray eval: {e}", file=sys.stderr)
        return 1
    best = best_row(rows)
    print(f"swept {len(rows)} checkpoints; best: step {best['step']} ({100 * best['accuracy']:.1f}% "
          f"[{100 * best['ci_low']:.1f}, {100 * best['ci_high']:.1f}]); table and plot in "
          f"{Path(args.run) / 'eval_sweep'}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    """`sari-ray eval`: usage checks, then one checkpoint (`evaluate.checkpoint_command`) or a sweep (`--run`)."""
    problem = _usage_error(args)
    if problem:
        print(f"sari-ray eval: {problem}", file=sys.stderr)
        return 2
    return _sweep_command(args) if args.run else evaluate.checkpoint_command(args)


def register_cli(subparsers: Any) -> None:
    """Add `eval` (single checkpoint, or `--run` for a checkpoint sweep)."""
    p = subparsers.add_parser("eval", help="evaluate a checkpoint (MMAU rule, 95%% CIs) or sweep a run's checkpoints",
                              description=evaluate.__doc__.splitlines()[0])
    p.add_argument("--model", help="HF checkpoint directory")
    p.add_argument("--data", help="questions: MMAU .json, R1-AQA or sari-ray jsonl (sweep default: the run's held-out set)")
    p.add_argument("--out", help="output directory: predictions.jsonl, metrics.json, report.md")
    p.add_argument("--run", help="training run directory: evaluate every checkpoints/step_*/model")
    p.add_argument("--format", choices=("mmau", "r1aqa", "jsonl"), default=None,
                   help="format of --data (default: mmau for .json, else jsonl; sweep: the run's data.format)")
    p.add_argument("--audio-dir", default=None, help="directory the data's audio paths are relative to")
    p.add_argument("--style", choices=("implicit", "free", "structured"), default=None,
                   help="prompt style (default structured; sweep: the run's prompt.style)")
    p.add_argument("--samples", type=int, default=1, metavar="K",
                   help="completions per item; K > 1 adds pass@k and majority vote (temperature 1.0)")
    p.add_argument("--temperature", type=float, default=None, help="default: 0 (greedy) for K=1, 1.0 for K>1")
    p.add_argument("--audio", choices=evaluate.AUDIO_MODES, default="real",
                   help="silence / noise: replace every clip (same duration) to measure text-only accuracy")
    p.add_argument("--skip-missing", action="store_true",
                   help="evaluate the items whose audio exists and decodes; the report lists the skipped ones")
    p.add_argument("--resume", action="store_true",
                   help="continue the predictions already in --out (same settings; ids already predicted are skipped)")
    p.add_argument("--batch-size", type=int, default=64, help="items per engine call")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="completion budget (default 256; sweep: the run's grpo.max_completion_length)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items (quick looks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="vLLM context (default 2048; sweep: the run's rollout.max_model_len); 30 s of audio = 750 tokens")
    p.add_argument("--dtype", default=None, help="vLLM dtype (default: the engine's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM KV-cache fraction (on CPU: of RAM; default: the engine's, 0.3)")
    p.add_argument("--fresh-engine", action="store_true",
                   help="sweep: start an engine per checkpoint instead of reloading weights into one")
    p.add_argument("--no-mlflow", action="store_true", help="sweep: do not log sweep/accuracy to the run's MLflow run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=eval_command)
