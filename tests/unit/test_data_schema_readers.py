"""Readers: real MMAU test-mini, R1-AQA index answers, our jsonl, all-bad-rows-at-once errors, HF + splits."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sari_ray.data.readers import (DataFormatError, from_hf_dataset, read_samples, split_samples, to_hf_dataset,
                                   write_jsonl)
from sari_ray.data.schema import AudioMCQ
from sari_ray.data.validate import validate_samples

pytestmark = pytest.mark.unit


def _line_of_item_starting(text: str, item_id: str) -> int:
    """Line of the `{` that opens the item with this id (the line above its `"id"` key)."""
    lines = text.splitlines()
    return next(i for i, line in enumerate(lines, start=1) if f'"id": "{item_id}"' in line) - 1


# ---- MMAU ----------------------------------------------------------------------------------------------

def test_mmau_all_items_parse_with_answer_in_choices(mmau_test_mini):
    raw = json.loads(mmau_test_mini.read_text())
    samples = read_samples(mmau_test_mini, format="mmau")
    assert len(samples) == len(raw) == 1000
    assert all(s.answer in s.choices for s in samples)
    assert all(isinstance(s.category, str) for s in samples)
    listed = [i for i, item in enumerate(raw) if isinstance(item["category"], list)]
    assert len(listed) == 13 and all(samples[i].category == raw[i]["category"][0] for i in listed)
    assert Counter(s.difficulty for s in samples) == Counter(item["difficulty"] for item in raw)
    assert {(s.difficulty, s.tier) for s in samples} == {("easy", 0), ("medium", 1), ("hard", 2)}
    assert [s.sub_category for s in samples] == [item["sub-category"] for item in raw]
    assert {s.task for s in samples} == {"sound", "music", "speech"}
    assert {s.source for s in samples} == {"mmau"}
    first = samples[0]
    assert first.audio == str(mmau_test_mini.parent / "test-mini-audios" / f"{first.id}.wav")
    # Structurally clean apart from audio (absent from the repo): every non-audio check passes.
    assert validate_samples(samples, check_audio=False, num_tiers=3).ok


def test_mmau_duplicate_choices_are_dropped_and_recorded(mmau_test_mini):
    samples = read_samples(mmau_test_mini, format="mmau")
    changed = [s for s in samples if "original_choices" in s.extra]
    assert len(changed) == 27  # the published file repeats a choice in 27 items
    for s in changed:
        assert len(set(s.choices)) == len(s.choices) < len(s.extra["original_choices"])
        assert list(dict.fromkeys(s.extra["original_choices"])) == s.choices


def test_mmau_audio_dir_overrides_base(mmau_test_mini, tmp_path):
    samples = read_samples(mmau_test_mini, format="mmau", audio_dir=tmp_path)
    assert samples[3].audio == str(tmp_path / "test-mini-audios" / f"{samples[3].id}.wav")


def test_mmau_bad_items_all_reported_with_their_lines(mmau_test_mini, tmp_path):
    items = json.loads(mmau_test_mini.read_text())
    items[5]["answer"] = 3
    items[700]["choices"] = "A or B"
    items[999]["category"] = ["Reasoning", "Perception"]
    del items[42]["question"]
    items[88]["difficulty"] = "impossible"
    text = json.dumps(items, indent=2)
    broken = tmp_path / "mmau.json"
    broken.write_text(text)
    with pytest.raises(DataFormatError) as caught:
        read_samples(broken, format="mmau")
    errors = caught.value.errors
    expected_lines = [_line_of_item_starting(text, items[i]["id"]) for i in (5, 42, 88, 700, 999)]
    assert [int(e.split(":")[1]) for e in errors] == expected_lines
    assert all(e.startswith(str(broken)) for e in errors)
    assert "'answer' must be a string" in errors[0] and "missing field 'question'" in errors[1]
    assert "difficulty" in errors[2] and "choices" in errors[3] and "category" in errors[4]
    assert str(broken) in str(caught.value) and "5 malformed row(s)" in str(caught.value)


def test_mmau_invalid_json_names_the_line(tmp_path):
    broken = tmp_path / "mmau.json"
    broken.write_text('[\n  {"id": "a"},\n  {"id": }\n]\n')
    with pytest.raises(DataFormatError, match=r"mmau\.json:3: invalid JSON"):
        read_samples(broken, format="mmau")


# ---- R1-AQA --------------------------------------------------------------------------------------------

def _r1aqa_row(**overrides):
    row = {"id": 183, "video_name": "-HG3Omg_89c_000030", "question_text": "What happened in the video?",
           "multi_choice": ["motorboat", "Yacht consignment", "Sailboat set sail", "Consignment car"],
           "answer": 1, "question_type": "Happening", "dataset_name": "AVQA", "audio_path": "wav/-HG3Omg_89c_30.wav"}
    row.update(overrides)
    return row


def test_r1aqa_index_answers_become_choice_text(tmp_path):
    path = tmp_path / "train_qa.data"
    rows = [_r1aqa_row(), _r1aqa_row(id=184, answer=3, audio_path="/abs/x.wav")]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first, second = read_samples(path, format="r1aqa")
    assert (first.id, first.answer, second.answer) == ("avqa-183", "Yacht consignment", "Consignment car")
    assert first.choices == rows[0]["multi_choice"] and first.question == "What happened in the video?"
    assert first.audio == str(tmp_path / "wav" / "-HG3Omg_89c_30.wav") and second.audio == "/abs/x.wav"
    assert first.extra["answer_index"] == 1 and first.extra["question_type"] == "Happening"
    assert read_samples(path, format="r1aqa", audio_dir="/data")[0].audio == "/data/wav/-HG3Omg_89c_30.wav"


def test_r1aqa_all_bad_rows_listed_with_line_numbers(tmp_path):
    lines = [
        json.dumps(_r1aqa_row()),  # 1 fine
        json.dumps(_r1aqa_row(answer=4)),  # 2 index out of range
        "",  # 3 blank: skipped
        '{"question_text": "q", "multi_choice": [',  # 4 bad JSON
        json.dumps(_r1aqa_row(answer=True)),  # 5 bool is not an index
        json.dumps({k: v for k, v in _r1aqa_row().items() if k != "audio_path"}),  # 6 missing field
        json.dumps(["not", "an", "object"]),  # 7
        json.dumps(_r1aqa_row(answer=-1)),  # 8 negative index
        json.dumps(_r1aqa_row(multi_choice=["a", 2])),  # 9 non-string choice
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as caught:
        read_samples(path, format="r1aqa")
    errors = caught.value.errors
    assert [int(e.split(":")[1]) for e in errors] == [2, 4, 5, 6, 7, 8, 9]
    assert "out of range" in errors[0] and "invalid JSON" in errors[1] and "'answer' must be an integer" in errors[2]
    assert "missing field 'audio_path'" in errors[3] and "expected a JSON object" in errors[4]
    assert "out of range" in errors[5] and "'multi_choice' must be a list of strings" in errors[6]


# ---- this project's jsonl ------------------------------------------------------------------------------

def _sample(i: int, **overrides) -> AudioMCQ:
    fields = dict(id=f"s{i}", audio=f"clips/{i}.wav", question="Is the tone high or low?", choices=["high", "low"],
                  answer="high", tier=i % 3, extra={"freqs_hz": [880 + i]})
    fields.update(overrides)
    return AudioMCQ(**fields)


def test_own_jsonl_round_trip_resolves_relative_audio(tmp_path):
    samples = [_sample(i) for i in range(4)] + [_sample(4, audio="/abs/clip.wav")]
    path = write_jsonl(samples, tmp_path / "set" / "data.jsonl")
    back = read_samples(path)
    assert [s.audio for s in back] == [str(tmp_path / "set" / "clips" / f"{i}.wav") for i in range(4)] + ["/abs/clip.wav"]
    for original, parsed in zip(samples, back):
        parsed.audio = original.audio
        assert parsed == original
    assert read_samples(path, audio_dir=tmp_path / "elsewhere")[0].audio == str(tmp_path / "elsewhere/clips/0.wav")


def test_own_jsonl_lists_every_malformed_row(tmp_path):
    good = _sample(0).to_dict()
    rows = [
        json.dumps(good),  # 1
        json.dumps({**good, "tier": "1"}),  # 2 tier as text
        json.dumps({**good, "colour": "red"}),  # 3 unknown field
        json.dumps({k: v for k, v in good.items() if k not in ("id", "answer")}),  # 4 two missing fields
        "{not json}",  # 5
        json.dumps({**good, "choices": "high, low"}),  # 6
        json.dumps({**good, "reasoning_structured": {"caption": 3}}),  # 7
        json.dumps({**good, "id": "fine"}),  # 8
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataFormatError) as caught:
        read_samples(path)
    errors = caught.value.errors
    assert [int(e.split(":")[1]) for e in errors] == [2, 3, 4, 5, 6, 7]
    assert "'tier' must be an integer or null" in errors[0] and "unknown field(s) ['colour']" in errors[1]
    assert "missing field 'id'" in errors[2] and "missing field 'answer'" in errors[2]
    assert "'reasoning_structured'" in errors[5]


def test_unknown_format_lists_the_valid_ones(tmp_path):
    path = write_jsonl([_sample(0)], tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="jsonl, mmau, r1aqa"):
        read_samples(path, format="csv")


# ---- HF datasets and splits ----------------------------------------------------------------------------

def test_hf_dataset_round_trip_keeps_mixed_extras(mmau_test_mini, synth_data):
    samples = read_samples(mmau_test_mini, format="mmau")[:50] + read_samples(synth_data)
    dataset = to_hf_dataset(samples)
    assert len(dataset) == len(samples) and dataset.features["tier"].dtype == "int64"
    assert from_hf_dataset(dataset) == samples


def test_split_is_deterministic_stratified_and_order_independent():
    samples = [_sample(i, tier=0 if i < 60 else 1 if i < 90 else 2) for i in range(100)]
    train, held_out = split_samples(samples, eval_fraction=0.2, seed=7)
    assert len(held_out) == 20 and len(train) == 80
    assert {s.id for s in train}.isdisjoint(s.id for s in held_out)
    assert Counter(s.tier for s in held_out) == {0: 12, 1: 6, 2: 2}
    assert [s.id for s in held_out] == sorted((s.id for s in held_out), key=lambda x: int(x[1:]))  # input order
    again = split_samples(list(reversed(samples)), eval_fraction=0.2, seed=7)[1]
    assert {s.id for s in again} == {s.id for s in held_out}
    other_seed = split_samples(samples, eval_fraction=0.2, seed=8)[1]
    assert {s.id for s in other_seed} != {s.id for s in held_out}
    assert len(split_samples(samples[:3], eval_fraction=0.05, seed=0)[1]) == 1
    with pytest.raises(ValueError):
        split_samples(samples, eval_fraction=1.0)


def test_logic_modules_import_without_torch():
    code = ("import sys; import sari_ray.data, sari_ray.data.readers, sari_ray.data.validate, sari_ray.data.synth, "
            "sari_ray.data.cli; heavy = {'torch', 'torchaudio', 'datasets', 'ray', 'vllm'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
