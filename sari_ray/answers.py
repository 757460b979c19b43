"""Reading the chosen answer out of a completion: one function shared by the rewards and the MMAU scorer.

Training and evaluation must read a completion the same way, or GRPO optimises something the benchmark
does not measure. This module imports nothing from sari_ray, so `rewards -> mmau -> answers` has no cycle.

Pure: no torch, no Ray.
"""
from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

LETTERS = string.ascii_uppercase  # option labels, as `prompts.format_choices` renders them: (A), (B), ...
END_OF_TURN_MARKERS = ("<|im_end|>", "<|endoftext|>")  # Qwen2-Audio / Qwen2.5-Omni end-of-turn tokens

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_WORD_RE = re.compile(r"\b\w+\b")
# "(B)", "( b )", "B)": an explicit option label, read as a letter even if a choice is that letter's word.
_LABEL_RE = re.compile(r"\(\s*([A-Za-z])\s*\)|([A-Za-z])\s*\)")
# "B", "B.", "B:": a bare letter; also a word ("a"), so it yields to a choice with the same tokens.
_BARE_RE = re.compile(r"([A-Za-z])\s*[.:]?")
# "(B) low", "B. low": a label followed by that option's text.
_LABEL_TEXT_RE = re.compile(r"\(?\s*([A-Za-z])\s*[).:]\s*(.+)", re.DOTALL)


def word_tokens(text: str) -> set[str]:
    """The official MMAU tokenizer: lower-cased `\\b\\w+\\b` words, as a set."""
    return set(_WORD_RE.findall(text.lower()))


def normalize(text: str) -> str:
    """Case- and space-insensitive form for comparing an answer with a choice ("  High. " == "high")."""
    text = " ".join(text.casefold().split())
    return text.strip("\"'`").rstrip(".").strip()


def strip_end_of_turn(text: str) -> str:
    """Drop trailing end-of-turn markers (and whitespace): decoders keep them when special tokens stay."""
    text = text.rstrip()
    changed = True
    while changed:
        changed = False
        for marker in END_OF_TURN_MARKERS:
            if text.endswith(marker):
                text = text[: -len(marker)].rstrip()
                changed = True
    return text


def last_answer_span(text: str) -> str | None:
    """Content of the LAST complete `<answer>...</answer>` pair, or None when there is none.

    The last one, because a model that revises itself ends with its final word (and R1-AQA reads it so).
    """
    spans = _ANSWER_RE.findall(text)
    return spans[-1] if spans else None


def listed_choices(sample: Any) -> list[str]:
    """The options in the order the source lists them, repeats included: what option letters refer to.

    Why: MMAU repeats a choice verbatim in 27 test-mini items and the reader keeps `choices` unique (the
    published list goes to `extra["original_choices"]`); with `zero, zero, seven, one` the official letter
    of `one` is D, but it is C in the de-duplicated list. Prompts letter this list and the scorer maps
    letters through it, so a letter means the published option. Duck-typed: any object with `choices`
    (and optionally `extra`).
    """
    choices = list(sample.choices)
    listed = (getattr(sample, "extra", None) or {}).get("original_choices")
    if listed is None:
        return choices
    if not isinstance(listed, list) or list(dict.fromkeys(listed)) != choices:
        raise ValueError(
            f"sample {getattr(sample, 'id', '?')!r}: extra['original_choices'] {listed!r} is not choices "
            f"{choices!r} with repeats; the option letters would be ambiguous")
    return list(listed)


def choice_index(candidate: str, choices: Sequence[str]) -> int | None:
    """Index of the choice equal to `candidate` up to case, spacing and a trailing full stop."""
    key = normalize(candidate)
    for i, choice in enumerate(choices):
        if normalize(choice) == key:
            return i
    return None


def letter_index(candidate: str, choices: Sequence[str]) -> int | None:
    """Index named by an option letter ("A", "(B)", "B.", "b)", "(B) low"), or None.

    Why the care: MMAU scores by word tokens, so a bare "A" collides with the word "a" in other choices and
    can never mean option (A) there. We map letters to choice text first, except where that would guess:
    a bare letter whose word is itself a choice's only token (a music item with choices "G", "A#", ...)
    stays text, and "(B) text" maps only when the text is option B's text.
    """
    n = len(choices)
    label = _LABEL_RE.fullmatch(candidate)
    if label:
        i = LETTERS.index((label.group(1) or label.group(2)).upper())
        return i if i < n else None
    bare = _BARE_RE.fullmatch(candidate)
    if bare:
        letter = bare.group(1)
        i = LETTERS.index(letter.upper())
        if i >= n or any(word_tokens(c) == {letter.lower()} for c in choices):
            return None
        return i
    labelled = _LABEL_TEXT_RE.fullmatch(candidate)
    if labelled:
        i = LETTERS.index(labelled.group(1).upper())
        if i < n and normalize(labelled.group(2)) == normalize(choices[i]):
            return i
    return None


def extract_answer(text: str | None, choices: Sequence[str]) -> str | None:
    """The answer a completion gives: the choice's text when it names one, else the raw answer string.

    Steps: content of the last `<answer>` pair (else the whole text, end-of-turn markers dropped); if it
    equals a choice (case/space-insensitive) that choice (checked first: some MMAU choices are letters,
    e.g. notes "A".."D"); else if it is an option letter in range, that option's text; else the raw string,
    so the MMAU token rule can still judge it. None when nothing is left.
    """
    if text is None:
        return None
    span = last_answer_span(text)
    candidate = (span if span is not None else strip_end_of_turn(text)).strip()
    if not candidate:
        return None
    i = choice_index(candidate, choices)
    if i is None:
        i = letter_index(candidate, choices)
    return choices[i] if i is not None else candidate
