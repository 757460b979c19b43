"""Prompts: R1-AQA wording, lettered options, the audio marker check, and SFT targets that pass the format reward."""
from __future__ import annotations

import jinja2
import pytest

from sari_ray.answers import extract_answer
from sari_ray.data.schema import STRUCTURED_PARTS, AudioMCQ
from sari_ray.prompts import (
    AUDIO_MARKER,
    PromptStyle,
    build_messages,
    format_choices,
    render_prompt,
    sft_target,
    user_text,
)
from sari_ray.rewards import format_reward, score_completion

pytestmark = pytest.mark.unit

# Shaped like Qwen2-Audio-7B-Instruct's chat template (default system turn, "Audio N:" line per clip).
QWEN2_AUDIO_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A template that only knows an old key: what a renamed keyword does to the audio (silently gone).
AUDIO_DROPPING_TEMPLATE = QWEN2_AUDIO_TEMPLATE.replace(
    "'audio' in content or 'audio_url' in content or content['type'] == 'audio'", "'audios' in content"
)


class FakeProcessor:
    """Duck-typed stand-in for a HF processor: renders its jinja chat template like apply_chat_template."""

    def __init__(self, template: str):
        self.template = jinja2.Environment().from_string(template)

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        assert tokenize is False
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt)


def make_sample(**overrides) -> AudioMCQ:
    fields = dict(
        id="s1", audio="/data/a.wav", question="What is the pitch of the tone?", choices=["high", "low"],
        answer="high",
        reasoning_structured={
            "planning": "Decide whether the tone is high or low.",
            "caption": "A steady sine tone around 2 kHz.",
            "reasoning": "2 kHz is well above the speech range, so the tone is high.",
            "summary": "The tone is high.",
        },
        reasoning_free="The tone sits around 2 kHz, which is high.",
    )
    fields.update(overrides)
    return AudioMCQ(**fields)


def test_prompt_style_parsing():
    assert PromptStyle("structured") is PromptStyle.structured
    assert PromptStyle(" Free ") is PromptStyle.free
    assert PromptStyle(PromptStyle.implicit) is PromptStyle.implicit
    assert PromptStyle.free == "free"
    with pytest.raises(ValueError, match="valid styles: implicit, free, structured"):
        PromptStyle("sari")


def test_format_choices():
    assert format_choices(["high", "low"]) == "(A) high\n(B) low"
    with pytest.raises(ValueError):
        format_choices([])


def test_user_text_follows_r1_aqa_wording():
    sample = make_sample()
    implicit = user_text(sample, "implicit")
    assert implicit.startswith("What is the pitch of the tone?\nPlease choose the answer from the following options:\n")
    assert "(A) high\n(B) low" in implicit
    assert "Output the final answer in <answer> </answer>." in implicit
    assert "<think>" not in implicit and "not its letter" in implicit
    assert "Output the thinking process in <think> </think> and final answer in <answer> </answer>." in user_text(
        sample, "free")
    structured = user_text(sample, PromptStyle.structured)
    positions = [structured.index(f"<{p}> </{p}>") for p in STRUCTURED_PARTS]
    assert positions == sorted(positions)  # the four tags, named in order


def test_build_messages_hf_multimodal_format():
    sample = make_sample()
    messages = build_messages(sample, "free")
    assert messages == [
        {"role": "user", "content": [
            {"type": "audio", "audio": "/data/a.wav"}, {"type": "text", "text": user_text(sample, "free")}]}
    ]
    with_system = build_messages(sample, "free", system="Be brief.")
    assert with_system[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}


def test_render_prompt_keeps_one_audio_marker_per_clip():
    sample = make_sample()
    processor = FakeProcessor(QWEN2_AUDIO_TEMPLATE)
    prompt = render_prompt(build_messages(sample, "structured"), processor)
    assert prompt.count(AUDIO_MARKER) == 1
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAudio 1: ")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert user_text(sample, "structured") in prompt

    two_clips = build_messages(sample, "free", system="Be brief.")
    two_clips[-1]["content"].insert(0, {"type": "audio", "audio": "/data/b.wav"})
    assert render_prompt(two_clips, processor).count(AUDIO_MARKER) == 2


def test_render_prompt_fails_loudly_when_the_template_drops_audio():
    with pytest.raises(ValueError, match="chat template dropped the audio.*1 audio clip.*0 "):
        render_prompt(build_messages(make_sample(), "free"), FakeProcessor(AUDIO_DROPPING_TEMPLATE))


@pytest.mark.parametrize("style", list(PromptStyle))
def test_sft_target_scores_full_reward(style):
    sample = make_sample()
    target = sft_target(sample, style)
    assert format_reward(target, style) == 1.0
    assert format_reward(target + "<|im_end|>", style) == 1.0
    assert extract_answer(target, sample.choices) == "high"
    assert score_completion(target, sample, style)["reward"] == 2.0


def test_sft_target_shapes():
    sample = make_sample()
    assert sft_target(sample, "implicit") == "<answer>high</answer>"
    assert sft_target(sample, "free") == (
        "<think>\nThe tone sits around 2 kHz, which is high.\n</think>\n<answer>high</answer>")
    structured = sft_target(sample, "structured")
    assert structured.startswith("<think>\n<planning>Decide") and structured.endswith("</think>\n<answer>high</answer>")


def test_sft_target_errors_name_the_sample():
    with pytest.raises(ValueError, match="sample 'x9' has no reasoning_free"):
        sft_target(make_sample(id="x9", reasoning_free=None), "free")
    with pytest.raises(ValueError, match="sample 'x9' has no reasoning_structured"):
        sft_target(make_sample(id="x9", reasoning_structured=None), "structured")
    parts = dict(make_sample().reasoning_structured, caption="  ")
    with pytest.raises(ValueError, match=r"sample 'x9' has no reasoning_structured\['caption'\]"):
        sft_target(make_sample(id="x9", reasoning_structured=parts), "structured")
    with pytest.raises(ValueError, match="sample 'x9': reasoning_free contains a format tag"):
        sft_target(make_sample(id="x9", reasoning_free="so <answer>low</answer>"), "free")
    assert sft_target(make_sample(reasoning_free=None, reasoning_structured=None), "implicit")
