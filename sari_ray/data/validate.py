"""Check a question set before it costs training time: every problem found in one pass, by row.

A GRPO run that meets a missing clip or an answer outside its choices at step 3,000 fails late (or,
worse, trains on a reward that can never be earned). `validate_samples` checks everything up front and
either raises with the full list (`policy="error"`) or drops the bad rows and counts them
(`policy="skip"`). The non-audio checks are pure; audio is decoded with `load_audio`, one file at a time,
keeping only the outcome per path.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Sequence

from sari_ray.data.schema import AudioMCQ

POLICIES = ("error", "skip")
PROBLEM_KINDS = (
    "missing_audio", "undecodable_audio", "empty_question", "too_few_choices", "duplicate_choices",
    "answer_not_in_choices", "bad_tier", "duplicate_id",
)
MAX_PROBLEMS_IN_MESSAGE = 100  # all are kept on the report; the exception text shows this many


@dataclass(frozen=True)
class Problem:
    index: int  # position of the row in the validated sequence
    sample_id: str
    kind: str  # one of PROBLEM_KINDS
    message: str  # names the file, the row index and the row id


@dataclass
class ValidationReport:
    kept: list[AudioMCQ]
    problems: list[Problem]
    total: int
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


def sample_problems(sample: AudioMCQ, num_tiers: int | None = None) -> list[tuple[str, str]]:
    """(kind, detail) for the checks that need no audio and no other rows; pure."""
    found = []
    if not isinstance(sample.question, str) or not sample.question.strip():
        found.append(("empty_question", "question is empty"))
    choices = sample.choices if isinstance(sample.choices, list) else []
    texts = [c for c in choices if isinstance(c, str) and c.strip()]
    if len(texts) < 2:
        found.append(("too_few_choices", f"needs at least 2 non-empty choices, has {len(texts)}: {choices!r}"))
    repeated = sorted({c for c in texts if sum(_norm(c) == _norm(o) for o in texts) > 1})
    if repeated:
        found.append(("duplicate_choices", f"choices repeat {repeated!r}"))
    if sample.answer not in choices:
        found.append(("answer_not_in_choices", f"answer {sample.answer!r} is not one of {choices!r}"))
    tier = sample.tier
    if tier is None:
        if num_tiers is not None:
            found.append(("bad_tier", f"tier missing; curriculum needs a tier in 0..{num_tiers - 1}"))
    elif not _is_int(tier):
        found.append(("bad_tier", f"tier must be an integer, got {type(tier).__name__} {tier!r}"))
    elif tier < 0 or (num_tiers is not None and tier >= num_tiers):
        valid = f"0..{num_tiers - 1}" if num_tiers is not None else ">= 0"
        found.append(("bad_tier", f"tier {tier} outside {valid}"))
    return found


def validate_samples(samples: Sequence[AudioMCQ], *, check_audio: bool = True,
                     policy: Literal["error", "skip"] = "error", num_tiers: int | None = None,
                     source: str | None = None) -> ValidationReport:
    """Check every row; `source` (the file) goes into each message. A duplicate id keeps the first row."""
    if policy not in POLICIES:
        raise ValueError(f"unknown validation policy {policy!r}; valid: {', '.join(POLICIES)}")
    if num_tiers is not None and (not _is_int(num_tiers) or num_tiers < 1):
        raise ValueError(f"num_tiers must be a positive integer or None, got {num_tiers!r}")
    where = f"{source}: " if source else ""
    problems: list[Problem] = []
    first_index_of: dict[str, int] = {}
    audio_outcome: dict[str, tuple[str, str] | None] = {}  # path -> (kind, reason) or None when fine
    truncated = 0
    bad_rows: set[int] = set()

    def report(index: int, sample: AudioMCQ, kind: str, detail: str) -> None:
        message = f"{where}row {index} (id={sample.id!r}): {kind}: {detail}"
        problems.append(Problem(index=index, sample_id=str(sample.id), kind=kind, message=message))
        bad_rows.add(index)

    for index, sample in enumerate(samples):
        for kind, detail in sample_problems(sample, num_tiers):
            report(index, sample, kind, detail)
        if sample.id in first_index_of:
            report(index, sample, "duplicate_id", f"id already used by row {first_index_of[sample.id]}")
        else:
            first_index_of[sample.id] = index
        if check_audio:
            if sample.audio not in audio_outcome:
                outcome, was_truncated = _check_audio(sample.audio)
                audio_outcome[sample.audio] = outcome
                truncated += was_truncated
            if audio_outcome[sample.audio] is not None:
                report(index, sample, *audio_outcome[sample.audio])

    kept = [s for i, s in enumerate(samples) if i not in bad_rows]
    result = ValidationReport(
        kept=kept, problems=problems, total=len(samples), source=source,
        audio_checked=sum(1 for o in audio_outcome.values() if o is None), audio_truncated=truncated,
        counts=dict(Counter(p.kind for p in problems)))
    if problems and policy == "error":
        raise DataValidationError(result)
    return result


def _check_audio(path) -> tuple[tuple[str, str] | None, bool]:
    """((kind, reason) or None, truncated). Decodes the clip and keeps nothing of it."""
    from pathlib import Path

    from sari_ray.data.audio import AudioDecodeError, load_audio

    if not isinstance(path, str) or not path:
        return ("missing_audio", f"audio path is empty: {path!r}"), False
    if not Path(path).is_file():
        return ("missing_audio", f"audio file not found: {path}"), False
    try:
        clip = load_audio(path)
    except AudioDecodeError as exc:
        return ("undecodable_audio", f"{exc.path}: {exc.reason}"), False
    return None, clip.truncated
