"""Option letters mean the option the official MMAU listing puts at that position (issue 8).

27 test-mini items repeat a choice (`zero, zero, seven, one`); the reader keeps `choices` unique and the published
list in `extra["original_choices"]`. The official listing is read here straight from the JSON, independently of
the reader, and `score`, the eval records and the prompt shown to the model must all follow it.
"""
from __future__ import annotations

import argparse
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from sari_ray.answers import LETTERS, listed_choices, word_tokens
from sari_ray.data.readers import read_samples
from sari_ray.data.schema import AudioMCQ
from sari_ray.eval_stats import majority_vote
from sari_ray.mmau import register_cli, score_predictions
from sari_ray.prompts import user_text

pytestmark = pytest.mark.unit

SHIFTED = {"91eb5cf6", "cf52aadd", "9b66a67f"}  # answer's letter differs between official and de-duplicated lists


@pytest.fixture(scope="module")
def official(mmau_test_mini) -> list[dict]:
    items = json.loads(mmau_test_mini.read_text())
    assert len(items) == 1000
    return items


@pytest.fixture(scope="module")
def samples(mmau_test_mini) -> dict[str, AudioMCQ]:
    return {s.id: s for s in read_samples(mmau_test_mini, format="mmau")}


def letter_forms(letter: str, choices: list[str]) -> list[str]:
    """Ways a model writes option `letter`; a bare letter only where no choice is that letter's word."""
    forms = [f"({letter})", f"{letter.lower()})", f"<answer>({letter})</answer>", f"<answer>{letter})</answer>"]
    if not any(word_tokens(c) == {letter.lower()} for c in choices):
        forms += [letter, f"{letter}.", f"<think>...</think><answer>{letter}</answer><|im_end|>"]
    return forms


def test_score_follows_the_official_listing_on_every_test_mini_item(official, samples):
    """For every item and every official position: the letter of a position holding the answer is correct; the
    letter of a position holding a different text is wrong (unless that text has exactly the answer's word
    tokens, which the official rule itself cannot tell apart: then it is judged as the official rule judges it)."""
    right = wrong = same_tokens = 0
    for item in official:
        sample = samples[item["id"]]
        listing, answer = item["choices"], item["answer"]
        for position, text in enumerate(listing):
            if text == answer:
                expected = True
                right += 1
            elif word_tokens(text) == word_tokens(answer):
                expected = True
                same_tokens += 1
            else:
                expected = False
                wrong += 1
            for prediction in letter_forms(LETTERS[position], listing):
                m = score_predictions([sample], {sample.id: prediction})
                assert (m["total"]["correct"] == 1) is expected, (item["id"], listing, answer, prediction)
    assert right == 1016  # 16 items list the answer twice: both letters are right
    assert wrong == 2946 and same_tokens == 12


def _run_score(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_score_answer_letters_all_right_other_letters_all_wrong(official, mmau_test_mini, tmp_path, capsys):
    """`sari-ray score` end to end: the official answer letter of all 1000 items scores 1000; the letter of the
    first position whose text has other word tokens scores 0 (the 3 shifted items included; one item, whose
    choices are permutations of the same words, has no such position and gets no prediction)."""
    def official_letter(item):
        return LETTERS[item["choices"].index(item["answer"])]

    def other_letter(item):
        answer = word_tokens(item["answer"])
        position = next((i for i, c in enumerate(item["choices"]) if word_tokens(c) != answer), None)
        return None if position is None else LETTERS[position]

    for pick, expected in ((official_letter, 1000), (other_letter, 0)):
        preds = tmp_path / "preds.jsonl"
        rows = [{"id": x["id"], "model_output": f"<answer>({pick(x)})</answer>"} for x in official if pick(x)]
        preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert _run_score(["score", "--data", str(mmau_test_mini), "--predictions", str(preds)]) == 0
        m = json.loads(capsys.readouterr().out)
        assert m["total"]["correct"] == expected and m["n_scored"] == len(rows) >= 999
    shifted = [x for x in official if x["id"][:8] in SHIFTED]
    assert len(shifted) == 3 and all(official_letter(x) == "D" for x in shifted)


def test_prompt_lists_the_choices_as_the_official_listing(official, samples):
    """The option lines the model sees are the official list, in order, repeats included."""
    for item in official:
        text = user_text(samples[item["id"]], "implicit")
        options = re.findall(r"^\(([A-Z])\) (.*)$", text, flags=re.M)
        assert options == [(LETTERS[i], c) for i, c in enumerate(item["choices"])], item["id"]
    zero = samples[next(x["id"] for x in official if x["id"].startswith("91eb5cf6"))]
    assert zero.choices == ["zero", "seven", "one"]  # the reader's unique list is unchanged
    assert "(A) zero\n(B) zero\n(C) seven\n(D) one" in user_text(zero, "structured")


def test_listed_choices_refuses_a_listing_that_is_not_the_choices_with_repeats():
    ok = AudioMCQ(id="q", audio="a.wav", question="?", choices=["a", "b"], answer="a",
                  extra={"original_choices": ["a", "b", "a"]})
    assert listed_choices(ok) == ["a", "b", "a"]
    assert listed_choices(SimpleNamespace(choices=("x", "y"))) == ["x", "y"]  # duck-typed, no extra
    bad = AudioMCQ(id="q7", audio="a.wav", question="?", choices=["a", "b"], answer="a",
                   extra={"original_choices": ["b", "a", "c"]})
    with pytest.raises(ValueError, match=r"sample 'q7': extra\['original_choices'\]"):
        listed_choices(bad)


def test_majority_vote_counts_a_repeated_choice_once():
    listing = ["zero", "zero", "seven", "one"]
    assert majority_vote(["(D)", "<answer>one</answer>", "(A)"], listing) == "one"
    assert majority_vote(["(A)", "(B)", "one"], listing) == "zero"  # both letters of "zero" are votes for it


class LetterEngine:
    """Answers with the LAST letter whose option line in the prompt is the sample's answer (or a wrong one)."""

    def __init__(self, answers: dict[str, str], wrong: bool = False):
        self.answers, self.wrong = answers, wrong

    def generate(self, prompts, audios, *, n, temperature, max_tokens, seed=None, top_p=1.0):
        out = []
        for prompt in prompts:
            options = re.findall(r"^\(([A-Z])\) (.*)$", prompt, flags=re.M)
            question = re.search(r"<\|audio_eos\|>(.*?)\n", prompt).group(1)
            answer = self.answers[question]
            letters = [letter for letter, text in options if (text == answer) != self.wrong
                       and (not self.wrong or word_tokens(text) != word_tokens(answer))]
            out.append([SimpleNamespace(text=f"<answer>{letters[-1]}</answer>", finish_reason="stop")] * n)
        return out


class Processor:
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "<|audio_bos|><|AUDIO|><|audio_eos|>" + messages[-1]["content"][1]["text"]


def test_eval_records_follow_the_official_letters(official, samples, tmp_path):
    """`eval` (fake engine that reads the letters off the real prompt): on the 27 items with repeated choices the
    answer's letter is always right and another text's letter always wrong, in the records and the metrics."""
    from sari_ray import evaluate
    from sari_ray.data.audio import write_wav

    items = [x for x in official if len(set(x["choices"])) < len(x["choices"])]
    assert len(items) == 27
    chosen = []
    for x in items:
        s = samples[x["id"]]
        s = AudioMCQ(**{**s.to_dict(), "audio": str(write_wav(tmp_path / f"{s.id}.wav", np.zeros(1600), 16000))})
        s.question = f"{s.question.strip()} [{s.id}]"  # one line, unique: the engine finds the answer by it
        chosen.append(s)
    answers = {s.question: s.answer for s in chosen}
    for wrong, expected in ((False, 27), (True, 0)):
        m = evaluate.evaluate_samples(LetterEngine(answers, wrong), Processor(), chosen, style="implicit",
                                      progress=False, out_dir=tmp_path / f"out{wrong}")
        assert m["total"]["correct"] == expected
        records = [json.loads(x) for x in (tmp_path / f"out{wrong}" / "predictions.jsonl").read_text().splitlines()]
        assert all(r["correct"] is not wrong for r in records)
        assert all((r["extracted"] == s.answer) is not wrong for r, s in zip(records, chosen))
