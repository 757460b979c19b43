"""MMAU scoring: our scorer against an independent transcription of the official rule, on every test-mini item.

The official rule is transcribed here (not imported) from MMAU's evaluation.py `string_match`, so a change to
`sari_ray.mmau` that drifts from it fails. Where the project deliberately differs (answer extraction, letter
mapping), the tests say so and check the difference separately.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from sari_ray.answers import LETTERS, extract_answer
from sari_ray.data.schema import AudioMCQ
from sari_ray.mmau import (
    KNOWN_REVISIONS,
    PredictionsFormatError,
    judge,
    mmau_correct,
    read_predictions,
    register_cli,
    score_predictions,
)

pytestmark = pytest.mark.unit

MMAU_TEST_MINI = Path(__file__).resolve().parents[2].parent / "shared/data/mmau/mmau-test-mini.json"


def official_string_match(answer: str, prediction: str, choices: list[str]) -> bool:
    """MMAU evaluation.py's `string_match`, transcribed statement by statement."""

    def tokenize(text):
        return set(re.findall(r"\b\w+\b", text.lower()))

    prediction_tokens = tokenize(prediction)
    answer_tokens = tokenize(answer)
    if not prediction_tokens:
        return False
    incorrect_tokens = set()
    for choice in choices:
        choice_tokens = tokenize(choice)
        if choice_tokens != answer_tokens:
            incorrect_tokens.update(choice_tokens - answer_tokens)
    cond1 = answer_tokens.issubset(prediction_tokens)
    cond2 = prediction_tokens.isdisjoint(incorrect_tokens)
    return cond1 and cond2


@pytest.fixture(scope="module")
def items() -> list[dict]:
    with open(MMAU_TEST_MINI, encoding="utf-8") as f:
        data = json.load(f)
    assert len(data) == 1000
    return data


def text_predictions(item: dict) -> list[str]:
    """Predictions with no option letter in them: the scorer must agree with the official rule exactly."""
    choices, answer = item["choices"], item["answer"]
    preds = [answer, "", "   ", "!!!", "I cannot tell from this audio.", "The sound is ambiguous", "none"]
    for c in choices:
        preds += [c, c.upper(), c.lower(), f"  {c}  ", f"{c}.", f"The answer is {c}.", f"It sounds like {c}"]
    for a, b in zip(choices, choices[1:]):
        preds += [f"{a} and {b}", f"{b} or {a}"]
    preds.append(" ".join(choices))
    return preds


def letter_predictions(n: int) -> list[tuple[str, int | None]]:
    """(prediction, option index it names) for every letter form, plus letters out of range."""
    out: list[tuple[str, int | None]] = []
    for i in range(n):
        letter = LETTERS[i]
        out += [(letter, i), (f"({letter})", i), (f"{letter}.", i), (f"{letter.lower()})", i)]
    out.append((LETTERS[n], None))
    out.append((f"({LETTERS[n]})", None))
    return out


def test_rule_matches_official_on_every_test_mini_item(items):
    """`mmau_correct` IS the official rule, on raw strings of every kind (letters and tags included)."""
    n_checked = 0
    for item in items:
        choices, answer = item["choices"], item["answer"]
        preds = text_predictions(item) + [p for p, _ in letter_predictions(len(choices))]
        preds += [f"<answer>{p}</answer>" for p in preds[:10]]
        for pred in preds:
            assert mmau_correct(pred, answer, choices) == official_string_match(answer, pred, choices), (
                item["id"], pred)
            n_checked += 1
    assert n_checked > 30_000


def test_judge_matches_official_on_text_answers(items):
    """Without letters, `judge` agrees with the official rule on the raw text, and on the same text in
    `<answer>` tags after reasoning that names other choices (extraction reads only the last answer)."""
    for item in items:
        choices, answer = item["choices"], item["answer"]
        distractor = " ".join(c for c in choices if c != answer)
        for pred in text_predictions(item):
            expected = official_string_match(answer, pred, choices)
            assert judge(pred, choices, answer) == expected, (item["id"], pred)
            tagged = f"<think>Maybe {distractor}?</think>\n<answer>{pred}</answer><|im_end|>"
            assert judge(tagged, choices, answer) == expected, (item["id"], tagged)
            if pred.strip():
                two = f"<answer>{distractor or 'x'}</answer> wait <answer>{pred}</answer>"
                assert judge(two, choices, answer) == expected, (item["id"], two)


def test_judge_maps_letters_before_the_rule(items):
    """Deliberate difference: an option letter is the option's text, then the official rule decides.

    Exception (no guessing): a bare letter whose word is itself a choice's only token (music items with
    choices "G", "A#", ...) is read as text and judged by the official rule as is.
    """
    official_wrong_on_letter = 0
    for item in items:
        choices, answer = item["choices"], item["answer"]
        for pred, index in letter_predictions(len(choices)):
            bare = re.fullmatch(r"[A-Za-z][.]?", pred) is not None
            ambiguous = bare and any(set(re.findall(r"\b\w+\b", c.lower())) == {pred[0].lower()} for c in choices)
            if index is None or ambiguous:
                expected = official_string_match(answer, extract_answer(pred, choices) or "", choices)
            else:
                expected = official_string_match(answer, choices[index], choices)
                official_wrong_on_letter += official_string_match(answer, pred, choices) != expected
            assert judge(pred, choices, answer) == expected, (item["id"], pred)
            assert judge(f"<answer>{pred}</answer>", choices, answer) == expected, (item["id"], pred)
    assert official_wrong_on_letter > 1000  # why we map: the raw rule misreads letter answers on test-mini


def test_letter_collision_with_word_a():
    """The official rule reads a letter as a word: "(A)" is the word "a", not option (A)."""
    choices = ["one", "a", "the", "an"]  # the shape of a real test-mini item ("twenty-one", ..., "a")
    assert official_string_match("a", "(A)", choices) is True  # option A is "one": the official rule errs
    assert official_string_match("a", "(B)", choices) is False  # option B is "a": the official rule errs
    assert not judge("(A)", choices, "a") and judge("(B)", choices, "a")
    assert judge("a", choices, "a")  # a bare "a" that is a choice's text stays that choice


def test_letter_forms():
    choices = ["a dog barking", "a cat meowing", "rain"]
    assert official_string_match("a dog barking", "A", choices) is False
    assert judge("A", choices, "a dog barking") and not judge("A", choices, "rain")
    assert judge("(C)", choices, "rain") and judge("<answer>c)</answer>", choices, "rain")
    assert judge("C.", choices, "rain") and judge(" ( c ) ", choices, "rain")
    assert judge("(B) a cat meowing", choices, "a cat meowing") and judge("B. A Cat Meowing", choices, "a cat meowing")
    assert extract_answer("(B) rain", choices) == "(B) rain"  # label and text disagree: left to the rule
    assert extract_answer("D", choices) == "D"  # out of range: not a letter


def test_choice_letters_are_read_as_choices():
    """MMAU music items have choices that are letters; those win over option letters."""
    notes = ["B", "C", "A", "D"]
    assert extract_answer("A", notes) == "A" and judge("A", notes, "A")
    assert extract_answer("(A)", notes) == "B"  # a parenthesised label is an option label
    sharp = ["G", "A#", "D", "E"]
    assert extract_answer("A", sharp) == "A" and judge("A", sharp, "A#")  # as the official rule reads it


def test_empty_and_none_are_wrong():
    choices = ["high", "low"]
    for pred in (None, "", "   ", "<answer> </answer>", "<|im_end|>", "..."):
        assert not judge(pred, choices, "high")
        assert not mmau_correct(pred, "high", choices)


def _samples(items: list[dict]) -> list[AudioMCQ]:
    return [
        AudioMCQ(
            id=x["id"], audio=x["audio_id"], question=x["question"], choices=x["choices"], answer=x["answer"],
            task=x["task"], sub_category=x["sub-category"], difficulty=x["difficulty"],
        )
        for x in items
    ]


def test_score_predictions_counts_missing_as_wrong(items):
    samples = _samples(items)
    predictions = {s.id: f"<answer>{s.answer}</answer>" for s in samples[:600]}
    predictions.update({s.id: "" for s in samples[600:700]})
    predictions["not-an-mmau-id"] = "x"
    m = score_predictions(samples, predictions)
    assert m["total"] == {"accuracy": 0.6, "correct": 600, "n": 1000}
    assert m["n_scored"] == 700 and m["n_missing"] == 300
    assert m["missing_ids"][0] == samples[700].id and len(m["missing_ids"]) <= 20
    assert m["n_unexpected"] == 1 and m["unexpected_ids"] == ["not-an-mmau-id"]
    for key in ("by_task", "by_difficulty", "by_sub_category"):
        assert sum(b["n"] for b in m[key].values()) == 1000
        assert sum(b["correct"] for b in m[key].values()) == 600
    assert set(m["by_task"]) == {"sound", "music", "speech"} and len(m["by_sub_category"]) == 27
    assert m["revision"] == next(iter(KNOWN_REVISIONS.values()))  # recognised from the answers
    assert score_predictions(samples[:5], {}, revision="v1")["revision"] == "v1"
    assert score_predictions(samples[:5], {})["revision"] == "unknown"
    json.dumps(m)


def test_score_predictions_rejects_duplicate_ids(items):
    samples = _samples(items[:3])
    with pytest.raises(ValueError, match="duplicate sample ids"):
        score_predictions(samples + samples[:1], {})


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_predictions_errors_name_the_line(tmp_path):
    good = {"id": "a", "model_output": "x"}
    cases = [
        (["{not json"], ":1: invalid JSON"),
        ([good, {"model_output": "y"}], ":2: expected a JSON object"),
        ([good, "", {"id": "b"}], ":3: no 'model_output'"),
        ([good, {"id": "a", "model_output": "z"}], ":2: id 'a' appears twice"),
        ([{"id": "a", "model_output": 3}], ":1: 'model_output' must be a string"),
    ]
    for rows, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            read_predictions(_write_jsonl(tmp_path / "p.jsonl", rows))
    assert read_predictions(_write_jsonl(tmp_path / "p.jsonl", [good, {"id": 7, "model_prediction": None}])) == {
        "a": "x", "7": None}


def _run_score(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_score_end_to_end(items, tmp_path, capsys):
    rows = [{"id": x["id"], "model_output": f"<answer>{x['answer']}</answer>"} for x in items[:900:2]]
    rows += [{"id": x["id"], "model_output": "(A)"} for x in items[1:900:2]]
    preds = _write_jsonl(tmp_path / "preds.jsonl", rows)
    assert _run_score(["score", "--data", str(MMAU_TEST_MINI), "--predictions", str(preds)]) == 0
    m = json.loads(capsys.readouterr().out)
    expected = sum(judge(r["model_output"], x["choices"], x["answer"]) for r, x in zip(
        rows, items[:900:2] + items[1:900:2]))
    assert m["total"]["n"] == 1000 and m["total"]["correct"] == expected
    assert m["n_missing"] == 100 and m["missing_ids"][0] == items[900]["id"]
    assert sum(b["correct"] for b in m["by_task"].values()) == m["total"]["correct"]
    assert sum(b["n"] for b in m["by_difficulty"].values()) == 1000
    assert m["revision"].startswith("v05.15.25")  # recognised through the readers too

    argv = ["score", "--data", str(MMAU_TEST_MINI), "--predictions", str(preds), "--format", "mmau"]
    assert _run_score(argv + ["--revision", "pre-2025-05-15"]) == 0
    assert json.loads(capsys.readouterr().out)["revision"] == "pre-2025-05-15"
    assert _run_score(["score", "--data", str(tmp_path / "nope.json"), "--predictions", str(preds)]) == 2
    assert "nope.json" in capsys.readouterr().err

    bad = _write_jsonl(tmp_path / "bad.jsonl", rows[:2] + ["oops"])
    assert _run_score(["score", "--data", str(MMAU_TEST_MINI), "--predictions", str(bad)]) == 2
    assert "bad.jsonl:3" in capsys.readouterr().err


def test_read_predictions_reports_every_malformed_line_at_once(tmp_path):
    good = {"id": "a", "model_output": "x"}
    path = _write_jsonl(tmp_path / "p.jsonl", [good, "{not json", {"model_output": "y"}, "", {"id": "b"},
                                               {"id": "a", "model_output": "z"}, {"id": "c", "model_output": 3}])
    with open(path, "ab") as f:
        f.write(b'{"id": "d", "model_output": "\xff"}\n')
    with pytest.raises(PredictionsFormatError) as err:
        read_predictions(path)
    assert err.value.errors == [
        f"{path}:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{path}:3: expected a JSON object with 'id' and 'model_output'",
        f"{path}:5: no 'model_output' for id 'b'",
        f"{path}:6: id 'a' appears twice (first on line 1)",
        f"{path}:7: 'model_output' must be a string, got int",
        f"{path}:8: not UTF-8: byte 0xff at byte offset {path.stat().st_size - 4} (column 30); save the file as UTF-8",
    ]
    assert str(err.value).startswith(f"{path}: 6 malformed prediction line(s):")


def test_cli_score_nothing_matches_is_an_error_partial_match_warns(items, tmp_path, capsys):
    data = ["score", "--data", str(MMAU_TEST_MINI), "--predictions"]
    other = _write_jsonl(tmp_path / "other.jsonl", [{"id": f"x{i}", "model_output": "A"} for i in range(20)])
    assert _run_score(data + [str(other)]) == 2
    captured = capsys.readouterr()
    assert "none of the 20 predictions matches any of the 1000 sample ids" in captured.err and "'x0'" in captured.err
    assert captured.out == ""
    empty = _write_jsonl(tmp_path / "empty.jsonl", [])
    assert _run_score(data + [str(empty)]) == 2
    assert "none of the 0 predictions" in capsys.readouterr().err

    rows = [{"id": x["id"], "model_output": x["answer"]} for x in items[:10]] + [{"id": "stray", "model_output": "a"}]
    assert _run_score(data + [str(_write_jsonl(tmp_path / "some.jsonl", rows))]) == 0
    captured = capsys.readouterr()
    assert "warning: 1 of 11 predictions match no sample id and are not scored (first: ['stray'])" in captured.err
    assert "warning: 990 of 1000 samples have no prediction and count as wrong" in captured.err
    assert json.loads(captured.out)["total"]["correct"] == 10


def test_cli_score_user_errors_exit_2_without_traceback(tmp_path):
    """The installed command: wrong ids and malformed lines end in one message each, exit 2, no traceback."""
    import subprocess
    import sys

    other = _write_jsonl(tmp_path / "other.jsonl", [{"id": "x", "model_output": "A"}])
    bad = _write_jsonl(tmp_path / "bad.jsonl", ["oops", {"id": "y"}])
    for preds, message in ((other, "none of the 1 predictions matches"), (bad, "bad.jsonl:1: invalid JSON")):
        proc = subprocess.run([sys.executable, "-m", "sari_ray.cli", "score", "--data", str(MMAU_TEST_MINI),
                               "--predictions", str(preds)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "bad.jsonl:2: no 'model_output'" in proc.stderr  # every bad line, in the same run
