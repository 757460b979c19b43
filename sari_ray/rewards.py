"""GRPO rewards: accuracy (the MMAU rule on the extracted answer) and a strict per-style format reward.

R1-AQA (arXiv 2503.11197) uses accuracy 1/0 + format 1/0 with equal weights; later work weighs them 2:1.
Accuracy uses the same reading of a completion as the MMAU scorer (`answers.extract_answer`, then
`mmau.mmau_correct`), so the policy is rewarded for what the benchmark counts.
Every component is returned, not only the sum, so logs show which one moves.

Pure: no torch, no Ray.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from sari_ray.answers import END_OF_TURN_MARKERS, extract_answer, listed_choices
from sari_ray.data.schema import STRUCTURED_PARTS, AudioMCQ
from sari_ray.mmau import mmau_correct
from sari_ray.prompts import TAG_RE, PromptStyle

_THINK_ANSWER_TAG_RE = re.compile(r"</?(?:think|answer)>")
# After </answer>: whitespace and end-of-turn markers only (decoders keep them when special tokens stay).
_TAIL = r"(?:\s*(?:%s))*\s*" % "|".join(re.escape(m) for m in END_OF_TURN_MARKERS)
_ANSWER = r"<answer>(?P<answer>.*?)</answer>"
_PARTS = r"\s*".join(rf"<{p}>(?P<{p}>.*?)</{p}>" for p in STRUCTURED_PARTS)
_GRAMMAR = {
    PromptStyle.implicit: re.compile(rf"\s*{_ANSWER}{_TAIL}", re.DOTALL),
    PromptStyle.free: re.compile(rf"\s*<think>(?P<think>.*?)</think>\s*{_ANSWER}{_TAIL}", re.DOTALL),
    PromptStyle.structured: re.compile(rf"\s*<think>\s*{_PARTS}\s*</think>\s*{_ANSWER}{_TAIL}", re.DOTALL),
}


def format_reward(text: str | None, style: PromptStyle | str) -> float:
    """1.0 iff `text` follows the style's grammar exactly, else 0.0.

    Strict on purpose (a lenient check is the first thing GRPO learns to game): every required part present,
    in order, non-empty; nothing but whitespace before `<think>` (or `<answer>` for implicit); exactly one
    `<answer>` pair; after `</answer>` only whitespace and end-of-turn markers. A part holding another
    grammar tag (a second `<answer>`, a nested `<think>`, parts out of order) fails.
    """
    style = PromptStyle(style)
    if text is None:
        return 0.0
    match = _GRAMMAR[style].fullmatch(text)
    if match is None:
        return 0.0
    for name, content in match.groupdict().items():
        forbidden = _THINK_ANSWER_TAG_RE if name == "think" else TAG_RE  # free CoT may use any other words
        if not content.strip() or forbidden.search(content):
            return 0.0
    return 1.0


def accuracy_reward(text: str | None, choices: Sequence[str], answer: str) -> float:
    """1.0 iff the MMAU rule judges the extracted answer correct (letters mapped to choice text first)."""
    extracted = extract_answer(text, choices)
    return 1.0 if extracted is not None and mmau_correct(extracted, answer, choices) else 0.0


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward components; R1-AQA's default is equal, later work uses accuracy 2 : format 1."""

    accuracy: float = 1.0
    format: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"reward weight {f.name}={value!r} must be a finite number >= 0")


def _choices_answer(sample: AudioMCQ | tuple[Sequence[str], str]) -> tuple[Sequence[str], str]:
    if isinstance(sample, AudioMCQ):  # letters name the options as the prompt lists them (repeats included)
        return listed_choices(sample), sample.answer
    try:
        choices, answer = sample
    except (TypeError, ValueError):
        raise TypeError(f"expected an AudioMCQ or a (choices, answer) pair, got {type(sample).__name__}") from None
    return choices, answer


def score_completion(
    text: str | None,
    sample: AudioMCQ | tuple[Sequence[str], str],
    style: PromptStyle | str,
    weights: RewardWeights = RewardWeights(),
) -> dict[str, Any]:
    """All reward components of one completion: `reward` (weighted sum), `accuracy`, `format`, `extracted`."""
    choices, answer = _choices_answer(sample)
    extracted = extract_answer(text, choices)
    accuracy = 1.0 if extracted is not None and mmau_correct(extracted, answer, choices) else 0.0
    fmt = format_reward(text, style)
    return {
        "reward": weights.accuracy * accuracy + weights.format * fmt,
        "accuracy": accuracy,
        "format": fmt,
        "extracted": extracted,
    }


def score_batch(
    texts: Sequence[str | None],
    samples: Sequence[AudioMCQ | tuple[Sequence[str], str]],
    style: PromptStyle | str,
    weights: RewardWeights = RewardWeights(),
) -> list[dict[str, Any]]:
    """`score_completion` over aligned lists (for a GRPO group, repeat each sample G times)."""
    if len(texts) != len(samples):
        raise ValueError(
            f"{len(texts)} completions but {len(samples)} samples; pass one sample per completion "
            "(repeat each sample group-size times)"
        )
    style = PromptStyle(style)
    return [score_completion(t, s, style, weights) for t, s in zip(texts, samples)]
