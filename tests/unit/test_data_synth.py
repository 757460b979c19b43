"""Synthetic set: deterministic, balanced, shuffled, and the audio (decoded back) really holds the answer."""
from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from sari_ray.data.audio import load_audio
from sari_ray.data.cli import register_cli
from sari_ray.data.readers import read_samples
from sari_ray.data.schema import STRUCTURED_PARTS
from sari_ray.data.synth import TIER_FAMILIES, make_silent_copy, synthesize

pytestmark = pytest.mark.unit

RATE = 16000


@pytest.fixture(scope="module")
def synth_samples(synth_data):
    return read_samples(synth_data)


def _dominant_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / RATE)[spectrum.argmax()])


def _count_bursts(samples: np.ndarray, freq_hz: float) -> int:
    """Bursts of energy near `freq_hz`: band-pass (FFT mask), 10 ms frame energy, rising threshold crossings."""
    spectrum = np.fft.rfft(samples)
    freqs = np.fft.rfftfreq(len(samples), 1 / RATE)
    spectrum[np.abs(freqs - freq_hz) > 60] = 0
    band = np.fft.irfft(spectrum, n=len(samples))
    frames = band[: len(band) // 160 * 160].reshape(-1, 160)
    energy = np.sqrt((frames**2).mean(axis=1))
    above = energy > (np.median(energy) + energy.max()) / 2
    return int(np.sum(above[1:] & ~above[:-1]) + above[0])


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    first = synthesize(tmp_path / "a", n=9, seed=3)
    second = synthesize(tmp_path / "b", n=9, seed=3)
    other = synthesize(tmp_path / "c", n=9, seed=4)
    assert first.read_bytes() == second.read_bytes()
    wavs = sorted(p.name for p in (tmp_path / "a" / "audio").iterdir())
    assert len(wavs) == 9
    assert all((tmp_path / "a/audio" / w).read_bytes() == (tmp_path / "b/audio" / w).read_bytes() for w in wavs)
    assert other.read_bytes() != first.read_bytes()
    ids = [s.id for s in read_samples(first)]
    assert ids == [f"synth3-{i:05d}" for i in range(9)] and len(set(ids)) == 9


def test_rows_are_well_formed_and_tiered(synth_samples):
    assert len(synth_samples) == 48
    assert Counter(s.tier for s in synth_samples) == {0: 16, 1: 16, 2: 16}
    for s in synth_samples:
        family_names = [f.name for f in TIER_FAMILIES[s.tier]]
        assert s.extra["family"] in family_names and s.answer in s.choices
        assert s.choices[s.extra["answer_position"]] == s.answer
        assert list(s.reasoning_structured) == list(STRUCTURED_PARTS)
        assert all(text.strip() for text in s.reasoning_structured.values())
        assert s.reasoning_free.endswith(f"the answer is {s.answer}.")
    tier0_words = {c for s in synth_samples if s.tier == 0 for c in s.choices}
    assert tier0_words == {"high", "low"}


def test_answers_and_positions_balanced_and_order_shuffled(synth_samples):
    groups = defaultdict(list)
    for s in synth_samples:
        groups[(s.tier, s.extra["family"])].append(s)
    assert len(groups) == 5
    for key, members in groups.items():
        n_choices = len(members[0].choices)
        answers = Counter(s.answer for s in members)
        positions = Counter(s.choices.index(s.answer) for s in members)
        assert len(answers) == n_choices and max(answers.values()) - min(answers.values()) <= 1, (key, answers)
        assert len(positions) == n_choices and max(positions.values()) - min(positions.values()) <= 1, key
        assert len({tuple(s.choices) for s in members}) > 1, f"{key}: choice order never changes"
    # A text-only guesser gains nothing: the answer word is independent of how the choices are ordered.
    by_order = defaultdict(Counter)
    for s in synth_samples:
        if s.tier == 0:
            by_order[tuple(s.choices)][s.answer] += 1
    guessed = sum(counts.most_common(1)[0][1] for counts in by_order.values())
    assert guessed <= 12  # of 16; the perfect text-only guesser would score 16


def test_tier0_audio_pitch_matches_the_answer(synth_samples):
    tier0 = [s for s in synth_samples if s.tier == 0]
    for s in tier0:
        clip = load_audio(s.audio)
        assert clip.duration_s == pytest.approx(s.extra["clip_s"])
        heard = _dominant_hz(clip.samples)
        assert abs(heard - s.extra["freqs_hz"][0]) < 3, s.id
        assert (heard > 1000) == (s.answer == "high"), s.id
        assert f"around {s.extra['freqs_hz'][0]} Hz" in s.reasoning_structured["caption"]


def test_compare_pitch_audio_matches_the_answer(synth_samples):
    compared = [s for s in synth_samples if s.extra["family"].startswith("compare_pitch")]
    assert {s.tier for s in compared} == {1, 2}
    for s in compared:
        samples = load_audio(s.audio).samples
        tone = int(s.extra["tone_s"] * RATE)
        heard = [_dominant_hz(samples[int(t * RATE): int(t * RATE) + tone]) for t in s.extra["onsets_s"]]
        assert np.allclose(heard, s.extra["freqs_hz"], atol=4), (s.id, heard)
        assert ("first" if heard[0] > heard[1] else "second") == s.answer, s.id
        caption = s.reasoning_structured["caption"]
        assert [int(f) for f in re.findall(r"around (\d+) Hz", caption)] == s.extra["freqs_hz"]


def test_beep_count_audio_matches_the_answer_even_in_noise(synth_samples):
    counted = [s for s in synth_samples if s.extra["family"].startswith("count")]
    assert {s.tier for s in counted} == {1, 2} and any(s.extra["snr_db"] for s in counted)
    words = {"one": 1, "two": 2, "three": 3}
    for s in counted:
        samples = load_audio(s.audio).samples
        assert _count_bursts(samples, s.extra["freqs_hz"][0]) == s.extra["n_beeps"] == words[s.answer], s.id
        if s.extra["snr_db"]:  # noise is really there, between the beeps too
            assert np.std(samples[-1600:]) > 0.01


def test_silent_copy_keeps_questions_and_drops_sound(synth_data, synth_samples, tmp_path):
    silent = read_samples(make_silent_copy(synth_data, tmp_path / "silent"))
    assert [(s.id, s.question, s.choices, s.answer, s.tier) for s in silent] == [
        (s.id, s.question, s.choices, s.answer, s.tier) for s in synth_samples]
    for quiet, loud in zip(silent[:6], synth_samples[:6]):
        clip = load_audio(quiet.audio)
        assert not clip.samples.any() and clip.duration_s == pytest.approx(load_audio(loud.audio).duration_s)
        assert quiet.extra["silent"] and quiet.reasoning_structured is None and quiet.reasoning_free is None
    generated = read_samples(synthesize(tmp_path / "gen", n=3, seed=0, silence=True))
    assert not load_audio(generated[0].audio).samples.any() and generated[0].extra["silent"]
    loud = read_samples(synthesize(tmp_path / "loud", n=3, seed=0))
    assert [(s.id, s.choices, s.answer) for s in generated] == [(s.id, s.choices, s.answer) for s in loud]


def test_tiers_parameter(tmp_path):
    assert {s.tier for s in read_samples(synthesize(tmp_path / "one", n=4, seed=0, tiers=1))} == {0}
    with pytest.raises(ValueError, match="tiers must be in 1..3"):
        synthesize(tmp_path / "bad", n=4, seed=0, tiers=4)


def test_synth_cli_prints_path_and_tier_counts(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "synth", "--out", str(tmp_path / "cli"), "--n", "7", "--seed", "2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [str(tmp_path / "cli" / "data.jsonl"), "tier 0: 3, tier 1: 2, tier 2: 2"]


def test_pitch_ladder_asks_one_question_with_the_bands_closing_in(tmp_path):
    """The `pitch_ladder` set: every tier the same question and choices; the heard pitch lies in the tier's band
    and on the answer's side of 600 Hz; the gap between the bands shrinks tier by tier."""
    samples = read_samples(synthesize(tmp_path / "ladder", n=30, seed=1, families="pitch_ladder"))
    assert Counter(s.tier for s in samples) == {0: 10, 1: 10, 2: 10}
    assert {s.question for s in samples} == {"Is the tone high or low in pitch?"}
    assert {s.extra["family"] for s in samples} == {"pitch", "pitch_near", "pitch_close"}
    bands = {0: ((150, 300), (1200, 2000)), 1: ((300, 450), (800, 1200)), 2: ((450, 560), (640, 800))}
    for s in samples:
        assert sorted(s.choices) == ["high", "low"]
        heard = _dominant_hz(load_audio(s.audio).samples)
        assert abs(heard - s.extra["freqs_hz"][0]) < 3, s.id
        low, high = bands[s.tier]
        lo, hi = high if s.answer == "high" else low
        assert lo <= s.extra["freqs_hz"][0] <= hi and (heard > 600) == (s.answer == "high"), s.id
    for tier in (0, 1, 2):  # both answers at every tier, balanced
        assert Counter(s.answer for s in samples if s.tier == tier) == {"high": 5, "low": 5}
    gaps = [bands[t][1][0] / bands[t][0][1] for t in (0, 1, 2)]
    assert gaps[0] > gaps[1] > gaps[2] > 1


def test_pitch_ladder_tier0_is_the_mixed_sets_tier0(tmp_path):
    """The ladder's easiest tier is the one-tier demo's question, drawn the same way (a 1-tier set is identical)."""
    mixed = synthesize(tmp_path / "mixed", n=6, seed=0, tiers=1)
    ladder = synthesize(tmp_path / "ladder", n=6, seed=0, tiers=1, families="pitch_ladder")
    assert mixed.read_bytes() == ladder.read_bytes()
    with pytest.raises(ValueError, match="unknown synthetic set 'beeps': choose one of mixed, pitch_ladder"):
        synthesize(tmp_path / "bad", n=3, families="beeps")
