"""MMAU scoring: the official string-match rule, plus the reporting the official script leaves out.

Run: `sari-ray score --data mmau-test-mini.json --predictions preds.jsonl` (jsonl lines: id, model_output).
Exit code 2 (no traceback) for unreadable or malformed files and when no prediction matches a sample id.

The rule (MMAU's evaluation.py, `string_match`): lower-cased `\\b\\w+\\b` word tokens; a prediction is
correct iff it holds every token of the answer and none of the tokens that only the other choices have;
an empty prediction is wrong. Where this project deliberately differs from the official script:
- the answer is extracted first (`answers.extract_answer`: last `<answer>` pair, option letters mapped to
  the choice's text), because a bare "A" collides with the word "a" in other choices; a letter names the
  option at that position of the published list, repeats included (`answers.listed_choices`);
- an item with no prediction counts as wrong and is reported (the official script skips it, shrinking the
  denominator);
- the answer revision is reported: numbers from before MMAU's 2025-05-15 revision are not comparable.

Pure: no torch, no Ray.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sari_ray.answers import extract_answer, listed_choices, word_tokens
from sari_ray.data.schema import AudioMCQ

RULE = "mmau-string-match (official token rule) after answer extraction and letter->choice mapping"
REVISION_NOTE = "MMAU numbers from before the 2025-05-15 answer revision are not comparable with later ones"
# sha256 of the sorted (id, answer) pairs -> the answer revision they are (see `answers_fingerprint`).
KNOWN_REVISIONS = {
    "21206cfbf7590458b3123284339f46dd91ceedf794bd5ed321a1b58a166a561d": (
        "v05.15.25 (test-mini, MMAU repository revision 110127f)"
    ),
}
MAX_LISTED_IDS = 20
MAX_LISTED_ERRORS = 100  # malformed lines shown in the message (all are in `.errors`)


def mmau_correct(prediction: str | None, answer: str, choices: Sequence[str]) -> bool:
    """The official MMAU rule on a prediction string (no extraction, no letter mapping).

    Equivalent to the official loop: it adds `choice_tokens - answer_tokens` for every choice whose tokens
    differ from the answer's, and a choice with the answer's tokens adds nothing, so the union over all
    choices minus the answer's tokens is the same set.
    """
    predicted = word_tokens(prediction or "")
    if not predicted:
        return False
    expected = word_tokens(answer)
    only_others = set().union(*(word_tokens(c) for c in choices)) - expected
    return expected <= predicted and predicted.isdisjoint(only_others)


def judge(model_output: str | None, choices: Sequence[str], answer: str) -> bool:
    """Is a raw model output correct? Extract (letters -> choice text), then the official rule."""
    extracted = extract_answer(model_output, choices)
    return extracted is not None and mmau_correct(extracted, answer, choices)


def answers_fingerprint(samples: Iterable[AudioMCQ]) -> str:
    """A hash of the (id, answer) pairs, to recognise which published answer revision a file holds."""
    pairs = sorted((s.id, s.answer) for s in samples)
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


def _bucket(correct: int, n: int) -> dict[str, Any]:
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n}


def _grouped(samples: Sequence[AudioMCQ], verdicts: Sequence[bool], key: str) -> dict[str, dict[str, Any]]:
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for sample, ok in zip(samples, verdicts):
        value = getattr(sample, key)
        bucket = counts["unknown" if value in (None, "") else str(value)]
        bucket[0] += ok
        bucket[1] += 1
    return {name: _bucket(c, n) for name, (c, n) in sorted(counts.items())}


def score_predictions(
    samples: Sequence[AudioMCQ], predictions: Mapping[str, str | None], revision: str | None = None
) -> dict[str, Any]:
    """JSON-able metrics: total, by task / difficulty / sub-category, and what was missing.

    A sample with no prediction counts as wrong (it stays in every denominator) and is listed. Predictions
    for ids not in `samples` are counted in `n_unexpected`, not scored. `revision` names the answer
    revision; when None it is recognised from the answers if they are a known published set.
    """
    ids = [s.id for s in samples]
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)[:MAX_LISTED_IDS]
    if dupes:
        raise ValueError(f"duplicate sample ids {dupes}: predictions are keyed by id, so ids must be unique")
    missing = [s.id for s in samples if s.id not in predictions]
    verdicts = [s.id in predictions and judge(predictions[s.id], listed_choices(s), s.answer) for s in samples]
    unexpected = sorted(set(predictions) - set(ids))
    if revision is None:
        revision = KNOWN_REVISIONS.get(answers_fingerprint(samples), "unknown")
    return {
        "total": _bucket(sum(verdicts), len(samples)),
        "by_task": _grouped(samples, verdicts, "task"),
        "by_difficulty": _grouped(samples, verdicts, "difficulty"),
        "by_sub_category": _grouped(samples, verdicts, "sub_category"),
        "n_scored": len(samples) - len(missing),
        "n_missing": len(missing),
        "missing_ids": missing[:MAX_LISTED_IDS],
        "n_unexpected": len(unexpected),
        "unexpected_ids": unexpected[:MAX_LISTED_IDS],
        "revision": revision,
        "revision_note": REVISION_NOTE,
        "rule": RULE,
    }


class PredictionsFormatError(ValueError):
    """Malformed prediction lines; `errors` holds every "file:line: reason", so one run reports them all."""

    def __init__(self, path: str | Path, errors: list[str]):
        self.path, self.errors = str(path), list(errors)
        shown = self.errors[:MAX_LISTED_ERRORS]
        more = f"\n  ... and {len(self.errors) - len(shown)} more" if len(self.errors) > len(shown) else ""
        super().__init__(f"{path}: {len(self.errors)} malformed prediction line(s):\n  " + "\n  ".join(shown) + more)


def read_predictions(path: str | Path) -> dict[str, str | None]:
    """Predictions jsonl: one object per line with `id` and `model_output` (`model_prediction`, the
    official script's key, is accepted too). Every malformed line and repeated id is collected and raised
    at once (PredictionsFormatError), each with its 1-based line number, so a broken file is fixed in one pass.
    """
    from sari_ray.data.readers import json_lines

    predictions: dict[str, str | None] = {}
    errors: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, row, problem in json_lines(path):
        where = f"{path}:{lineno}"
        if problem:
            errors.append(f"{where}: {problem}")
            continue
        if not isinstance(row, dict) or "id" not in row:
            errors.append(f"{where}: expected a JSON object with 'id' and 'model_output'")
            continue
        key = "model_output" if "model_output" in row else "model_prediction"
        if key not in row:
            errors.append(f"{where}: no 'model_output' for id {row['id']!r}")
            continue
        output = row[key]
        if output is not None and not isinstance(output, str):
            errors.append(f"{where}: 'model_output' must be a string, got {type(output).__name__}")
            continue
        sample_id = str(row["id"])
        if sample_id in first_line:
            errors.append(f"{where}: id {sample_id!r} appears twice (first on line {first_line[sample_id]})")
            continue
        first_line[sample_id] = lineno
        predictions[sample_id] = output
    if errors:
        raise PredictionsFormatError(path, errors)
    return predictions


def match_problems(metrics: Mapping[str, Any], n_predictions: int, n_samples: int) -> tuple[list[str], str | None]:
    """(warnings, error) about how predictions and samples matched up; error when nothing matched.

    Why: predictions for another file (or ids written differently) used to score 0.0 and exit 0, which reads
    like a model that is always wrong.
    """
    unexpected, missing = metrics["n_unexpected"], metrics["n_missing"]
    matched = n_predictions - unexpected
    if matched == 0:
        shown = f" (prediction ids: {metrics['unexpected_ids'][:5]})" if unexpected else ""
        return [], (f"none of the {n_predictions} predictions matches any of the {n_samples} sample ids{shown}: "
                    "wrong --data or --predictions, or ids written differently?")
    warnings = []
    if unexpected:
        warnings.append(f"{unexpected} of {n_predictions} predictions match no sample id and are not scored "
                        f"(first: {metrics['unexpected_ids'][:5]})")
    if missing:
        warnings.append(f"{missing} of {n_samples} samples have no prediction and count as wrong "
                        f"(first: {metrics['missing_ids'][:5]})")
    return warnings, None


def _score_command(args: argparse.Namespace) -> int:
    """Exit 0 with the metrics JSON on stdout; 2 (message on stderr, no traceback) for unreadable or malformed
    files and when no prediction matches a sample. Partial matches are scored with a warning on stderr."""
    from sari_ray.data.readers import read_samples  # lazy: `sari-ray --help` must not need the readers

    fmt = args.format or ("mmau" if str(args.data).endswith(".json") else "jsonl")
    try:
        samples = read_samples(args.data, format=fmt, audio_dir=args.audio_dir)
        predictions = read_predictions(args.predictions)
        metrics = score_predictions(samples, predictions, revision=args.revision)
    except (OSError, ValueError) as e:
        print(f"sari-ray score: {e}", file=sys.stderr)
        return 2
    warnings, error = match_problems(metrics, len(predictions), len(samples))
    if error:
        print(f"sari-ray score: {args.predictions} vs {args.data}: {error}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"sari-ray score: warning: {warning}", file=sys.stderr)
    print(json.dumps(metrics, indent=2, ensure_ascii=False))
    return 0


def register_cli(subparsers: Any) -> None:
    """Add `score`; its function prints the metrics JSON to stdout and returns the exit code."""
    p = subparsers.add_parser(
        "score",
        help="score predictions with the official MMAU rule (missing predictions count as wrong)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--data", required=True, type=Path, help="samples: MMAU .json, R1-AQA or sari-ray jsonl")
    p.add_argument("--predictions", required=True, type=Path, help="jsonl lines with id and model_output")
    p.add_argument(
        "--format", choices=("mmau", "r1aqa", "jsonl"), default=None,
        help="format of --data (default: mmau for .json files, else jsonl)",
    )
    p.add_argument("--audio-dir", default=None, help="audio directory for the reader (files need not exist)")
    p.add_argument(
        "--revision", default=None,
        help="MMAU answer revision to report (default: recognised from the answers, else 'unknown')",
    )
    p.set_defaults(func=_score_command)
