"""Rewards: a strict format grammar per style, extraction, accuracy by the MMAU rule, every component reported."""
from __future__ import annotations

import pytest

from sari_ray.data.schema import AudioMCQ
from sari_ray.rewards import (
    RewardWeights,
    accuracy_reward,
    extract_answer,
    format_reward,
    score_batch,
    score_completion,
)

pytestmark = pytest.mark.unit

CHOICES = ["high", "low", "medium pitch"]
PARTS = "<planning>p</planning><caption>c</caption><reasoning>r</reasoning><summary>s</summary>"
GOOD = {
    "implicit": "<answer>high</answer>",
    "free": "<think>It is high.</think><answer>high</answer>",
    "structured": f"<think>{PARTS}</think><answer>high</answer>",
}


@pytest.mark.parametrize("style", list(GOOD))
def test_well_formed_passes_with_whitespace_and_end_of_turn(style):
    text = GOOD[style]
    tails = ("", "<|im_end|>", " <|endoftext|>\n", "<|im_end|><|endoftext|>")
    for variant in [f"\n  {text}\n"] + [text + tail for tail in tails]:
        assert format_reward(variant, style) == 1.0, variant
    spaced = text.replace("><", ">\n<")
    assert format_reward(spaced, style) == 1.0


@pytest.mark.parametrize("style", list(GOOD))
def test_common_failures(style):
    text = GOOD[style]
    bad = [
        None, "", "high",
        text + " I hope that helps.",  # trailing text
        "Sure! " + text,  # leading text
        text + "<answer>low</answer>",  # two answer pairs
        text.replace("<answer>high</answer>", "<answer> </answer>"),  # empty answer
        text.replace("</answer>", ""),  # unclosed
        text.upper(),  # tags are case-sensitive
    ]
    for variant in bad:
        assert format_reward(variant, style) == 0.0, variant


def test_think_styles_are_not_interchangeable():
    assert format_reward(GOOD["implicit"], "free") == 0.0
    assert format_reward(GOOD["free"], "implicit") == 0.0
    assert format_reward(GOOD["free"], "structured") == 0.0
    assert format_reward(GOOD["structured"], "free") == 1.0  # structured CoT is valid free-form CoT


def test_free_strictness():
    assert format_reward("<think> </think><answer>high</answer>", "free") == 0.0  # empty think
    assert format_reward("<think>a</think>b<answer>high</answer>", "free") == 0.0  # text between
    assert format_reward("<think>a<think>b</think></think><answer>high</answer>", "free") == 0.0  # nested
    assert format_reward("<think>a <answer>low</answer></think><answer>high</answer>", "free") == 0.0


def test_structured_strictness():
    ok = f"<think>{PARTS}</think><answer>high</answer>"
    missing = ok.replace("<caption>c</caption>", "")
    swapped = ok.replace("<caption>c</caption><reasoning>r</reasoning>", "<reasoning>r</reasoning><caption>c</caption>")
    empty = ok.replace("<summary>s</summary>", "<summary>\n</summary>")
    stray = ok.replace("<think>", "<think>Let me plan. ")
    doubled = ok.replace("<summary>s</summary>", "<summary>s</summary><summary>t</summary>")
    nested = ok.replace("<reasoning>r</reasoning>", "<reasoning>r<caption>x</caption></reasoning>")
    for text in (missing, swapped, empty, stray, doubled, nested):
        assert format_reward(text, "structured") == 0.0, text


def test_implicit_strictness():
    assert format_reward("<answer>low</answer>", "implicit") == 1.0
    assert format_reward("The answer: <answer>low</answer>", "implicit") == 0.0
    assert format_reward("<answer>low</answer><answer>low</answer>", "implicit") == 0.0
    assert format_reward("<answer><think>x</think>low</answer>", "implicit") == 0.0


def test_unknown_style_lists_valid_ones():
    with pytest.raises(ValueError, match="implicit, free, structured"):
        format_reward("<answer>x</answer>", "cot")


def test_extract_answer():
    assert extract_answer("<answer>low</answer>", CHOICES) == "low"
    assert extract_answer("<answer>high</answer> no, <answer>LOW </answer>", CHOICES) == "low"  # last pair
    assert extract_answer("<answer>B</answer>", CHOICES) == "low"
    for letter in ("C", "(C)", "C.", "c)", "(c)", "C:"):
        assert extract_answer(letter, CHOICES) == "medium pitch", letter
    assert extract_answer("(C) Medium  Pitch", CHOICES) == "medium pitch"
    assert extract_answer("  Medium   PITCH. ", CHOICES) == "medium pitch"
    assert extract_answer("high<|im_end|>", CHOICES) == "high"
    assert extract_answer("(D)", CHOICES) == "(D)"  # out of range stays raw
    assert extract_answer("It is quite high", CHOICES) == "It is quite high"  # raw, for the MMAU rule
    assert extract_answer("<think>no answer tag</think>", CHOICES) == "<think>no answer tag</think>"
    assert extract_answer("<answer>  </answer>", CHOICES) is None
    assert extract_answer(None, CHOICES) is None and extract_answer("", CHOICES) is None


def test_accuracy_reward_uses_the_mmau_rule():
    assert accuracy_reward("<answer>high</answer>", CHOICES, "high") == 1.0
    assert accuracy_reward("<answer>It sounds high to me</answer>", CHOICES, "high") == 1.0
    assert accuracy_reward("<answer>high or low</answer>", CHOICES, "high") == 0.0
    assert accuracy_reward("<answer>A</answer>", CHOICES, "high") == 1.0
    assert accuracy_reward("<answer>pitch</answer>", CHOICES, "medium pitch") == 0.0  # not every answer token
    assert accuracy_reward("<answer></answer>", CHOICES, "high") == 0.0
    assert accuracy_reward("high", CHOICES, "high") == 1.0  # no tags: the whole text (format says the rest)


def test_score_completion_reports_every_component():
    sample = AudioMCQ(id="s", audio="a.wav", question="q", choices=CHOICES, answer="high")
    both = score_completion(GOOD["free"], sample, "free")
    assert both == {"reward": 2.0, "accuracy": 1.0, "format": 1.0, "extracted": "high"}
    wrong = score_completion("<think>x</think><answer>low</answer>", (CHOICES, "high"), "free", RewardWeights(2.0, 1.0))
    assert wrong == {"reward": 1.0, "accuracy": 0.0, "format": 1.0, "extracted": "low"}
    right_unformatted = score_completion("high", sample, "free", RewardWeights(accuracy=2.0))
    assert right_unformatted == {"reward": 2.0, "accuracy": 1.0, "format": 0.0, "extracted": "high"}
    with pytest.raises(TypeError, match="AudioMCQ or a \\(choices, answer\\) pair"):
        score_completion("x", "high", "free")


def test_score_batch():
    sample = AudioMCQ(id="s", audio="a.wav", question="q", choices=CHOICES, answer="low")
    texts = ["<answer>low</answer>", "<answer>high</answer>", "low", None]
    scores = score_batch(texts, [sample] * 4, "implicit")
    assert [s["reward"] for s in scores] == [2.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="4 completions but 1 samples"):
        score_batch(texts, [sample], "implicit")


def test_reward_weights_validation():
    assert RewardWeights() == RewardWeights(accuracy=1.0, format=1.0)
    for bad in (-1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="reward weight accuracy="):
            RewardWeights(accuracy=bad)


def test_logic_modules_import_nothing_heavy():
    """The reward path runs inside rollout workers and tests: it must not pull in torch, Ray or vLLM."""
    import subprocess
    import sys

    code = (
        "import sys, sari_ray.prompts, sari_ray.rewards, sari_ray.mmau, sari_ray.answers\n"
        "heavy = {'torch', 'transformers', 'ray', 'vllm', 'deepspeed', 'mlflow', 'jinja2'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_letter_answers_name_the_published_option_when_choices_repeat():
    """MMAU lists `zero, zero, seven, one` (answer `one`): the reader keeps choices unique, but letter D must
    still mean `one`, as the prompt shows it."""
    from sari_ray.data.schema import AudioMCQ
    from sari_ray.rewards import score_completion

    sample = AudioMCQ(id="m1", audio="a.wav", question="How many?", choices=["zero", "seven", "one"], answer="one",
                      extra={"original_choices": ["zero", "zero", "seven", "one"]})
    assert score_completion("<answer>D</answer>", sample, "implicit")["accuracy"] == 1.0
    assert score_completion("<answer>C</answer>", sample, "implicit")["accuracy"] == 0.0
