"""Validation: every problem of every kind listed in one pass (file and 1-based line, id), skip policy drops
and counts (malformed rows too), non-UTF-8 bytes, empty files, huge rows, too-short clips, audio outside the
data folder, and the `data validate` CLI's exit codes."""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pytest

from sari_ray.data.audio import MIN_AUDIO_SAMPLES, write_wav
from sari_ray.data.cli import register_cli
from sari_ray.data.readers import DataFormatError, read_samples, write_jsonl
from sari_ray.data.schema import AudioMCQ
from sari_ray.data.validate import (MAX_CHOICES, PROBLEM_KINDS, DataValidationError, sample_problems, validate_file,
                                    validate_samples)

pytestmark = pytest.mark.unit

ORIGINAL_KINDS = ("missing_audio", "undecodable_audio", "empty_question", "too_few_choices", "duplicate_choices",
                  "answer_not_in_choices", "bad_tier", "duplicate_id")


@pytest.fixture
def clip(tmp_path):
    return str(write_wav(tmp_path / "tone.wav", 0.3 * np.sin(np.linspace(0, 600, 8000))))


def _row(i: int, audio: str, **overrides) -> AudioMCQ:
    fields = dict(id=f"r{i}", audio=audio, question="Is the tone high or low in pitch?", choices=["high", "low"],
                  answer="low", tier=0)
    fields.update(overrides)
    return AudioMCQ(**fields)


def _line(i: int, audio: str = "tone.wav", **overrides) -> str:
    return json.dumps(_row(i, audio, **overrides).to_dict())


@pytest.fixture
def mixed_rows(tmp_path, clip):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF" + b"\x01" * 64)
    return [
        _row(0, clip),  # fine
        _row(1, str(tmp_path / "nowhere.wav")),  # missing_audio
        _row(2, str(corrupt)),  # undecodable_audio
        _row(3, clip, question="   "),  # empty_question
        _row(4, clip, choices=["low"]),  # too_few_choices
        _row(5, clip, choices=["High", "low", "high "]),  # duplicate_choices (a grader reads them alike)
        _row(6, clip, answer="medium"),  # answer_not_in_choices
        _row(7, clip, tier=-1),  # bad_tier
        _row(8, clip, tier="1"),  # bad_tier: not an int
        _row(9, clip, tier=3),  # bad_tier: >= num_tiers
        _row(0, clip),  # duplicate_id (of row 0)
        _row(11, clip, tier=2),  # fine
    ]


def test_error_policy_lists_every_problem_at_once(mixed_rows):
    with pytest.raises(DataValidationError) as caught:
        validate_samples(mixed_rows, num_tiers=3, source="set/data.jsonl")
    report, text = caught.value.report, str(caught.value)
    assert [(p.line, p.kind) for p in report.problems] == [  # 1-based, like the readers' line numbers
        (2, "missing_audio"), (3, "undecodable_audio"), (4, "empty_question"), (5, "too_few_choices"),
        (6, "duplicate_choices"), (7, "answer_not_in_choices"), (8, "bad_tier"), (9, "bad_tier"), (10, "bad_tier"),
        (11, "duplicate_id")]
    assert [p.index for p in report.problems] == [p.line - 1 for p in report.problems]
    assert report.counts == {kind: (3 if kind == "bad_tier" else 1) for kind in ORIGINAL_KINDS}
    for problem in report.problems:
        assert problem.message.startswith(f"set/data.jsonl:{problem.line}: id={problem.sample_id!r}: {problem.kind}")
        assert problem.message in text
    assert "already used on line 1" in report.problems[-1].message
    assert "corrupt.wav" in report.problems[1].message and "nowhere.wav" in report.problems[0].message


def test_skip_policy_drops_bad_rows_and_counts(mixed_rows):
    report = validate_samples(mixed_rows, policy="skip", num_tiers=3, source="d.jsonl")
    assert [s.id for s in report.kept] == ["r0", "r11"] and report.samples is report.kept
    assert (report.total, report.dropped, len(report.problems)) == (12, 10, 10)
    assert report.counts["bad_tier"] == 3 and report.audio_checked == 1
    summary = report.summary()
    assert "12 samples, 2 kept, 10 dropped" in summary and "bad_tier: 3" in summary and "missing_audio: 1" in summary


def test_without_audio_check_or_tier_limit(mixed_rows):
    report = validate_samples(mixed_rows, check_audio=False, policy="skip")
    kinds = {p.kind for p in report.problems}
    assert "missing_audio" not in kinds and "undecodable_audio" not in kinds
    assert [p.line for p in report.problems if p.kind == "bad_tier"] == [8, 9]  # tier 3 is fine without a limit
    assert report.problems[0].message.startswith("row 4: id='r3'")  # no file: 1-based row positions


def test_pure_checks_and_missing_tier_under_a_curriculum():
    sample = _row(0, "unused.wav", tier=None)
    assert sample_problems(sample) == []
    assert [kind for kind, _ in sample_problems(sample, num_tiers=3)] == ["bad_tier"]
    assert [kind for kind, _ in sample_problems(_row(0, "x", tier=True))] == ["bad_tier"]  # bool is not a tier
    with pytest.raises(ValueError, match="policy"):
        validate_samples([sample], policy="warn")
    assert set(ORIGINAL_KINDS) < set(PROBLEM_KINDS)


def test_truncation_is_reported(tmp_path):
    long_clip = str(write_wav(tmp_path / "long.wav", np.full(31 * 4000, 0.1, np.float32), sample_rate=4000))
    report = validate_samples([_row(0, long_clip), _row(1, long_clip)])
    assert report.ok and report.audio_checked == 1 and report.audio_truncated == 1  # decoded once per file
    assert "1 longer than the 30 s model window" in report.summary()


def test_synthetic_set_is_clean(synth_data):
    report = validate_file(synth_data, num_tiers=3)
    assert report.ok and len(report.kept) == 48 and report.audio_checked == 48


# ---- files: malformed and broken rows in one pass, 1-based lines ----------------------------------------

@pytest.fixture
def two_malformed_eight_broken(tmp_path, clip):
    """Line 1 fine, 2 malformed lines (bad JSON; a text tier), 8 semantically broken rows, a blank line."""
    lines = [
        _line(0),  # 1 fine
        "{not json",  # 2 malformed
        _line(2, question=" "),  # 3 empty_question
        _line(3, choices=["low"]),  # 4 too_few_choices
        "",  # 5 blank: skipped, but counted as a line
        _line(5, answer="medium"),  # 6 answer_not_in_choices
        json.dumps({**_row(6, "tone.wav").to_dict(), "tier": "1"}),  # 7 malformed (type)
        _line(7, tier=5),  # 8 bad_tier
        _line(8, audio="nowhere.wav"),  # 9 missing_audio
        _line(9, choices=["low", "Low"]),  # 10 duplicate_choices (and answer "low" is fine)
        _line(0),  # 11 duplicate_id of line 1
        _line(11, choices=[f"c{i}" for i in range(MAX_CHOICES + 1)], answer="c0"),  # 12 too_many_choices
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_rows_do_not_hide_the_other_problems(two_malformed_eight_broken):
    with pytest.raises(DataValidationError) as caught:
        validate_file(two_malformed_eight_broken, num_tiers=3)
    report = caught.value.report
    assert [(p.line, p.kind) for p in report.problems] == [
        (2, "malformed_row"), (3, "empty_question"), (4, "too_few_choices"), (6, "answer_not_in_choices"),
        (7, "malformed_row"), (8, "bad_tier"), (9, "missing_audio"), (10, "duplicate_choices"), (11, "duplicate_id"),
        (12, "too_many_choices")]
    path = str(two_malformed_eight_broken)
    assert all(p.message.startswith(f"{path}:{p.line}: ") for p in report.problems)
    assert "already used on line 1" in report.problems[8].message
    assert "'tier' must be an integer or null" in report.problems[4].message
    assert report.total == 11 and report.counts["malformed_row"] == 2


def test_skip_drops_malformed_rows_too_and_goes_on(two_malformed_eight_broken):
    report = validate_file(two_malformed_eight_broken, policy="skip", num_tiers=3)
    assert [s.id for s in report.kept] == ["r0"]
    assert (report.total, report.dropped, report.counts["malformed_row"]) == (11, 10, 2)
    assert "11 samples, 1 kept, 10 dropped" in report.summary() and "malformed_row: 2" in report.summary()


def test_reader_and_validator_number_lines_alike(tmp_path, clip):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(["", _line(0), "{bad", _line(3, answer="x")]) + "\n")
    with pytest.raises(DataFormatError) as caught:
        read_samples(path)
    assert caught.value.errors[0].startswith(f"{path}:3: invalid JSON")
    with pytest.raises(DataValidationError) as caught:
        validate_file(path)
    assert [p.line for p in caught.value.report.problems] == [3, 4]


# ---- bytes, emptiness, size ------------------------------------------------------------------------------

def test_non_utf8_byte_names_file_line_and_offset(tmp_path, clip):
    first = (_line(0) + "\n").encode()
    bad = _line(1).encode().replace(b"Is the", b"Is th\xe9", 1)  # Latin-1 e-acute
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(first + bad + b"\n" + (_line(2) + "\n").encode())
    offset = len(first) + bad.index(b"\xe9")
    with pytest.raises(DataValidationError) as caught:
        validate_file(path)
    (problem,) = caught.value.report.problems
    assert problem.line == 2 and problem.kind == "malformed_row"
    assert f"{path}:2: malformed_row: not UTF-8: byte 0xe9 at byte offset {offset}" in problem.message
    assert [s.id for s in validate_file(path, policy="skip").kept] == ["r0", "r2"]  # skip drops just that line
    with pytest.raises(DataFormatError, match=rf"latin1\.jsonl:2: not UTF-8: byte 0xe9 at byte offset {offset}"):
        read_samples(path)  # what `sari-ray eval` and `score` read with


def test_non_utf8_mmau_document_names_line_and_offset(tmp_path):
    path = tmp_path / "mmau.json"
    path.write_bytes(b'[\n {"id": "a",\n  "question": "caf\xe9"}\n]\n')
    with pytest.raises(DataFormatError) as caught:
        validate_file(path, format="mmau")
    assert str(caught.value) == f"{path}:3: not UTF-8: byte 0xe9 at byte offset 33 (column 19); save the file as UTF-8"


def test_utf8_bom_and_crlf_are_fine(tmp_path, clip):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (_line(0) + "\r\n" + _line(1) + "\r\n").encode())
    assert [s.id for s in validate_file(path).kept] == ["r0", "r1"]


@pytest.mark.parametrize("name,content,format", [
    ("empty.jsonl", b"", "jsonl"), ("blank.jsonl", b"\n  \n\n", "jsonl"), ("empty.json", b"[]", "mmau"),
    ("empty-r1aqa.jsonl", b"", "r1aqa")])
def test_an_empty_file_is_refused(tmp_path, name, content, format):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match="the file holds no rows"):
        validate_file(path, format=format)
    with pytest.raises(DataFormatError, match="the file holds no rows"):
        read_samples(path, format=format)


def test_huge_choice_list_is_linear_and_refused(tmp_path, clip):
    path = tmp_path / "huge.jsonl"
    choices = [f"choice {i}" for i in range(100_000)]
    path.write_text(_line(0, choices=choices, answer="choice 7") + "\n"
                    + _line(1, choices=["same"] * 100_000, answer="same") + "\n")
    start = time.perf_counter()
    with pytest.raises(DataValidationError) as caught:
        validate_file(path, check_audio=False)
    assert time.perf_counter() - start < 5  # was quadratic: >10 minutes
    problems = caught.value.report.problems
    assert [(p.line, p.kind) for p in problems] == [
        (1, "too_many_choices"), (2, "too_many_choices"), (2, "duplicate_choices")]
    assert "100000 choices; at most 26" in problems[0].message
    assert max(len(p.message) for p in problems) < 600  # a preview, not the 100,000 choices
    letters = [chr(ord("A") + i) for i in range(MAX_CHOICES)]
    assert sample_problems(_row(0, clip, choices=letters, answer="A")) == []  # 26 is fine


# ---- audio: too short, outside the data folder ------------------------------------------------------------

def test_clip_too_short_for_the_model_is_refused(tmp_path):
    """0.01 s (160 samples) used to pass here, then fail in vLLM after the engine had started."""
    rows = []
    for i, samples in enumerate((160, MIN_AUDIO_SAMPLES - 1, MIN_AUDIO_SAMPLES)):
        write_wav(tmp_path / f"c{i}.wav", np.full(samples, 0.2, np.float32))
        rows.append(_line(i, audio=f"c{i}.wav"))
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataValidationError) as caught:
        validate_file(path)
    problems = caught.value.report.problems
    assert [(p.line, p.kind) for p in problems] == [(1, "audio_too_short"), (2, "audio_too_short")]
    assert "10.0 ms (160 samples at 16 kHz); the models need at least 321 samples (20.1 ms)" in problems[0].message


def test_minimum_clip_length_matches_the_feature_extractor():
    """MIN_AUDIO_SAMPLES is where Whisper's feature extractor + the Qwen2-Audio / Omni encoder give 1 token."""
    pytest.importorskip("transformers")
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000)

    def audio_tokens(num_samples: int) -> int:
        out = extractor(np.full(num_samples, 0.1, np.float32), sampling_rate=16000, return_attention_mask=True,
                        padding="max_length", return_tensors="np")
        frames = int(out["attention_mask"].sum())
        return ((frames - 1) // 2 + 1 - 2) // 2 + 1  # vLLM's qwen2_audio._get_feat_extract_output_lengths

    assert audio_tokens(MIN_AUDIO_SAMPLES - 1) == 0 and audio_tokens(MIN_AUDIO_SAMPLES) == 1


@pytest.fixture
def data_folder(tmp_path):
    """tmp/data/d.jsonl with audio inside data/, and a readable wav outside it (it must not be opened)."""
    folder = tmp_path / "data"
    write_wav(folder / "in.wav", np.full(8000, 0.1, np.float32))
    write_wav(tmp_path / "outside.wav", np.full(8000, 0.1, np.float32))
    rows = [_line(0, audio="in.wav"), _line(1, audio="../outside.wav"), _line(2, audio=str(tmp_path / "outside.wav")),
            _line(3, audio="../../../../../../etc/passwd"), _line(4, audio="sub/../in.wav")]
    (folder / "d.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_audio_outside_the_data_folder_is_refused_and_not_opened(data_folder, monkeypatch):
    import sari_ray.data.validate as validate

    opened = []
    real = validate.check_audio_file
    monkeypatch.setattr(validate, "check_audio_file", lambda path: opened.append(path) or real(path))
    with pytest.raises(DataValidationError) as caught:
        validate_file(data_folder / "d.jsonl")
    problems = caught.value.report.problems
    assert [(p.line, p.kind) for p in problems] == [(2, "audio_outside_data_dir"), (3, "audio_outside_data_dir"),
                                                    (4, "audio_outside_data_dir")]
    assert "/etc/passwd is outside the data folder" in problems[2].message
    assert "data.allow_external_audio=true" in problems[0].message
    assert opened == [str(data_folder / "in.wav")]  # sub/../in.wav is the same file: decoded once


def test_external_audio_is_opened_when_allowed(data_folder, tmp_path, monkeypatch):
    import sari_ray.data.validate as validate

    opened = []
    monkeypatch.setattr(validate, "check_audio_file", lambda path: opened.append(path) or (None, False))
    assert validate_file(data_folder / "d.jsonl", allow_external_audio=True).ok
    assert opened == [str(data_folder / "in.wav"), str(tmp_path / "outside.wav"), "/etc/passwd"]


def test_audio_dir_sets_the_data_folder(data_folder, tmp_path):
    report = validate_file(data_folder / "d.jsonl", audio_dir=data_folder / "x", policy="skip", check_audio=False)
    assert [s.audio for s in report.kept] == [str(data_folder / "x" / "in.wav")] * 2  # relative to audio_dir
    assert [(p.line, p.kind) for p in report.problems] == [
        (2, "audio_outside_data_dir"), (3, "audio_outside_data_dir"), (4, "audio_outside_data_dir")]
    assert f"outside the data folder {data_folder / 'x'}" in report.problems[0].message


# ---- the CLI --------------------------------------------------------------------------------------------

def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_validate_cli_exit_codes(tmp_path, mixed_rows, synth_data, capsys):
    rows = [row for i, row in enumerate(mixed_rows) if i != 8]  # a text tier would be a malformed row
    bad = write_jsonl(rows, tmp_path / "bad.jsonl")
    assert _cli(["data", "validate", "--data", str(bad), "--num-tiers", "3", "--allow-external-audio"]) == 1
    out = capsys.readouterr().out
    assert "9 problem(s)" in out and "bad.jsonl:10: id='r0': duplicate_id" in out and "bad.jsonl:2: id='r1'" in out
    assert _cli(["data", "validate", "--data", str(bad), "--policy", "skip", "--allow-external-audio"]) == 0
    assert "11 samples, 3 kept, 8 dropped" in capsys.readouterr().out  # without --num-tiers, tier 3 is fine
    assert _cli(["data", "validate", "--data", str(synth_data), "--num-tiers", "3"]) == 0
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"id": 1}\n')
    assert _cli(["data", "validate", "--data", str(malformed)]) == 1
    assert "malformed.jsonl:1: malformed_row:" in capsys.readouterr().out
    assert _cli(["data", "validate", "--data", str(malformed), "--policy", "skip"]) == 1  # nothing left
    assert "1 samples, 0 kept" in (out := capsys.readouterr().out) and "no valid samples left" in out
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert _cli(["data", "validate", "--data", str(empty)]) == 1
    assert "the file holds no rows" in capsys.readouterr().out


def test_validate_cli_skip_goes_on_past_malformed_lines(two_malformed_eight_broken, capsys):
    assert _cli(["data", "validate", "--data", str(two_malformed_eight_broken), "--policy", "skip"]) == 0
    assert "11 samples, 2 kept, 9 dropped" in capsys.readouterr().out  # no --num-tiers: tier 5 is fine


def test_validate_cli_refuses_external_audio_unless_allowed(data_folder, capsys):
    argv = ["data", "validate", "--data", str(data_folder / "d.jsonl"), "--no-check-audio"]
    assert _cli(argv) == 1 and "audio_outside_data_dir: 3" in capsys.readouterr().out
    assert _cli(argv + ["--allow-external-audio"]) == 0
