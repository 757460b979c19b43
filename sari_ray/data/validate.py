"""Check a question set before it costs training time: every problem found in one pass, by line.

A GRPO run that meets a missing clip or an answer outside its choices at step 3,000 fails late (or,
worse, trains on a reward that can never be earned). `validate_file` reads a file and checks everything up
front, malformed rows (bad JSON, wrong types, not UTF-8) and semantically broken ones together, and either
raises with the full list (`policy="error"`) or drops the bad rows and counts them (`policy="skip"`).
Messages name the file and the 1-based line a row starts on (`data.jsonl:7: ...`), as the readers do.
`validate_samples` runs the same checks on rows already in memory. The non-audio checks are pure and
linear in the row size; audio is decoded with `load_audio`, one file at a time, keeping only the outcome
per path.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from sari_ray.data.audio import MIN_AUDIO_SAMPLES, MODEL_SAMPLE_RATE  # numpy only; decoding imports are lazy
from sari_ray.data.schema import AudioMCQ

POLICIES = ("error", "skip")
PROBLEM_KINDS = (
    "malformed_row", "missing_audio", "undecodable_audio", "audio_too_short", "audio_outside_data_dir",
    "empty_question", "too_few_choices", "too_many_choices", "duplicate_choices", "answer_not_in_choices",
    "bad_tier", "duplicate_id",
)
MAX_PROBLEMS_IN_MESSAGE = 100  # all are kept on the report; the exception text shows this many
MAX_CHOICES = 26  # prompts label choices (A)..(Z) (sari_ray.answers.LETTERS); a 27th has no letter
_PREVIEW_CHARS = 160  # a row with 100,000 choices must not make a 2 MB message


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based: the line of the file the row starts on (rows in memory: their 1-based position)
    sample_id: str | None  # None for a row that did not parse
    kind: str  # one of PROBLEM_KINDS
    message: str  # names the file, the line and the row id
    index: int | None = None  # 0-based position among the parsed rows; None for a row that did not parse


@dataclass
class ValidationReport:
    kept: list[AudioMCQ]
    problems: list[Problem]
    total: int  # rows read, malformed ones included
    source: str | None = None
    audio_checked: int = 0  # distinct audio files decoded
    audio_truncated: int = 0  # of those, longer than the model window (they will be cut to 30 s)
    counts: dict[str, int] = field(default_factory=dict)  # problem kind -> number of problems

    @property
    def samples(self) -> list[AudioMCQ]:
        """The kept rows (alias: callers read `report.samples` as "the samples to use")."""
        return self.kept

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def dropped(self) -> int:
        return self.total - len(self.kept)

    def summary(self) -> str:
        where = f"{self.source}: " if self.source else ""
        lines = [f"{where}{self.total} samples, {len(self.kept)} kept, {self.dropped} dropped, "
                 f"{len(self.problems)} problem(s)"]
        if self.audio_checked:
            lines.append(f"audio: {self.audio_checked} file(s) decoded, {self.audio_truncated} longer than "
                         "the 30 s model window (will be truncated)")
        lines += [f"  {kind}: {count}" for kind, count in sorted(self.counts.items())]
        return "\n".join(lines)


class DataValidationError(ValueError):
    """Raised under policy "error"; `report` holds every problem."""

    def __init__(self, report: ValidationReport):
        self.report = report
        shown = [p.message for p in report.problems[:MAX_PROBLEMS_IN_MESSAGE]]
        more = len(report.problems) - len(shown)
        text = report.summary() + "\n" + "\n".join(shown)
        if more:
            text += f"\n... and {more} more (see DataValidationError.report.problems)"
        super().__init__(text)


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()  # "High" and "high " read as the same choice to a grader


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _preview(value) -> str:
    text = repr(value) if not isinstance(value, list) or len(value) <= 50 else repr(value[:50])[:-1] + ", ...]"
    return text if len(text) <= _PREVIEW_CHARS else text[:_PREVIEW_CHARS] + "...]"


def sample_problems(sample: AudioMCQ, num_tiers: int | None = None) -> list[tuple[str, str]]:
    """(kind, detail) for the checks that need no audio and no other rows; pure, linear in the row size."""
    found = []
    if not isinstance(sample.question, str) or not sample.question.strip():
        found.append(("empty_question", "question is empty"))
    choices = sample.choices if isinstance(sample.choices, list) else []
    texts = [c for c in choices if isinstance(c, str) and c.strip()]
    if len(texts) < 2:
        found.append(("too_few_choices", f"needs at least 2 non-empty choices, has {len(texts)}: {_preview(choices)}"))
    if len(choices) > MAX_CHOICES:
        found.append(("too_many_choices", f"{len(choices)} choices; at most {MAX_CHOICES} (one letter A-Z each)"))
    seen = Counter(_norm(c) for c in texts)
    repeated = sorted({c for c in texts if seen[_norm(c)] > 1})
    if repeated:
        found.append(("duplicate_choices", f"choices repeat {_preview(repeated)}"))
    if not isinstance(sample.answer, str) or sample.answer not in choices:
        found.append(("answer_not_in_choices", f"answer {_preview(sample.answer)} is not one of {_preview(choices)}"))
    tier = sample.tier
    if tier is None:
        if num_tiers is not None:
            found.append(("bad_tier", f"tier missing; curriculum needs a tier in 0..{num_tiers - 1}"))
    elif not _is_int(tier):
        found.append(("bad_tier", f"tier must be an integer, got {type(tier).__name__} {_preview(tier)}"))
    elif tier < 0 or (num_tiers is not None and tier >= num_tiers):
        valid = f"0..{num_tiers - 1}" if num_tiers is not None else ">= 0"
        found.append(("bad_tier", f"tier {tier} outside {valid}"))
    return found


def is_inside(path: str, folder: str | Path) -> bool:
    """Whether `path` (absolute, or relative to the working directory) lies in `folder`, by its normalised
    path: `..` cannot leave the folder; a symlink inside the folder is the folder owner's choice and is followed."""
    folder = os.path.normpath(os.path.abspath(folder))
    return os.path.commonpath([os.path.normpath(os.path.abspath(path)), folder]) == folder


def validate_samples(samples: Sequence[AudioMCQ], *, check_audio: bool = True,
                     policy: Literal["error", "skip"] = "error", num_tiers: int | None = None,
                     source: str | None = None, lines: Sequence[int] | None = None,
                     malformed: Sequence[tuple[int, str]] = (), data_dir: str | Path | None = None,
                     ) -> ValidationReport:
    """Check every row; `source` (the file) goes into each message. A duplicate id keeps the first row.

    `lines`: the 1-based line each sample starts on (default: its 1-based position). `malformed`: (line,
    problem) for rows of the same file that did not parse; they are reported and dropped with the rest.
    `data_dir`: when given, audio must lie inside it; a path that leaves it is reported and never opened.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown validation policy {policy!r}; valid: {', '.join(POLICIES)}")
    if num_tiers is not None and (not _is_int(num_tiers) or num_tiers < 1):
        raise ValueError(f"num_tiers must be a positive integer or None, got {num_tiers!r}")
    if lines is None:
        lines = range(1, len(samples) + 1)
    elif len(lines) != len(samples):
        raise ValueError(f"lines has {len(lines)} entries for {len(samples)} samples")

    def at(line: int) -> str:
        return f"{source}:{line}" if source else f"row {line}"

    problems = [Problem(line=line, sample_id=None, kind="malformed_row", message=f"{at(line)}: malformed_row: {detail}")
                for line, detail in malformed]
    first_line_of: dict[str, int] = {}
    audio_outcome: dict[str, tuple[str, str] | None] = {}  # path -> (kind, reason) or None when fine
    truncated = 0
    bad_rows: set[int] = set()

    def report(index: int, sample: AudioMCQ, kind: str, detail: str) -> None:
        line = lines[index]
        message = f"{at(line)}: id={sample.id!r}: {kind}: {detail}"
        problems.append(Problem(line=line, sample_id=str(sample.id), kind=kind, message=message, index=index))
        bad_rows.add(index)

    for index, sample in enumerate(samples):
        for kind, detail in sample_problems(sample, num_tiers):
            report(index, sample, kind, detail)
        if sample.id in first_line_of:
            report(index, sample, "duplicate_id", f"id already used on line {first_line_of[sample.id]}")
        else:
            first_line_of[sample.id] = lines[index]
        if data_dir is not None and isinstance(sample.audio, str) and sample.audio \
                and not is_inside(sample.audio, data_dir):
            report(index, sample, "audio_outside_data_dir",
                   f"{sample.audio} is outside the data folder {data_dir} (not opened); move the audio there, "
                   "or allow it with data.allow_external_audio=true / --allow-external-audio")
        elif check_audio:
            if sample.audio not in audio_outcome:
                outcome, was_truncated = check_audio_file(sample.audio)
                audio_outcome[sample.audio] = outcome
                truncated += was_truncated
            if audio_outcome[sample.audio] is not None:
                report(index, sample, *audio_outcome[sample.audio])

    problems.sort(key=lambda p: p.line)  # stable: a row's problems keep their order
    kept = [s for i, s in enumerate(samples) if i not in bad_rows]
    result = ValidationReport(
        kept=kept, problems=problems, total=len(samples) + len(malformed), source=source,
        audio_checked=sum(1 for o in audio_outcome.values() if o is None), audio_truncated=truncated,
        counts=dict(Counter(p.kind for p in problems)))
    if problems and policy == "error":
        raise DataValidationError(result)
    return result


def validate_file(path: str | Path, format: str = "jsonl", audio_dir: str | Path | None = None, *,
                  check_audio: bool = True, policy: Literal["error", "skip"] = "error",
                  num_tiers: int | None = None, allow_external_audio: bool = False) -> ValidationReport:
    """Read `path` and check every row in one pass: malformed rows and broken ones are listed (or, under
    `skip`, dropped and counted) together.

    Relative audio paths resolve against the data folder (`audio_dir`, default the file's folder); audio
    outside it is refused unless `allow_external_audio`. Raises FileNotFoundError for a missing file and
    DataFormatError for a problem of the whole file (empty; an MMAU JSON document that does not parse).
    """
    from sari_ray.data.readers import parse_file

    if policy not in POLICIES:  # before reading: a typo must not cost a pass over a large file
        raise ValueError(f"unknown validation policy {policy!r}; valid: {', '.join(POLICIES)}")
    parsed = parse_file(path, format, audio_dir)
    return validate_samples(parsed.samples, check_audio=check_audio, policy=policy, num_tiers=num_tiers,
                            source=str(path), lines=parsed.lines, malformed=parsed.malformed,
                            data_dir=None if allow_external_audio else parsed.base)


def check_audio_file(path) -> tuple[tuple[str, str] | None, bool]:
    """((kind, reason) or None, truncated): whether the models can take this clip (it exists, decodes, holds
    at least MIN_AUDIO_SAMPLES at 16 kHz). Decodes the clip and keeps nothing of it."""
    from sari_ray.data.audio import AudioDecodeError, load_audio

    if not isinstance(path, str) or not path:
        return ("missing_audio", f"audio path is empty: {path!r}"), False
    if not Path(path).is_file():
        return ("missing_audio", f"audio file not found: {path}"), False
    try:
        clip = load_audio(path, sample_rate=MODEL_SAMPLE_RATE)
    except AudioDecodeError as exc:
        return ("undecodable_audio", f"{exc.path}: {exc.reason}"), False
    if clip.samples.shape[0] < MIN_AUDIO_SAMPLES:
        return ("audio_too_short", f"{path}: {1000 * clip.duration_s:.1f} ms ({clip.samples.shape[0]} samples at "
                f"16 kHz); the models need at least {MIN_AUDIO_SAMPLES} samples "
                f"({1000 * MIN_AUDIO_SAMPLES / MODEL_SAMPLE_RATE:.1f} ms) to make one audio token"), False
    return None, clip.truncated
