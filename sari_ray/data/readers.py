"""Read question sets into `AudioMCQ`: this project's jsonl, MMAU (test-mini json), R1-AQA (AVQA jsonl).

Parsing is plain `json` (never eval or pickle) and structural only: a row either becomes an AudioMCQ or
is reported. All bad rows are collected and raised together (`DataFormatError`) with file and line, so a
broken file is fixed in one pass. Semantic checks (answer among choices, tiers, audio decodes) are
`sari_ray.data.validate`'s job. HF `datasets` is used where it fits (`to_hf_dataset`), not for parsing:
MMAU's `category` is a string or a one-element list, which breaks Arrow's type inference.
"""
from __future__ import annotations

import json
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from sari_ray.data.schema import AudioMCQ

FORMATS = ("jsonl", "mmau", "r1aqa")
MMAU_DIFFICULTY_TIERS = {"easy": 0, "medium": 1, "hard": 2}
MAX_ERRORS_IN_MESSAGE = 100  # all are kept in DataFormatError.errors; the message shows this many


class DataFormatError(ValueError):
    """Malformed rows; `errors` holds one "file:line: problems" entry per bad row.

    A problem of the whole file (empty, not UTF-8 in a JSON document) is one entry, shown as the message.
    """

    def __init__(self, path: str | Path, errors: list[str], whole_file: bool = False):
        self.path = str(path)
        self.errors = list(errors)
        shown = self.errors[:MAX_ERRORS_IN_MESSAGE]
        more = len(self.errors) - len(shown)
        if whole_file:
            text = "\n".join(shown)
        else:
            text = f"{self.path}: {len(self.errors)} malformed row(s):\n  " + "\n  ".join(shown)
        if more:
            text += f"\n  ... and {more} more (see DataFormatError.errors)"
        super().__init__(text)


class _RowError(Exception):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass
class ParsedFile:
    """What `parse_file` read: the rows that parsed, the line each starts on, and the rows that did not."""

    path: Path  # absolute
    base: Path  # the data folder: relative audio paths resolve against it (audio_dir, else the file's folder)
    samples: list[AudioMCQ]
    lines: list[int]  # 1-based line on which each sample starts (same order as `samples`)
    malformed: list[tuple[int, str]]  # (1-based line, problem) per row that did not parse


def parse_file(path: str | Path, format: str = "jsonl", audio_dir: str | Path | None = None) -> ParsedFile:
    """Parse `path` in `format`, keeping malformed rows as (line, problem) instead of raising.

    Raises FileNotFoundError for a missing file and DataFormatError for a problem of the whole file: no rows
    at all, or an MMAU JSON document that is not UTF-8 or not valid JSON. Relative audio paths resolve against
    `audio_dir` (default: the file's folder) and come back absolute and normalised (`..` folded), so samples
    can be shipped to workers with another working directory and checked against the data folder.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; valid: {', '.join(FORMATS)}")
    path = Path(os.path.normpath(Path(path).absolute()))
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    base = Path(os.path.normpath(Path(audio_dir).absolute())) if audio_dir is not None else path.parent
    data = path.read_bytes()
    if format == "mmau":
        rows, parse_row = _json_array_rows(path, _decode_document(path, data)), _mmau_row
    else:
        rows, parse_row = _jsonl_rows(data), (_r1aqa_row if format == "r1aqa" else _own_row)
    samples, lines, malformed = [], [], []
    for line, row in rows:
        try:
            if isinstance(row, _RowError):
                raise row
            if not isinstance(row, dict):
                raise _RowError([f"expected a JSON object, got {type(row).__name__}"])
            samples.append(parse_row(row, base, line))
            lines.append(line)
        except _RowError as exc:
            malformed.append((line, str(exc)))
    if not samples and not malformed:
        raise DataFormatError(path, [f"{path}: the file holds no rows ({len(data)} bytes); expected one "
                                     f"question per {'item' if format == 'mmau' else 'line'}"], whole_file=True)
    return ParsedFile(path=path, base=base, samples=samples, lines=lines, malformed=malformed)


def read_samples(path: str | Path, format: str = "jsonl", audio_dir: str | Path | None = None) -> list[AudioMCQ]:
    """Parse `path` in `format`; any malformed row raises DataFormatError listing all of them (see `parse_file`).

    Returned audio paths are absolute, so samples can be shipped to workers with another working directory.
    """
    parsed = parse_file(path, format, audio_dir)
    if parsed.malformed:
        raise DataFormatError(parsed.path, [f"{parsed.path}:{line}: {problem}" for line, problem in parsed.malformed])
    return parsed.samples


def _not_utf8(data: bytes, start: int, exc: UnicodeDecodeError) -> str:
    """Where a decode failed: the byte, its offset in the file, its column (bytes) in the line."""
    offset = start + exc.start
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return f"not UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} (column {column}); save the file as UTF-8"


def _decode_document(path: Path, data: bytes) -> str:
    """A whole JSON document as text; a UTF-8 byte-order mark is dropped (json.loads refuses it)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataFormatError(path, [f"{path}:{line}: {_not_utf8(data, 0, exc)}"], whole_file=True) from None
    return text[1:] if text.startswith("\ufeff") else text


# ---- rows out of files: (line number, parsed object or _RowError) --------------------------------------

def _jsonl_rows(data: bytes) -> Iterator[tuple[int, Any]]:
    """One row per non-blank line. Lines split on b"\\n" only (as editors number them; str.splitlines would
    also split inside a JSON string holding U+2028), and each line is decoded alone, so a bad byte costs one row."""
    start = 0
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        line_start, start = start, start + len(raw) + 1
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
            raw, line_start = raw[3:], line_start + 3
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield line_no, _RowError([_not_utf8(data, line_start, exc)])
            continue
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as exc:
            yield line_no, _RowError([f"invalid JSON: {exc.msg} (column {exc.colno})"])
        except (ValueError, RecursionError) as exc:  # an integer over 4300 digits; nesting too deep
            yield line_no, _RowError([f"invalid JSON: {type(exc).__name__}: {str(exc)[:120]}"])


def json_lines(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """(1-based line, object, None), or (line, None, problem) for a line that is not UTF-8 or not JSON, for every
    non-blank line of a jsonl file: the one reader of jsonl files (predictions, contributions, data), so a bad
    line costs that line only and every caller names lines alike."""
    for line_no, row in _jsonl_rows(Path(path).read_bytes()):
        if isinstance(row, _RowError):
            yield line_no, None, str(row)
        else:
            yield line_no, row, None


def _json_array_rows(path: Path, text: str) -> list[tuple[int, Any]]:
    """Items of a top-level JSON array, each with the line it starts on (json.loads alone loses that)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, [f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})"])
    if not isinstance(items, list):
        raise DataFormatError(path, [f"{path}:1: expected a JSON array of items, got {type(items).__name__}"])
    decoder, whitespace = json.JSONDecoder(), re.compile(r"[\s,]*")
    rows, pos, line = [], text.index("[") + 1, 1
    line += text.count("\n", 0, pos)
    for _ in items:  # the text already parsed, so this walk cannot fail
        start = whitespace.match(text, pos).end()
        line += text.count("\n", pos, start)
        item, pos = decoder.raw_decode(text, start)
        rows.append((line, item))
        line += text.count("\n", start, pos)
    return rows


# ---- row parsers ---------------------------------------------------------------------------------------

def _resolve(audio: str, base: Path) -> str:
    return os.path.normpath(audio if os.path.isabs(audio) else base / audio)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_types(row: dict, spec: dict[str, tuple], required: Sequence[str]) -> list[str]:
    problems = [f"missing field {name!r}" for name in required if name not in row]
    for name, (check, expected) in spec.items():
        if name in row and not check(row[name]):
            problems.append(f"field {name!r} must be {expected}, got {type(row[name]).__name__} {row[name]!r:.60}")
    return problems


_STR = (lambda v: isinstance(v, str), "a string")
_OPT_STR = (lambda v: v is None or isinstance(v, str), "a string or null")
_STR_LIST = (_is_str_list, "a list of strings")
_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
_OPT_INT = (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an integer or null")

_OWN_SPEC = {
    "id": _STR, "audio": _STR, "question": _STR, "choices": _STR_LIST, "answer": _STR,
    "task": _OPT_STR, "category": _OPT_STR, "sub_category": _OPT_STR, "difficulty": _OPT_STR,
    "tier": _OPT_INT, "reasoning_free": _OPT_STR, "source": _OPT_STR,
    "reasoning_structured": (lambda v: v is None or (isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(t, str) for k, t in v.items())), "an object of strings or null"),
    "extra": (lambda v: isinstance(v, dict), "an object"),
}
_OWN_REQUIRED = ("id", "audio", "question", "choices", "answer")


def _own_row(row: dict, base: Path, line: int) -> AudioMCQ:
    problems = _check_types(row, _OWN_SPEC, _OWN_REQUIRED)
    unknown = sorted(set(row) - set(AudioMCQ.__dataclass_fields__))
    if unknown:
        problems.append(f"unknown field(s) {unknown}")
    if problems:
        raise _RowError(problems)
    sample = AudioMCQ(**row)
    sample.audio = _resolve(sample.audio, base)
    return sample


_MMAU_SPEC = {
    "id": _STR, "audio_id": _STR, "question": _STR, "choices": _STR_LIST, "answer": _STR,
    "task": _OPT_STR, "sub-category": _OPT_STR, "dataset": _OPT_STR, "split": _OPT_STR,
    "category": (lambda v: v is None or isinstance(v, str) or (_is_str_list(v) and len(v) == 1),
                 "a string or a one-element list of strings"),
    "difficulty": (lambda v: v is None or v in MMAU_DIFFICULTY_TIERS, f"one of {sorted(MMAU_DIFFICULTY_TIERS)}"),
}


def _mmau_row(row: dict, base: Path, line: int) -> AudioMCQ:
    problems = _check_types(row, _MMAU_SPEC, ("id", "audio_id", "question", "choices", "answer"))
    if problems:
        raise _RowError(problems)
    category = row.get("category")
    category = category[0] if isinstance(category, list) else category
    choices = list(dict.fromkeys(row["choices"]))  # 27 test-mini items repeat a choice verbatim
    extra = {key: row[key] for key in ("dataset", "split") if row.get(key) is not None}
    if len(choices) != len(row["choices"]):
        extra["original_choices"] = list(row["choices"])
    difficulty = row.get("difficulty")
    return AudioMCQ(
        id=row["id"], audio=_resolve(row["audio_id"], base), question=row["question"], choices=choices,
        answer=row["answer"], task=row.get("task"), category=category, sub_category=row.get("sub-category"),
        difficulty=difficulty, tier=MMAU_DIFFICULTY_TIERS.get(difficulty), source="mmau", extra=extra)


_R1AQA_SPEC = {
    "question_text": _STR, "multi_choice": _STR_LIST, "answer": _INT, "audio_path": _STR,
    "dataset_name": _OPT_STR,
    "id": (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), "a string or an integer"),
}
_R1AQA_EXTRA = ("video_name", "video_id", "question_relation", "question_type")


def _r1aqa_row(row: dict, base: Path, line: int) -> AudioMCQ:
    problems = _check_types(row, _R1AQA_SPEC, ("question_text", "multi_choice", "answer", "audio_path"))
    if not problems and not 0 <= row["answer"] < len(row["multi_choice"]):
        problems.append(f"answer index {row['answer']} out of range for {len(row['multi_choice'])} choices")
    if problems:
        raise _RowError(problems)
    dataset = row.get("dataset_name") or "r1aqa"
    extra = {"dataset": dataset, "answer_index": row["answer"]}
    extra.update({key: row[key] for key in _R1AQA_EXTRA if key in row})
    return AudioMCQ(
        id=f"{dataset.lower()}-{row.get('id', f'line{line}')}", audio=_resolve(row["audio_path"], base),
        question=row["question_text"], choices=list(row["multi_choice"]),
        answer=row["multi_choice"][row["answer"]], source="r1aqa", extra=extra)


# ---- writing, HF datasets, splits ----------------------------------------------------------------------

def write_jsonl(samples: Sequence[AudioMCQ], path: str | Path) -> Path:
    """This project's format: one `AudioMCQ.to_dict()` per line, key order fixed, so output is reproducible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for sample in samples:
            out.write(json.dumps(sample.to_dict(), ensure_ascii=False) + "\n")
    return path


_JSON_COLUMNS = ("reasoning_structured", "extra")  # free-form dicts: stored as JSON text, Arrow-safe


def to_hf_dataset(samples: Sequence[AudioMCQ]):
    """A `datasets.Dataset` with an explicit schema (no type inference); dict fields become JSON text."""
    import datasets

    text = datasets.Value("string")
    features = datasets.Features({
        name: (datasets.List(text) if name == "choices" else datasets.Value("int64") if name == "tier" else text)
        for name in AudioMCQ.__dataclass_fields__})
    rows = []
    for sample in samples:
        row = sample.to_dict()
        for name in _JSON_COLUMNS:
            row[name] = None if row[name] is None else json.dumps(row[name], ensure_ascii=False)
        rows.append(row)
    return datasets.Dataset.from_list(rows, features=features)


def from_hf_dataset(dataset) -> list[AudioMCQ]:
    samples = []
    for row in dataset:
        row = dict(row)
        for name in _JSON_COLUMNS:
            row[name] = None if row[name] is None else json.loads(row[name])
        row["extra"] = row["extra"] or {}
        samples.append(AudioMCQ(**row))
    return samples


def split_samples(samples: Sequence[AudioMCQ], eval_fraction: float, seed: int = 0,
                  ) -> tuple[list[AudioMCQ], list[AudioMCQ]]:
    """Deterministic train/eval split, stratified by tier; input order is kept within each part.

    Which rows go to eval depends on ids and the seed only (not on file order), so reordering a file
    does not leak rows between train and eval. Eval size is round(eval_fraction * n) (at least 1 when
    eval_fraction > 0 and n > 1), spread over tiers by largest remainder.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(samples)
    total = round(eval_fraction * n)
    if eval_fraction > 0 and n > 1:
        total = max(total, 1)
    strata: dict[Any, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        strata[sample.tier].append(index)
    keys = sorted(strata, key=lambda tier: (tier is None, tier if isinstance(tier, int) else 0))
    quotas = {key: total * len(strata[key]) / n for key in keys} if n else {}
    counts = {key: int(quota) for key, quota in quotas.items()}
    by_remainder = sorted(keys, key=lambda key: (-(quotas[key] - counts[key]), keys.index(key)))
    for key in by_remainder[: total - sum(counts.values())]:
        counts[key] += 1
    rng = random.Random(seed)
    eval_indices: set[int] = set()
    for key in keys:
        members = sorted(strata[key], key=lambda i: samples[i].id)
        rng.shuffle(members)
        eval_indices.update(members[: counts[key]])
    train = [s for i, s in enumerate(samples) if i not in eval_indices]
    held_out = [s for i, s in enumerate(samples) if i in eval_indices]
    return train, held_out
