"""Prompts and SFT targets for the three answer styles (implicit, free-form CoT, SARI structured CoT).

The wording follows R1-AQA (arXiv 2503.11197): the question, "Please choose the answer from the following
options: ...", then "Output the final answer in <answer> </answer>." (or the `<think>` variant). The
structured style is SARI's (arXiv 2504.15900): planning, caption, reasoning, summary inside `<think>`.
`rewards.format_reward` checks exactly the grammar these instructions ask for, and `sft_target` writes it.

Pure: no torch, no transformers; processors are duck-typed.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from sari_ray.answers import LETTERS, listed_choices
from sari_ray.data.schema import STRUCTURED_PARTS, AudioMCQ

# What Qwen2-Audio's and Qwen2.5-Omni's chat templates emit for one audio clip; vLLM and the processor
# expand <|AUDIO|> into the clip's feature positions. No marker means the model never hears the clip.
AUDIO_MARKER = "<|audio_bos|><|AUDIO|><|audio_eos|>"

# Every tag of the completion grammar; reasoning text must not contain them (it would break the format).
TAG_NAMES = ("think", "answer", *STRUCTURED_PARTS)
TAG_RE = re.compile(r"</?(?:%s)>" % "|".join(TAG_NAMES))


class PromptStyle(StrEnum):
    """How the model is asked to answer. `PromptStyle("Free")` works; a bad name lists the valid ones."""

    implicit = "implicit"  # answer only: <answer>..</answer>
    free = "free"  # free-form CoT: <think>..</think><answer>..</answer>
    structured = "structured"  # SARI: <think><planning/><caption/><reasoning/><summary/></think><answer/>

    @classmethod
    def _missing_(cls, value: object) -> "PromptStyle":
        if isinstance(value, str):
            for member in cls:
                if member.value == value.strip().lower():
                    return member
        valid = ", ".join(m.value for m in cls)
        raise ValueError(f"unknown prompt style {value!r}; valid styles: {valid}")


CHOOSE = "Please choose the answer from the following options:"
ANSWER_WITH_TEXT = "Inside <answer> </answer>, write the text of the chosen option, not its letter."
_STRUCTURED_PART_HINTS = {
    "planning": "what the question asks and how to answer it",
    "caption": "what you hear in the audio",
    "reasoning": "step-by-step reasoning from what you heard to an option",
    "summary": "the conclusion in one or two sentences",
}
INSTRUCTIONS = {
    PromptStyle.implicit: "Output the final answer in <answer> </answer>.",
    PromptStyle.free: "Output the thinking process in <think> </think> and final answer in <answer> </answer>.",
    PromptStyle.structured: (
        "Output the thinking process in <think> </think> and final answer in <answer> </answer>. "
        "Inside <think> </think>, write four parts in this order: "
        + ", ".join(f"<{p}> </{p}> ({_STRUCTURED_PART_HINTS[p]})" for p in STRUCTURED_PARTS)
        + "."
    ),
}


def format_choices(choices: Sequence[str]) -> str:
    """One option per line, lettered as `answers.extract_answer` reads letters back: "(A) high\\n(B) low"."""
    if not choices:
        raise ValueError("a multiple-choice prompt needs at least one choice")
    if len(choices) > len(LETTERS):
        raise ValueError(f"{len(choices)} choices; at most {len(LETTERS)} can be lettered")
    return "\n".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(choices))


def user_text(sample: AudioMCQ, style: PromptStyle | str) -> str:
    """The text part of the user turn: question, lettered options, the style's output instruction."""
    style = PromptStyle(style)
    return "\n".join(
        [
            sample.question.strip(),
            CHOOSE,
            format_choices(listed_choices(sample)),  # as the source lists them: letters line up
            f"{INSTRUCTIONS[style]} {ANSWER_WITH_TEXT}",
        ]
    )


def build_messages(
    sample: AudioMCQ, style: PromptStyle | str, system: str | None = None
) -> list[dict[str, Any]]:
    """Chat messages in the HF multimodal format: the audio item first, then the text.

    No system message by default: the Qwen2-Audio template then inserts its own default one.
    """
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append(
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": sample.audio},
                {"type": "text", "text": user_text(sample, style)},
            ],
        }
    )
    return messages


def count_audio_items(messages: Sequence[dict[str, Any]]) -> int:
    """Audio clips in chat messages (items typed "audio", or carrying an `audio` / `audio_url` key)."""
    n = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            continue
        for item in content or ():
            if item.get("type") == "audio" or "audio" in item or "audio_url" in item:
                n += 1
    return n


def render_prompt(messages: Sequence[dict[str, Any]], processor: Any, audio_marker: str = AUDIO_MARKER) -> str:
    """Render the chat template to the prompt string the engines consume, checking no audio went missing.

    Why the check: R1-AQA's users lost the audio silently when a processor keyword was renamed; the model
    still answered, from the text alone. Exactly one `audio_marker` per clip or we fail loudly here.
    """
    prompt = processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    if not isinstance(prompt, str):
        raise TypeError(f"apply_chat_template returned {type(prompt).__name__}, expected str (one conversation)")
    expected, found = count_audio_items(messages), prompt.count(audio_marker)
    if found != expected:
        raise ValueError(
            f"the chat template dropped the audio: the messages hold {expected} audio clip(s) but the rendered "
            f"prompt has {found} {audio_marker!r} marker(s). Check that audio items are "
            "{'type': 'audio', 'audio': path} and that this processor's chat template supports audio "
            "(a renamed processor keyword silently dropped R1-AQA's audio)."
        )
    return prompt


def _require_text(value: str | None, sample_id: str, what: str) -> str:
    """Non-empty, tag-free text, or an error naming the sample and the field (bad SFT data fails early)."""
    if value is None or not value.strip():
        raise ValueError(f"sample {sample_id!r} has no {what}; it cannot be an SFT target for this style")
    if TAG_RE.search(value):
        raise ValueError(f"sample {sample_id!r}: {what} contains a format tag ({TAG_RE.search(value).group()})")
    return value.strip()


def sft_target(sample: AudioMCQ, style: PromptStyle | str) -> str:
    """The completion SFT teaches: reasoning in the style's tags, then `<answer>choice text</answer>`.

    Written to score 1.0 under `rewards.format_reward` for the same style, so SFT warm-up and GRPO agree.
    """
    style = PromptStyle(style)
    answer = f"<answer>{_require_text(sample.answer, sample.id, 'answer')}</answer>"
    if style is PromptStyle.implicit:
        return answer
    if style is PromptStyle.free:
        think = _require_text(sample.reasoning_free, sample.id, "reasoning_free")
    else:
        parts = sample.reasoning_structured
        if not parts:
            raise ValueError(
                f"sample {sample.id!r} has no reasoning_structured; it cannot be an SFT target for this style"
            )
        think = "\n".join(
            f"<{p}>{_require_text(parts.get(p), sample.id, f'reasoning_structured[{p!r}]')}</{p}>"
            for p in STRUCTURED_PARTS
        )
    return f"<think>\n{think}\n</think>\n{answer}"
