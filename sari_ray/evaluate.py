"""Evaluate a checkpoint on MMAU-style multiple-choice audio questions, or sweep every checkpoint of a run.

    sari-ray eval --model CKPT --data mmau-test-mini.json --format mmau --audio-dir DIR --out OUT
    sari-ray eval --model CKPT --data ... --audio silence --out OUT   # same OUT: report shows both
    sari-ray eval --run runs/NAME                                    # sweep checkpoints/step_*/model

Why it looks like this:
- Scoring is `sari_ray.mmau` (the official token rule after answer extraction), the same reading the GRPO
  reward uses, so training optimises what is reported here.
- Every number carries a Wilson 95% interval (`eval_stats`): run-to-run variance is R1-AQA users' main
  pain, and a sweep's "best" checkpoint is often within the noise of its neighbours.
- A missing audio file stops the run before any generation, listing every missing file at once;
  `--skip-missing` evaluates the rest and the report states how many were skipped. The denominator is
  never shrunk silently (the official MMAU script does exactly that).
- `--audio silence|noise` swaps every clip for silence / noise of the same duration: the accuracy left is
  what the text alone earns. R1-AQA lost its audio silently once; this check would have caught it.

`generate_predictions` needs only an engine and a processor, so a Ray rollout actor can call it with its
own engine; vLLM and torch are imported lazily.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from sari_ray.data.schema import AudioMCQ

AUDIO_MODES = ("real", "silence", "noise")
MAX_LISTED = 50  # missing files printed in full up to this many (all are in the exception's `.missing`)


class MissingAudioError(FileNotFoundError):
    """Audio files that do not exist; raised before any generation so no engine time is wasted."""

    def __init__(self, missing: Sequence[tuple[str, str]], n_items: int):
        self.missing = list(missing)
        listed = "\n".join(f"  {sample_id}: {path}" for sample_id, path in self.missing[:MAX_LISTED])
        more = f"\n  ... and {len(self.missing) - MAX_LISTED} more" if len(self.missing) > MAX_LISTED else ""
        super().__init__(
            f"{len(self.missing)} of {n_items} audio files are missing (nothing was generated):\n{listed}{more}\n"
            "Fix --audio-dir, or pass --skip-missing to evaluate the rest (the report then says the total is "
            "over fewer items).")


def find_missing_audio(samples: Sequence[AudioMCQ]) -> list[tuple[str, str]]:
    """(id, path) of every sample whose audio file does not exist."""
    return [(s.id, s.audio) for s in samples if not Path(s.audio).is_file()]


def split_missing(samples: Sequence[AudioMCQ], skip_missing: bool) -> tuple[list[AudioMCQ], list[dict[str, str]]]:
    """(samples to evaluate, skipped) or MissingAudioError listing all missing files."""
    missing = find_missing_audio(samples)
    if missing and not skip_missing:
        raise MissingAudioError(missing, len(samples))
    gone = {sample_id for sample_id, _ in missing}
    return [s for s in samples if s.id not in gone], [{"id": i, "audio": p} for i, p in missing]


def replace_audio(samples: np.ndarray, mode: str, key: str) -> np.ndarray:
    """The clip for `mode`: as is, silence of the same length, or white noise of the same length and RMS.

    Same duration, so the prompt's audio token count (and the position of the text) does not change: only
    the information in the audio goes. Noise is seeded by the sample id, so reruns are identical.
    """
    if mode == "real":
        return samples
    if mode == "silence":
        return np.zeros_like(samples)
    if mode == "noise":
        rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        noise = rng.standard_normal(samples.shape[0]) * (rms or 0.05)
        return np.clip(noise, -1.0, 1.0).astype(np.float32)
    raise ValueError(f"unknown audio mode {mode!r}; valid: {', '.join(AUDIO_MODES)}")


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="item", dynamic_ncols=True)


def generate_predictions(engine: Any, processor: Any, samples: Sequence[AudioMCQ], *, style: str,
                         num_samples: int = 1, temperature: float | None = None, max_tokens: int = 256,
                         audio_mode: str = "real", batch_size: int = 64, progress: bool = True, seed: int = 0,
                         max_audio_seconds: float = 30.0) -> list[dict[str, Any]]:
    """Generate and judge: one record per sample, in order.

    Record: id, model_output (first output), extracted, correct, finish_reason; with num_samples K > 1 also
    outputs / extracted_all / correct_all (K each). temperature None: greedy for K = 1, 1.0 for K > 1.
    Audio is decoded one batch at a time, so memory stays bounded on the full benchmark.
    """
    from sari_ray.answers import extract_answer, listed_choices
    from sari_ray.data.audio import load_audio
    from sari_ray.mmau import judge
    from sari_ray.prompts import build_messages, render_prompt

    if audio_mode not in AUDIO_MODES:
        raise ValueError(f"unknown audio mode {audio_mode!r}; valid: {', '.join(AUDIO_MODES)}")
    if temperature is None:
        temperature = 0.0 if num_samples == 1 else 1.0
    records: list[dict[str, Any]] = []
    with _progress(len(samples), progress, f"eval ({audio_mode} audio)") as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start: start + batch_size]
            prompts = [render_prompt(build_messages(s, style), processor) for s in batch]
            audios = [replace_audio(load_audio(s.audio, max_seconds=max_audio_seconds).samples, audio_mode, s.id)
                      for s in batch]
            outs = engine.generate(prompts, audios, n=num_samples, temperature=temperature,
                                   max_tokens=max_tokens, seed=seed)
            for s, completions in zip(batch, outs):
                texts = [c.text for c in completions]
                choices = listed_choices(s)  # a letter names the option at that position of the listing
                extracted = [extract_answer(t, choices) for t in texts]
                correct = [judge(t, choices, s.answer) for t in texts]
                record = {"id": s.id, "model_output": texts[0], "extracted": extracted[0], "correct": correct[0],
                          "finish_reason": completions[0].finish_reason}
                if num_samples > 1:
                    record.update(outputs=texts, extracted_all=extracted, correct_all=correct)
                records.append(record)
            bar.update(len(batch))
    return records


def _suffix(audio_mode: str) -> str:
    return "" if audio_mode == "real" else f".{audio_mode}"


def write_outputs(out_dir: str | Path, records: Sequence[dict[str, Any]], metrics: dict[str, Any],
                  audio_mode: str = "real") -> dict[str, Path]:
    """predictions[.mode].jsonl, metrics[.mode].json, and report.md rebuilt from every metrics file in
    `out_dir`, so a silence run next to a real one shows both side by side."""
    from sari_ray.eval_stats import render_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"predictions": out / f"predictions{_suffix(audio_mode)}.jsonl",
             "metrics": out / f"metrics{_suffix(audio_mode)}.json", "report": out / "report.md"}
    with open(paths["predictions"], "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    paths["metrics"].write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    paths["report"].write_text(render_report(read_metrics(out)))
    return paths


def read_metrics(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """audio mode -> metrics, for every metrics[.mode].json in `out_dir`."""
    found = {}
    for mode in AUDIO_MODES:
        path = Path(out_dir) / f"metrics{_suffix(mode)}.json"
        if path.is_file():
            found[mode] = json.loads(path.read_text())
    return found


def evaluate_samples(engine: Any, processor: Any, samples: Sequence[AudioMCQ], *, style: str,
                     num_samples: int = 1, temperature: float | None = None, max_tokens: int = 256,
                     audio_mode: str = "real", skip_missing: bool = False, batch_size: int = 64,
                     progress: bool = True, seed: int = 0, out_dir: str | Path | None = None,
                     meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check audio, generate, score (MMAU rule, 95% CIs, pass@k and majority vote when K > 1), and write
    predictions / metrics / report to `out_dir` when given. Returns the metrics dict."""
    from sari_ray.eval_stats import summarize

    present, skipped = split_missing(samples, skip_missing)
    if temperature is None:
        temperature = 0.0 if num_samples == 1 else 1.0
    started = time.perf_counter()
    records = generate_predictions(engine, processor, present, style=str(style), num_samples=num_samples,
                                   temperature=temperature, max_tokens=max_tokens, audio_mode=audio_mode,
                                   batch_size=batch_size, progress=progress, seed=seed)
    elapsed = time.perf_counter() - started
    meta = {**(meta or {}), "style": str(style), "audio_mode": audio_mode, "temperature": temperature,
            "max_tokens": max_tokens, "seed": seed, "elapsed_s": elapsed,
            "items_per_s": len(present) / elapsed if elapsed > 0 else None,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    metrics = summarize(present, records, num_samples=num_samples, skipped=skipped, meta=meta)
    if out_dir is not None:
        write_outputs(out_dir, records, metrics, audio_mode)
    return metrics


def load_engine(model_path: str | Path, *, seed: int = 0, **engine_kwargs: Any) -> tuple[Any, Any]:
    """(VLLMEngine, processor) for a checkpoint directory. The caller shuts the engine down."""
    from transformers import AutoProcessor

    from sari_ray.engines.vllm_engine import VLLMEngine

    processor = AutoProcessor.from_pretrained(str(model_path))
    engine = VLLMEngine(str(model_path), seed=seed, **{k: v for k, v in engine_kwargs.items() if v is not None})
    return engine, processor


def read_eval_samples(data: str | Path, format: str = "jsonl", audio_dir: str | Path | None = None,
                      limit: int | None = None) -> list[AudioMCQ]:
    from sari_ray.data.readers import read_samples

    samples = read_samples(data, format=format, audio_dir=audio_dir)
    return list(samples[:limit] if limit else samples)


def evaluate_model(model: str | Path, data: str | Path, out_dir: str | Path | None, *, format: str = "jsonl",
                   audio_dir: str | Path | None = None, style: str = "structured", limit: int | None = None,
                   skip_missing: bool = False, engine_kwargs: dict[str, Any] | None = None,
                   samples: Sequence[AudioMCQ] | None = None, **eval_kwargs: Any) -> dict[str, Any]:
    """Read the data, check every audio file (before the engine starts), evaluate, shut the engine down."""
    if samples is None:
        samples = read_eval_samples(data, format, audio_dir, limit)
    split_missing(samples, skip_missing)  # fail fast: an engine start costs ~30 s on CPU, minutes on GPU
    engine, processor = load_engine(model, seed=eval_kwargs.get("seed", 0), **(engine_kwargs or {}))
    try:
        meta = {"model": str(model), "data": str(data), "format": format}
        return evaluate_samples(engine, processor, samples, style=style, skip_missing=skip_missing,
                                out_dir=out_dir, meta=meta, **eval_kwargs)
    finally:
        engine.shutdown()


def sweep_run(run_dir: str | Path, **kwargs: Any) -> list[dict[str, Any]]:
    """Evaluate every `checkpoints/step_*/model` of a training run; see `sari_ray.eval_sweep.sweep_run`."""
    from sari_ray.eval_sweep import sweep_run as _sweep

    return _sweep(run_dir, **kwargs)


# -------------------------------------------------------------------------------------------------- CLI
def _summary_line(metrics: dict[str, Any]) -> str:
    t = metrics["total"]
    lo, hi = t["ci95"]
    tasks = ", ".join(f"{k} {100 * v['accuracy']:.1f}" for k, v in metrics["by_task"].items())
    skipped = metrics["n_skipped_missing_audio"]
    note = f" [{skipped} skipped for missing audio: over {t['n']} of {metrics['n_items']} items]" if skipped else ""
    return f"accuracy {100 * t['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={t['n']}; {tasks}){note}"


def _usage_error(args: argparse.Namespace) -> str | None:
    if args.run and (args.model or args.out):
        return "--run sweeps the run's own checkpoints into RUN_DIR/eval_sweep; drop --model / --out"
    if not args.run and not (args.model and args.data and args.out):
        return "give --model, --data and --out (or --run RUN_DIR for a sweep)"
    for name in ("samples", "batch_size", "max_tokens", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}"
    return None


def _eval_command(args: argparse.Namespace) -> int:
    problem = _usage_error(args)
    if problem:
        print(f"sari-ray eval: {problem}", file=sys.stderr)
        return 2
    engine_kwargs = {"max_model_len": args.max_model_len, "dtype": args.dtype,
                     "gpu_memory_utilization": args.gpu_memory_utilization}
    common = dict(num_samples=args.samples, temperature=args.temperature, batch_size=args.batch_size,
                  seed=args.seed, progress=not args.no_progress)
    fmt = args.format or (("mmau" if str(args.data).endswith(".json") else "jsonl") if args.data else None)
    try:
        if args.run:
            rows = sweep_run(args.run, data=args.data, format=fmt, audio_dir=args.audio_dir,
                             style=args.style, max_tokens=args.max_tokens, limit=args.limit,
                             skip_missing=args.skip_missing, audio_mode=args.audio, engine_kwargs=engine_kwargs,
                             fresh_engine=args.fresh_engine, log_mlflow=not args.no_mlflow, **common)
            best = max(rows, key=lambda r: (r["accuracy"], -r["step"]))
            print(f"swept {len(rows)} checkpoints; best: step {best['step']} ({100 * best['accuracy']:.1f}% "
                  f"[{100 * best['ci_low']:.1f}, {100 * best['ci_high']:.1f}]); table and plot in "
                  f"{Path(args.run) / 'eval_sweep'}")
            return 0
        metrics = evaluate_model(args.model, args.data, args.out, format=fmt, audio_dir=args.audio_dir,
                                 style=args.style or "structured", limit=args.limit, skip_missing=args.skip_missing,
                                 engine_kwargs=engine_kwargs, audio_mode=args.audio,
                                 max_tokens=args.max_tokens or 256, **common)
    except (OSError, ValueError) as e:  # MissingAudioError, DataFormatError, a bad path: all say what to fix
        print(f"sari-ray eval: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # eval_sweep.SweepLoggingError: results written, MLflow not reached
        print(f"sari-ray eval: {e}", file=sys.stderr)
        return 1
    meta = metrics["meta"]
    print(f"{args.audio} audio: {_summary_line(metrics)}")
    print(f"{metrics['n_evaluated']} items in {meta['elapsed_s']:.1f} s; report: {Path(args.out) / 'report.md'}")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add `eval` (single checkpoint, or `--run` for a checkpoint sweep)."""
    p = subparsers.add_parser("eval", help="evaluate a checkpoint (MMAU rule, 95%% CIs) or sweep a run's checkpoints",
                              description=__doc__.splitlines()[0])
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
    p.add_argument("--audio", choices=AUDIO_MODES, default="real",
                   help="silence / noise: replace every clip (same duration) to measure text-only accuracy")
    p.add_argument("--skip-missing", action="store_true",
                   help="evaluate the items whose audio exists; the report says how many were skipped")
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
    p.set_defaults(func=_eval_command)
