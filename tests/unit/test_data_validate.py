"""Validation: every problem listed at once (row index, id, file), skip policy counts, the CLI's exit codes."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from sari_ray.data.audio import write_wav
from sari_ray.data.cli import register_cli
from sari_ray.data.readers import read_samples, write_jsonl
from sari_ray.data.schema import AudioMCQ
from sari_ray.data.validate import PROBLEM_KINDS, DataValidationError, sample_problems, validate_samples

pytestmark = pytest.mark.unit


@pytest.fixture
def clip(tmp_path):
    return str(write_wav(tmp_path / "tone.wav", 0.3 * np.sin(np.linspace(0, 600, 8000))))


def _row(i: int, audio: str, **overrides) -> AudioMCQ:
    fields = dict(id=f"r{i}", audio=audio, question="Is the tone high or low in pitch?", choices=["high", "low"],
                  answer="low", tier=0)
    fields.update(overrides)
    return AudioMCQ(**fields)


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
    assert [(p.index, p.kind) for p in report.problems] == [
        (1, "missing_audio"), (2, "undecodable_audio"), (3, "empty_question"), (4, "too_few_choices"),
        (5, "duplicate_choices"), (6, "answer_not_in_choices"), (7, "bad_tier"), (8, "bad_tier"), (9, "bad_tier"),
        (10, "duplicate_id")]
    assert report.counts == {kind: (3 if kind == "bad_tier" else 1) for kind in PROBLEM_KINDS}
    for problem in report.problems:
        assert problem.message.startswith(f"set/data.jsonl: row {problem.index} (id={problem.sample_id!r})")
        assert problem.message in text
    assert "already used by row 0" in report.problems[-1].message
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
    assert [p.index for p in report.problems if p.kind == "bad_tier"] == [7, 8]  # tier 3 is fine without a limit


def test_pure_checks_and_missing_tier_under_a_curriculum():
    sample = _row(0, "unused.wav", tier=None)
    assert sample_problems(sample) == []
    assert [kind for kind, _ in sample_problems(sample, num_tiers=3)] == ["bad_tier"]
    assert [kind for kind, _ in sample_problems(_row(0, "x", tier=True))] == ["bad_tier"]  # bool is not a tier
    with pytest.raises(ValueError, match="policy"):
        validate_samples([sample], policy="warn")


def test_truncation_is_reported(tmp_path):
    long_clip = str(write_wav(tmp_path / "long.wav", np.full(31 * 4000, 0.1, np.float32), sample_rate=4000))
    report = validate_samples([_row(0, long_clip), _row(1, long_clip)])
    assert report.ok and report.audio_checked == 1 and report.audio_truncated == 1  # decoded once per file
    assert "1 longer than the 30 s model window" in report.summary()


def test_synthetic_set_is_clean(synth_data):
    report = validate_samples(read_samples(synth_data), num_tiers=3, source=str(synth_data))
    assert report.ok and len(report.kept) == 48 and report.audio_checked == 48


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_validate_cli_exit_codes(tmp_path, mixed_rows, synth_data, capsys):
    rows = [row for i, row in enumerate(mixed_rows) if i != 8]  # a text tier would fail at reading already
    bad = write_jsonl(rows, tmp_path / "bad.jsonl")
    assert _cli(["data", "validate", "--data", str(bad), "--num-tiers", "3"]) == 1
    out = capsys.readouterr().out
    assert "9 problem(s)" in out and "row 9 (id='r0'): duplicate_id" in out and "bad.jsonl: row 1 " in out
    assert _cli(["data", "validate", "--data", str(bad), "--policy", "skip"]) == 0
    assert "11 samples, 3 kept, 8 dropped" in capsys.readouterr().out  # without --num-tiers, tier 3 is fine
    assert _cli(["data", "validate", "--data", str(synth_data), "--num-tiers", "3"]) == 0
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"id": 1}\n')
    assert _cli(["data", "validate", "--data", str(malformed)]) == 1
    assert "malformed.jsonl:1:" in capsys.readouterr().out
