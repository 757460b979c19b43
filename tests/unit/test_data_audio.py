"""Audio decoding: four containers -> 16 kHz mono float32, 30 s truncation counted, bad files named."""
from __future__ import annotations

import shutil
import subprocess
import warnings

import numpy as np
import pytest
import soundfile

from sari_ray.data import audio
from sari_ray.data.audio import AudioDecodeError, AudioStats, load_audio, write_wav

pytestmark = pytest.mark.unit

SOURCE_RATE = 44100
TONE_HZ = 440.0


def _stereo_tone(seconds: float = 1.0) -> np.ndarray:
    """(frames, 2) at 44.1 kHz: the same 440 Hz tone, 0.4 left and 0.2 right, so mono is 0.3."""
    t = np.arange(int(seconds * SOURCE_RATE)) / SOURCE_RATE
    tone = np.sin(2 * np.pi * TONE_HZ * t)
    return np.stack([0.4 * tone, 0.2 * tone], axis=1).astype(np.float32)


def _dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def _write(path, fmt: str) -> None:
    data = _stereo_tone()
    if fmt == "mp3" and "MP3" not in soundfile.available_formats():  # libsndfile < 1.1 cannot write mp3
        # docker/install.sh installs FFmpeg (the CLI comes with it): a machine without either is mis-installed
        assert shutil.which("ffmpeg"), "cannot write mp3: libsndfile < 1.1 and no ffmpeg CLI (run docker/install.sh)"
        wav = path.with_suffix(".wav")
        soundfile.write(str(wav), data, SOURCE_RATE)
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), str(path)], check=True)
        return
    soundfile.write(str(path), data, SOURCE_RATE, format=fmt.upper())


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
def test_decodes_44k_stereo_to_16k_mono_float32(tmp_path, fmt):
    path = tmp_path / f"tone.{fmt}"
    _write(path, fmt)
    clip = load_audio(path)
    assert clip.samples.dtype == np.float32 and clip.samples.ndim == 1
    assert clip.sample_rate == 16000 and not clip.truncated
    assert abs(len(clip.samples) - 16000) <= 1200  # lossy codecs add up to a few ms of padding
    assert clip.duration_s == pytest.approx(len(clip.samples) / 16000)
    assert abs(_dominant_hz(clip.samples, 16000) - TONE_HZ) < 3
    middle = clip.samples[2000:14000]
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.1)  # channels averaged


def test_long_clip_truncated_to_30s_and_counted(tmp_path):
    long_path, short_path = tmp_path / "long.wav", tmp_path / "short.wav"
    write_wav(long_path, np.full(35 * 8000, 0.1, np.float32), sample_rate=8000)
    write_wav(short_path, np.full(8000, 0.1, np.float32), sample_rate=8000)
    stats = AudioStats()
    long_clip = load_audio(long_path, stats=stats)
    short_clip = load_audio(short_path, stats=stats)
    assert long_clip.truncated and len(long_clip.samples) == 30 * 16000 and long_clip.duration_s == 30.0
    assert long_clip.source_duration_s == pytest.approx(35.0)
    assert not short_clip.truncated and short_clip.duration_s == pytest.approx(1.0, abs=1e-3)
    assert (stats.loaded, stats.truncated, stats.failed) == (2, 1, 0)
    assert "1 truncated to 30 s" in stats.summary()
    assert not load_audio(long_path, max_seconds=None).truncated


def test_corrupt_missing_and_empty_files_raise_naming_the_file(tmp_path):
    corrupt, missing, empty = tmp_path / "corrupt.wav", tmp_path / "missing.flac", tmp_path / "empty.wav"
    corrupt.write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    write_wav(empty, np.zeros(0, np.float32))
    stats = AudioStats()
    for path, reason in ((corrupt, ""), (missing, "file not found"), (empty, "")):
        with pytest.raises(AudioDecodeError) as caught:
            load_audio(path, stats=stats)
        assert caught.value.path == str(path) and str(path) in str(caught.value) and reason in caught.value.reason
        assert isinstance(caught.value, ValueError)
    assert (stats.loaded, stats.failed) == (0, 3)
    with pytest.raises(AudioDecodeError, match="not a regular file"):
        load_audio(tmp_path)


def test_falls_back_to_soundfile_once_when_ffmpeg_is_missing(tmp_path, monkeypatch):
    import torchaudio

    def no_backend(*args, **kwargs):
        raise RuntimeError("Failed to create AudioDecoder for x: Could not load libtorchcodec. Likely causes: ...")

    monkeypatch.setattr(torchaudio, "load", no_backend)
    monkeypatch.setattr(audio, "_torchaudio_unusable", None)
    path = tmp_path / "tone.flac"
    _write(path, "flac")
    with pytest.warns(RuntimeWarning, match="decoding audio with soundfile"):
        first = load_audio(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second file must not warn again
        second = load_audio(path)
    np.testing.assert_array_equal(first.samples, second.samples)
    assert abs(_dominant_hz(first.samples, 16000) - TONE_HZ) < 3 and len(first.samples) == 16000
    with pytest.raises(AudioDecodeError, match="corrupt.wav"):
        (tmp_path / "corrupt.wav").write_bytes(b"junk" * 100)
        load_audio(tmp_path / "corrupt.wav")


def test_write_wav_is_reproducible_and_clips(tmp_path):
    samples = np.linspace(-2, 2, 1600, dtype=np.float32)
    a, b = write_wav(tmp_path / "a.wav", samples), write_wav(tmp_path / "sub" / "b.wav", samples)
    assert a.read_bytes() == b.read_bytes()
    data, rate = soundfile.read(str(a), dtype="float32")
    assert rate == 16000 and data.min() >= -1.0 and data.max() <= 1.0 and data.max() > 0.99
