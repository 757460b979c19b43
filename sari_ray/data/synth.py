"""Synthetic audio multiple-choice questions whose answer is in the audio alone, graded into tiers.

Used to test and demo the pipeline without real datasets: a tiny model can only beat chance here by
listening. Choice order is shuffled and answers balanced per tier and family, so text alone scores chance;
`make_silent_copy` builds the same questions over silence to check exactly that. Answers are short choice
*words* ("high", "two", "second"): tiny models learn audio -> word far faster than audio -> letter.

    tier 0  pitch                 one clean tone, high (1200-2000 Hz) or low (150-300 Hz)
    tier 1  count                 one to three clean beeps
            compare_pitch         two clean tones, the higher 1.5-2x the lower
    tier 2  count_noisy           one to three shorter, closer beeps in noise (SNR 6 dB)
            compare_pitch_close   two tones 1.08-1.2x apart in noise (SNR 10 dB)

That is the `mixed` set (`SYNTH_SETS`), a different skill per tier. The `pitch_ladder` set asks one question at
every tier, "is the tone high or low in pitch?", with the high and low bands closing in on 600 Hz, so what a
model learns at tier k (where the boundary lies) is most of what tier k+1 needs:

    tier 0  pitch                 low 150-300 Hz or high 1200-2000 Hz (the same family as `mixed` tier 0)
    tier 1  pitch_near            low 300-450 Hz or high 800-1200 Hz
    tier 2  pitch_close           low 450-560 Hz or high 640-800 Hz (as little as 1.14x apart)

Deterministic: the same (n, seed, tiers, families) gives byte-identical jsonl and wav files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sari_ray.data.schema import STRUCTURED_PARTS, AudioMCQ

SAMPLE_RATE = 16000
FADE_S = 0.01  # raised-cosine ramps: no clicks, whose broadband energy would blur pitch
NUMBER_WORDS = ("zero", "one", "two", "three")
TIER_NAMES = ("easy", "medium", "hard")


@dataclass(frozen=True)
class Rendered:
    audio: np.ndarray  # (samples,) float32 at SAMPLE_RATE
    truth: dict  # generator parameters, stored in AudioMCQ.extra
    parts: dict[str, str]  # STRUCTURED_PARTS -> text, true to `audio`


@dataclass(frozen=True)
class Family:
    name: str
    question: str
    choices: tuple[str, ...]
    render: Callable[[np.random.Generator, str], Rendered]  # (item rng, answer) -> clip


# ---- signal helpers ------------------------------------------------------------------------------------

def _tone(freq_hz: float, seconds: float, amplitude: float) -> np.ndarray:
    t = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
    wave = amplitude * np.sin(2 * np.pi * freq_hz * t)
    ramp = int(FADE_S * SAMPLE_RATE)
    window = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    wave[:ramp] *= window
    wave[-ramp:] *= window[::-1]
    return wave


def _mix(clip_s: float, segments: list[tuple[float, np.ndarray]]) -> np.ndarray:
    out = np.zeros(int(round(clip_s * SAMPLE_RATE)))
    for start_s, wave in segments:
        start = int(round(start_s * SAMPLE_RATE))
        out[start:start + len(wave)] += wave
    return out


def _with_noise(audio: np.ndarray, rng: np.random.Generator, amplitude: float, snr_db: float | None) -> np.ndarray:
    """White noise at `snr_db` below the tones' power (a sine of amplitude A has power A^2 / 2)."""
    if snr_db is not None:
        noise_std = (amplitude / np.sqrt(2)) / 10 ** (snr_db / 20)
        audio = audio + rng.normal(0.0, noise_std, size=audio.shape)
    return audio.astype(np.float32)


def _noise_words(snr_db: float | None) -> str:
    return "with no background noise" if snr_db is None else "over a steady background hiss"


# ---- families ------------------------------------------------------------------------------------------

def _render_pitch(rng: np.random.Generator, answer: str, low_hz: tuple[int, int] = (150, 300),
                  high_hz: tuple[int, int] = (1200, 2000)) -> Rendered:
    """One clean tone drawn from the low or the high band (inclusive bounds, whole hertz)."""
    band = high_hz if answer == "high" else low_hz
    freq = int(rng.integers(band[0], band[1] + 1))
    amplitude, onset, tone_s, clip_s = round(float(rng.uniform(0.3, 0.6)), 3), 0.1, 1.0, 1.2
    audio = _with_noise(_mix(clip_s, [(onset, _tone(freq, tone_s, amplitude))]), rng, amplitude, None)
    if (low_hz, high_hz) == ((150, 300), (1200, 2000)):
        where = ("well above the few-hundred-hertz range of a low tone" if answer == "high"
                 else "far below the kilohertz range of a high tone")
    else:
        where = (f"above the {low_hz[1]} Hz where low tones end here" if answer == "high"
                 else f"below the {high_hz[0]} Hz where high tones begin here")
    parts = {
        "planning": "The question asks whether the single tone is high or low in pitch. I will listen to the "
                    "tone and judge its frequency.",
        "caption": f"A single steady tone around {freq} Hz lasting about {tone_s:g} second, {_noise_words(None)}.",
        "reasoning": f"A tone around {freq} Hz is {where}, so it sounds {answer}.",
        "summary": f"The tone is {answer} in pitch.",
    }
    truth = {"freqs_hz": [freq], "onsets_s": [onset], "tone_s": tone_s, "amplitude": amplitude,
             "snr_db": None, "clip_s": clip_s}
    return Rendered(audio, truth, parts)


def _render_count(rng: np.random.Generator, answer: str, noisy: bool) -> Rendered:
    count = NUMBER_WORDS.index(answer)
    freq = int(rng.integers(700, 1301))
    amplitude = round(float(rng.uniform(0.3, 0.6)), 3)
    beep_s, snr_db = (0.08, 6.0) if noisy else (0.15, None)
    onsets, start = [], round(float(rng.uniform(0.05, 0.25)), 3)
    for _ in range(count):
        onsets.append(start)
        start = round(start + beep_s + float(rng.uniform(0.08, 0.12) if noisy else 0.2), 3)
    clip_s = 1.5  # fixed, so clip length gives no hint of the count
    audio = _with_noise(_mix(clip_s, [(t, _tone(freq, beep_s, amplitude)) for t in onsets]), rng, amplitude, snr_db)
    noise = _noise_words(snr_db)
    if count == 1:
        caption = f"A single short beep at about {freq} Hz, about {beep_s:g} seconds long, {noise}."
        reasoning = "There is one burst of sound and nothing after it, so there is one beep."
    else:
        gaps = "very short pauses" if noisy else "short pauses"
        caption = (f"{answer.capitalize()} short beeps at about {freq} Hz, each about {beep_s:g} seconds long, "
                   f"separated by {gaps}, {noise}.")
        order = ", ".join(("first", "second", "third")[:count])
        reasoning = f"Counting the separate bursts of sound in order ({order}), there are {answer} beeps."
    parts = {
        "planning": "The question asks how many beeps the clip contains. I will count the separate beeps from "
                    "start to end" + (", listening past the background noise." if noisy else "."),
        "caption": caption,
        "reasoning": reasoning,
        "summary": f"The clip contains {answer} beep{'s' if count > 1 else ''}.",
    }
    truth = {"n_beeps": count, "freqs_hz": [freq] * count, "onsets_s": onsets, "tone_s": beep_s,
             "amplitude": amplitude, "snr_db": snr_db, "clip_s": clip_s}
    return Rendered(audio, truth, parts)


def _render_compare_pitch(rng: np.random.Generator, answer: str, close: bool) -> Rendered:
    low = int(rng.integers(300, 901))
    ratio = float(rng.uniform(1.08, 1.2) if close else rng.uniform(1.5, 2.0))
    high = int(round(low * ratio))
    freqs = [high, low] if answer == "first" else [low, high]
    amplitude, tone_s, gap_s, clip_s = round(float(rng.uniform(0.3, 0.6)), 3), 0.4, 0.2, 1.2
    snr_db = 10.0 if close else None
    onsets = [0.1, round(0.1 + tone_s + gap_s, 3)]
    segments = [(t, _tone(f, tone_s, amplitude)) for t, f in zip(onsets, freqs)]
    audio = _with_noise(_mix(clip_s, segments), rng, amplitude, snr_db)
    other = "second" if answer == "first" else "first"
    closeness = "only slightly" if close else "clearly"
    parts = {
        "planning": "The question asks which of two tones is higher in pitch. I will compare the frequency of the "
                    "first tone with that of the second.",
        "caption": f"Two steady tones one after the other: the first around {freqs[0]} Hz, the second around "
                   f"{freqs[1]} Hz, each about {tone_s:g} seconds long, {_noise_words(snr_db)}.",
        "reasoning": f"The {answer} tone, around {high} Hz, is {closeness} higher than the {other} tone, around "
                     f"{low} Hz (about {high / low:.2f} times the frequency).",
        "summary": f"The {answer} tone is higher in pitch.",
    }
    truth = {"freqs_hz": freqs, "onsets_s": onsets, "tone_s": tone_s, "amplitude": amplitude,
             "snr_db": snr_db, "clip_s": clip_s}
    return Rendered(audio, truth, parts)


PITCH = Family("pitch", "Is the tone high or low in pitch?", ("high", "low"), _render_pitch)
COUNT = Family("count", "How many beeps do you hear?", ("one", "two", "three"),
               lambda rng, answer: _render_count(rng, answer, noisy=False))
COMPARE_PITCH = Family("compare_pitch", "Which tone is higher in pitch, the first or the second?",
                       ("first", "second"), lambda rng, answer: _render_compare_pitch(rng, answer, close=False))
COUNT_NOISY = Family("count_noisy", COUNT.question, COUNT.choices,
                     lambda rng, answer: _render_count(rng, answer, noisy=True))
COMPARE_PITCH_CLOSE = Family("compare_pitch_close", COMPARE_PITCH.question, COMPARE_PITCH.choices,
                             lambda rng, answer: _render_compare_pitch(rng, answer, close=True))
TIER_FAMILIES: tuple[tuple[Family, ...], ...] = ((PITCH,), (COUNT, COMPARE_PITCH), (COUNT_NOISY, COMPARE_PITCH_CLOSE))

PITCH_NEAR = Family("pitch_near", PITCH.question, PITCH.choices,
                    lambda rng, answer: _render_pitch(rng, answer, (300, 450), (800, 1200)))
PITCH_CLOSE = Family("pitch_close", PITCH.question, PITCH.choices,
                     lambda rng, answer: _render_pitch(rng, answer, (450, 560), (640, 800)))
PITCH_LADDER: tuple[tuple[Family, ...], ...] = ((PITCH,), (PITCH_NEAR,), (PITCH_CLOSE,))

# data.synth_set -> families per tier (tier 0 first)
SYNTH_SETS: dict[str, tuple[tuple[Family, ...], ...]] = {"mixed": TIER_FAMILIES, "pitch_ladder": PITCH_LADDER}


def tier_families(families: str) -> tuple[tuple[Family, ...], ...]:
    """The families per tier of the named set (`SYNTH_SETS`); an unknown name lists the valid ones."""
    try:
        return SYNTH_SETS[families]
    except KeyError:
        raise ValueError(f"unknown synthetic set {families!r}: choose one of {', '.join(SYNTH_SETS)}") from None


# ---- dataset -------------------------------------------------------------------------------------------

def _balanced(size: int, options: int, rng: np.random.Generator) -> list[int]:
    """`size` draws from range(options), each option used floor or ceil of size / options times."""
    values = [i % options for i in range(size)]
    rng.shuffle(values)
    return values


def plan_items(n: int, seed: int, tiers: int = 3, families: str = "mixed"
               ) -> list[tuple[str, int, Family, str, list[str]]]:
    """(id, tier, family, answer, choices in shown order) per item, before any audio is made.

    Item i gets tier i % tiers; families alternate within a tier. For each (tier, family) the answer word
    and the answer's position are each balanced and drawn independently.
    """
    by_tier = tier_families(families)
    if not 1 <= tiers <= len(by_tier):
        raise ValueError(f"tiers must be in 1..{len(by_tier)}, got {tiers}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    groups: dict[tuple[int, int], list[int]] = {}
    for index in range(n):
        tier = index % tiers
        family_index = (index // tiers) % len(by_tier[tier])
        groups.setdefault((tier, family_index), []).append(index)
    plan: dict[int, tuple] = {}
    for (tier, family_index), members in sorted(groups.items()):
        family = by_tier[tier][family_index]
        rng = np.random.default_rng([seed, 1_000_003, tier, family_index])
        answers = _balanced(len(members), len(family.choices), rng)
        positions = _balanced(len(members), len(family.choices), rng)
        for index, answer_index, position in zip(members, answers, positions):
            answer = family.choices[answer_index]
            others = [c for c in family.choices if c != answer]
            rng.shuffle(others)
            shown = others[:position] + [answer] + others[position:]
            plan[index] = (f"synth{seed}-{index:05d}", tier, family, answer, shown)
    return [plan[index] for index in range(n)]


def synthesize(out_dir: str | Path, n: int, seed: int = 0, tiers: int = 3, silence: bool = False,
               families: str = "mixed") -> Path:
    """Write `out_dir/audio/<id>.wav` and `out_dir/data.jsonl` (audio paths relative); return the jsonl path.

    `silence=True` writes silent clips of the same length and drops the reasoning texts (they would no
    longer be true to the audio); `extra["silent"]` marks such rows. `families`: a `SYNTH_SETS` name.
    """
    from sari_ray.data.audio import write_wav
    from sari_ray.data.readers import write_jsonl

    plan = plan_items(n, seed, tiers, families)  # checks n and tiers before anything is written
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (sample_id, tier, family, answer, shown) in enumerate(plan):
        rendered = family.render(np.random.default_rng([seed, index]), answer)
        audio_rel = f"audio/{sample_id}.wav"
        audio = np.zeros_like(rendered.audio) if silence else rendered.audio
        write_wav(out_dir / audio_rel, audio, SAMPLE_RATE)
        structured = None if silence else {part: rendered.parts[part] for part in STRUCTURED_PARTS}
        free = None if silence else (
            f"{rendered.parts['caption']} {rendered.parts['reasoning']} So the answer is {answer}.")
        extra = {"family": family.name, **rendered.truth, "answer_position": shown.index(answer)}
        if silence:
            extra["silent"] = True
        rows.append(AudioMCQ(
            id=sample_id, audio=audio_rel, question=family.question, choices=shown, answer=answer,
            task="sound", category=family.name, difficulty=TIER_NAMES[tier], tier=tier,
            reasoning_structured=structured, reasoning_free=free, source="synth-silent" if silence else "synth",
            extra=extra))
    return write_jsonl(rows, out_dir / "data.jsonl")


def make_silent_copy(jsonl: str | Path, out_dir: str | Path) -> Path:
    """The same questions over silence of each clip's length: a model that uses the audio drops to chance.

    Ids are kept, so results pair with the original set. Returns the new jsonl path.
    """
    import soundfile

    from sari_ray.data.audio import load_audio, write_wav
    from sari_ray.data.readers import read_samples, write_jsonl

    out_dir = Path(out_dir)
    rows = []
    for index, sample in enumerate(read_samples(jsonl, format="jsonl")):
        try:
            info = soundfile.info(sample.audio)
            seconds = info.frames / info.samplerate
        except Exception:  # a format libsndfile lacks: decode fully; a missing clip raises AudioDecodeError
            seconds = load_audio(sample.audio, max_seconds=None).duration_s
        audio_rel = f"audio/{index:05d}-{_safe_name(sample.id)}.wav"  # index: ids may sanitise alike
        write_wav(out_dir / audio_rel, np.zeros(int(round(seconds * SAMPLE_RATE)), np.float32), SAMPLE_RATE)
        extra = {**sample.extra, "silent": True, "original_audio": sample.audio}
        rows.append(AudioMCQ(**{**sample.to_dict(), "audio": audio_rel, "reasoning_structured": None,
                                "reasoning_free": None, "source": f"{sample.source or 'data'}-silent",
                                "extra": extra}))
    return write_jsonl(rows, out_dir / "data.jsonl")


def _safe_name(sample_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in sample_id)
