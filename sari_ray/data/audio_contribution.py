"""How much each question needs its audio: the model's accuracy with the real clip minus with silence.

    sari-ray data audio-contribution --model CKPT --data train.jsonl --format jsonl --out contrib.jsonl \
        [--audio-dir DIR] [--k 8] [--style implicit] [--max-tokens 32] [--temperature 1.0]

Per item, k answers are sampled with the real clip and k with silence of the same duration (the prompt and
its audio token count unchanged; `evaluate.replace_audio`), with the same seeds in both modes, and judged
with the MMAU rule. Each output line is {id, accuracy_real, accuracy_silent, contribution, k}, contribution
= accuracy_real - accuracy_silent in [-1, 1]. Items a model answers as well from the text alone teach GRPO
nothing about listening; AudioMCQ (SFT on weak-contribution items, GRPO on strong ones) and AD2PO-style
work (weighting by how much silence moves the answers) select or weigh training data by this quantity.

`data.min_audio_contribution` with `data.audio_contribution` (this file) keeps only training items whose
contribution reaches the threshold (`filter_by_contribution`, called by `sari_ray.data.prepare`); the
held-out set is never filtered, so accuracies stay comparable across runs.

Everything that can fail cheaply (arguments, the model directory, the data and every clip, the output
path) is checked before the engine starts. Reading the file and filtering are pure (no engine, no torch).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sari_ray.data.schema import AudioMCQ

FIELDS = ("id", "accuracy_real", "accuracy_silent", "contribution", "k")
TOLERANCE = 1e-9  # contribution >= threshold up to float rounding (0.7 - 0.2 must pass a 0.5 threshold)
MAX_LISTED = 5  # ids named in an error message
MAX_ERRORS = 20  # malformed lines named in an error message


class ContributionFileError(ValueError):
    """The audio-contribution file is missing items, or has malformed lines (all named, with line numbers)."""


# ------------------------------------------------------------------------------------------- measuring
def contribution_row(sample_id: str, correct_real: int, correct_silent: int, k: int) -> dict[str, Any]:
    """One output line from the counts of correct answers out of k per mode."""
    if not (k >= 1 and 0 <= correct_real <= k and 0 <= correct_silent <= k):
        raise ValueError(f"counts out of range for {sample_id!r}: {correct_real} and {correct_silent} of k={k}")
    return {"id": sample_id, "accuracy_real": correct_real / k, "accuracy_silent": correct_silent / k,
            "contribution": (correct_real - correct_silent) / k, "k": k}


def measure_contributions(engine: Any, processor: Any, samples: Sequence[AudioMCQ], *, style: str, k: int,
                          temperature: float = 1.0, max_tokens: int = 32, seed: int = 0, batch_size: int = 32,
                          progress: bool = True, max_audio_seconds: float = 30.0,
                          on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """One row per sample, in order (`contribution_row`). Real and silent requests of a batch go to the engine
    in one call; item i samples with seeds seed + i*k ... (vLLM seeds a request's k children seed + index) in
    both modes, whatever the batch size, so the two modes differ only in the audio. `on_row` gets each row
    as its batch finishes (the CLI appends it to disk)."""
    from tqdm.auto import tqdm

    from sari_ray.answers import listed_choices
    from sari_ray.data.audio import load_audio
    from sari_ray.evaluate import replace_audio
    from sari_ray.mmau import judge
    from sari_ray.prompts import PromptStyle, build_messages, render_prompt

    rows: list[dict[str, Any]] = []
    with tqdm(total=len(samples), disable=not progress, desc=f"audio contribution (k={k}, real + silent)",
              unit="item", dynamic_ncols=True) as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start: start + batch_size]
            prompts = [render_prompt(build_messages(s, PromptStyle(style)), processor) for s in batch]
            real = [load_audio(s.audio, max_seconds=max_audio_seconds).samples for s in batch]
            silent = [replace_audio(clip, "silence", s.id) for clip, s in zip(real, batch)]
            seeds = [seed + (start + i) * k for i in range(len(batch))]
            outputs = engine.generate(prompts + prompts, real + silent, n=k, temperature=temperature,
                                      max_tokens=max_tokens, seed=seeds + seeds)
            for i, sample in enumerate(batch):
                choices = listed_choices(sample)
                counts = [sum(judge(c.text, choices, sample.answer) for c in outputs[j]) for j in (i, len(batch) + i)]
                row = contribution_row(sample.id, counts[0], counts[1], k)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
            bar.update(len(batch))
    return rows


def summarize_contributions(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over items, and how many items the audio helps (> 0), leaves alone (= 0) or hurts (< 0)."""
    n = len(rows)
    if n == 0:
        return {"n": 0, "mean_real": None, "mean_silent": None, "mean_contribution": None,
                "positive": 0, "zero": 0, "negative": 0}
    contributions = [r["contribution"] for r in rows]
    return {"n": n, "mean_real": sum(r["accuracy_real"] for r in rows) / n,
            "mean_silent": sum(r["accuracy_silent"] for r in rows) / n,
            "mean_contribution": sum(contributions) / n,
            "positive": sum(c > TOLERANCE for c in contributions),
            "zero": sum(abs(c) <= TOLERANCE for c in contributions),
            "negative": sum(c < -TOLERANCE for c in contributions)}


def summary_text(summary: Mapping[str, Any], k: int, temperature: float) -> str:
    if not summary["n"]:
        return "audio contribution: no items"
    return (f"audio contribution over {summary['n']} items (k={k} samples per mode, temperature {temperature:g}): "
            f"mean accuracy real {summary['mean_real']:.3f}, silent {summary['mean_silent']:.3f}, contribution "
            f"{summary['mean_contribution']:+.3f}; contribution > 0: {summary['positive']} items, = 0: "
            f"{summary['zero']}, < 0: {summary['negative']}")


# ----------------------------------------------------------------------------------- reading, filtering
def read_contributions(path: str | Path) -> dict[str, float]:
    """id -> contribution from a file `sari-ray data audio-contribution` wrote. Every malformed line (not an
    object, no string id, contribution not a number in [-1, 1], a repeated id) is named with its line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio-contribution file not found: {path}")
    found: dict[str, float] = {}
    errors: list[str] = []
    from sari_ray.data.readers import json_lines

    for lineno, row, problem in json_lines(path):
        value = row.get("contribution") if isinstance(row, dict) else None
        if problem:
            errors.append(f"{path}:{lineno}: {problem}")
        elif not isinstance(row, dict) or not isinstance(row.get("id"), str):
            errors.append(f"{path}:{lineno}: not a contribution row (needs a string 'id' and 'contribution')")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
            errors.append(f"{path}:{lineno}: id {row['id']!r}: contribution {value!r} is not a number in [-1, 1]")
        elif row["id"] in found:
            errors.append(f"{path}:{lineno}: id {row['id']!r} appears twice")
        else:
            found[row["id"]] = float(value)
    if errors:
        shown = errors[:MAX_ERRORS] + ([f"... and {len(errors) - MAX_ERRORS} more"] if len(errors) > MAX_ERRORS else [])
        raise ContributionFileError(f"{len(errors)} malformed line(s) in {path}:\n  " + "\n  ".join(shown))
    if not found:
        raise ContributionFileError(f"{path} holds no contribution rows")
    return found


def filter_by_contribution(samples: Sequence[AudioMCQ], contributions: Mapping[str, float], threshold: float,
                           source: str = "the audio-contribution file") -> tuple[list[AudioMCQ], list[AudioMCQ]]:
    """(kept, dropped): kept are the samples whose contribution >= threshold, in their order. Every sample must
    have a contribution: otherwise an error says how many are missing and names a few."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    missing = [s.id for s in samples if s.id not in contributions]
    if missing:
        more = f", ... ({len(missing) - MAX_LISTED} more)" if len(missing) > MAX_LISTED else ""
        raise ContributionFileError(
            f"{source} has no contribution for {len(missing)} of {len(samples)} training items (ids: "
            f"{', '.join(map(repr, missing[:MAX_LISTED]))}{more}); write it for this data with `sari-ray data "
            "audio-contribution --data <the training file> ...`")
    kept = [s for s in samples if contributions[s.id] >= threshold - TOLERANCE]
    kept_ids = {s.id for s in kept}
    return kept, [s for s in samples if s.id not in kept_ids]


# ------------------------------------------------------------------------------------------------- CLI
def check_arguments(args: argparse.Namespace) -> None:
    """Argument values, before anything is read (ValueError: the CLI prints it and exits 2)."""
    problems = []
    if args.k < 1:
        problems.append(f"--k {args.k}: use samples per mode >= 1")
    if args.max_tokens < 1:
        problems.append(f"--max-tokens {args.max_tokens}: use >= 1")
    if args.batch_size < 1:
        problems.append(f"--batch-size {args.batch_size}: use >= 1")
    if args.limit is not None and args.limit < 1:
        problems.append(f"--limit {args.limit}: use >= 1, or leave it out for every item")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        problems.append(f"--temperature {args.temperature}: use a finite temperature >= 0")
    elif args.temperature == 0 and args.k > 1:
        problems.append(f"--temperature 0 is greedy: its {args.k} samples would be identical; use --k 1, or a "
                        "temperature > 0 (e.g. 1.0)")
    if problems:
        raise ValueError("; ".join(problems))


def run_audio_contribution(args: argparse.Namespace) -> int:
    from sari_ray.data.validate import validate_file
    from sari_ray.evaluate import check_model_dir, load_engine

    check_arguments(args)
    out = Path(args.out)
    if out.exists() and (out.is_dir() or not args.overwrite):
        raise ValueError(f"--out {out} exists: choose another path{'' if out.is_dir() else ', or pass --overwrite'}")
    model_dir = check_model_dir(args.model)
    report = validate_file(args.data, args.format, args.audio_dir, check_audio=True, policy=args.invalid_rows,
                           allow_external_audio=args.allow_external_audio)  # every clip decoded: before the engine
    print(report.summary(), flush=True)
    samples = report.samples[: args.limit] if args.limit else report.samples
    if not samples:
        raise ValueError(f"{args.data}: no valid items to measure")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.partial")
    engine_kwargs = {"max_model_len": args.max_model_len, "dtype": args.dtype,
                     "gpu_memory_utilization": args.gpu_memory_utilization}
    engine, processor = load_engine(model_dir, seed=args.seed, **engine_kwargs)
    try:
        with open(partial, "w", encoding="utf-8") as sink:
            def append(row: dict[str, Any]) -> None:
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()

            rows = measure_contributions(engine, processor, samples, style=args.style, k=args.k,
                                         temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
                                         batch_size=args.batch_size, progress=not args.no_progress, on_row=append)
    finally:
        engine.shutdown()
    os.replace(partial, out)  # complete or absent: a filter never reads a half-written file
    print(summary_text(summarize_contributions(rows), args.k, args.temperature))
    print(f"wrote {len(rows)} rows to {out}")
    return 0


def add_audio_contribution_parser(data_commands) -> None:
    p = data_commands.add_parser(
        "audio-contribution", help="per item: accuracy with real vs silent audio (k samples each) -> jsonl",
        description="Per item, the model's accuracy over k samples with the real clip and with silence of the same "
                    "duration (same seeds), and contribution = real - silent. Filter training data with "
                    "data.audio_contribution=OUT data.min_audio_contribution=THRESHOLD.")
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--data", required=True, help="question file")
    p.add_argument("--format", default="jsonl", choices=("jsonl", "mmau", "r1aqa"))
    p.add_argument("--audio-dir", default=None, help="base for relative audio paths (default: the file's folder)")
    p.add_argument("--out", required=True, help="output jsonl: id, accuracy_real, accuracy_silent, contribution, k")
    p.add_argument("--k", type=int, default=8, help="samples per item and audio mode")
    p.add_argument("--style", default="implicit", choices=("implicit", "free", "structured"), help="prompt style")
    p.add_argument("--max-tokens", type=int, default=32,
                   help="max new tokens per answer (raise it for the free / structured styles)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy, with --k 1)")
    p.add_argument("--seed", type=int, default=0, help="item i samples with seeds seed + i*k ... in both modes")
    p.add_argument("--batch-size", type=int, default=32, help="items per engine call (each sent real and silent)")
    p.add_argument("--limit", type=int, default=None, help="only the first N valid items (quick looks)")
    p.add_argument("--invalid-rows", default="error", choices=("error", "skip"),
                   help="error: list every bad row and stop before the engine starts; skip: drop and count them")
    p.add_argument("--allow-external-audio", action="store_true", help="accept audio outside the data folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM max_model_len (default: the engine's)")
    p.add_argument("--dtype", default=None, help="vLLM dtype (default: the engine's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM KV-cache fraction (default: the engine's; GPU: e.g. 0.85)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_audio_contribution)
