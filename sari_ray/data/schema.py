"""The one sample schema every reader, the generator, the prompts and the trainer share.

Pure: no torch, no Ray. Audio is referenced by path; decoding lives in `sari_ray.data.audio`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

STRUCTURED_PARTS = ("planning", "caption", "reasoning", "summary")  # SARI's four parts, in order


@dataclass
class AudioMCQ:
    """One audio multiple-choice question.

    `answer` is the answer *text* and must be one of `choices` (readers convert index answers).
    `tier` is the curriculum tier (0 = easiest); `difficulty` is the dataset's own label, kept as is.
    `reasoning_structured` maps each of STRUCTURED_PARTS to text; `reasoning_free` is free-form CoT.
    Both are SFT targets and must be true to the audio.
    """

    id: str
    audio: str
    question: str
    choices: list[str]
    answer: str
    task: str | None = None
    category: str | None = None
    sub_category: str | None = None
    difficulty: str | None = None
    tier: int | None = None
    reasoning_structured: dict[str, str] | None = None
    reasoning_free: str | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "AudioMCQ":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(row) - known
        if unknown:
            raise ValueError(f"unknown sample fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**row)
