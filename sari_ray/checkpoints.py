"""Checkpoint directories that are complete or absent: written into a staging directory, flushed to disk,
then renamed into place (a rename within one file system is atomic). No Ray here: the driver decides, the
learners write into the staging directory it names.

Layout: `<output_dir>/checkpoints/step_NNNNNN/` with `learner/` (DeepSpeed state), `model/` (HF safetensors)
and `trainer_state.json`, written last; `step_000000` is the end of SFT and is never rotated away.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
IN_FLIGHT_FILE = "rollouts_in_flight.json"  # steps sent ahead (rollout.max_staleness > 0) with their completions
SFT_CHECKPOINT = "step_000000"
_STAGING_PREFIX = ".staging-"


class CheckpointSpaceError(OSError):
    """Not enough free disk space for the next checkpoint (checked before writing any of it)."""


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step:06d}"


def sft_dir(output_dir: Path, sft_step: int) -> Path:
    """A checkpoint in the middle of SFT (`sft_NNNNNN`); the end of SFT is `step_000000`."""
    return Path(output_dir) / CHECKPOINTS / f"sft_{sft_step:06d}"


def checkpoint_dir(output_dir: Path, state: dict) -> Path:
    """Where the trainer's current state is checkpointed."""
    return sft_dir(output_dir, state["sft_step"]) if state["phase"] == "sft" else step_dir(output_dir, state["step"])


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in training order (mid-SFT ones first), oldest first; staging is never one."""
    root = Path(output_dir) / CHECKPOINTS
    return [p for pattern in ("sft_*", "step_*") for p in sorted(root.glob(pattern)) if (p / STATE_FILE).is_file()]


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def drop_stale_staging(output_dir: Path) -> list[Path]:
    """Staging directories a crashed or killed run left behind (they were never complete), removed; returns them.
    A complete checkpoint set aside for its rewrite (`staged` renames it to `.staging-old-NAME` before the new one
    takes its place) whose rewrite never landed is put back as NAME first: it is the last complete copy."""
    root = Path(output_dir) / CHECKPOINTS
    for old in sorted(root.glob(_STAGING_PREFIX + "old-*")):
        final = root / old.name.removeprefix(_STAGING_PREFIX + "old-")
        if not final.exists() and (old / STATE_FILE).is_file():
            os.replace(old, final)
    stale = sorted(root.glob(_STAGING_PREFIX + "*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def expected_bytes(output_dir: Path, model_path: str | Path) -> int:
    """Size of the next checkpoint: the last one's, else a bound from the model (weights + fp32 AdamW state,
    ~16 bytes per parameter against 2-4 in the HF files: 5x the model's files)."""
    last = latest_checkpoint(output_dir)
    if last is not None:
        return directory_bytes(last)
    return 5 * sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))


def check_free_space(directory: Path, needed: int, margin: float = 1.1) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed * margin:
        raise CheckpointSpaceError(
            f"not enough disk space for a checkpoint in {directory}: {free / 2**30:.2f} GiB free, about "
            f"{needed * margin / 2**30:.2f} GiB needed. Free some space (older checkpoints, checkpoint.keep_last) "
            f"and resume with run.resume=true")


def read_in_flight(checkpoint: Path) -> list[dict]:
    """The rollouts a checkpoint saved for steps after it (none for a synchronous run or an older checkpoint)."""
    path = Path(checkpoint) / IN_FLIGHT_FILE
    return json.loads(path.read_text()) if path.exists() else []


def write_json(path: Path, data: Any) -> None:
    """A JSON file that is the old one or the new one, never half of either."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextmanager
def staged(final: Path, needed_bytes: int = 0) -> Iterator[Path]:
    """Yield a staging directory for `final`; on a clean exit flush it and rename it to `final` (replacing an
    older `final`, e.g. a step replayed after a restart); on an error remove it, leaving no partial checkpoint."""
    final = Path(final)
    check_free_space(final.parent, needed_bytes)
    staging = final.parent / f"{_STAGING_PREFIX}{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if not (staging / STATE_FILE).is_file():
            raise RuntimeError(f"checkpoint {staging} has no {STATE_FILE}; it is not complete")
        for f in staging.rglob("*"):
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        old = None
        if final.exists():
            old = final.parent / f"{_STAGING_PREFIX}old-{final.name}"
            os.replace(final, old)
        os.replace(staging, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def rotate(output_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (never the end of SFT, never the newest; mid-SFT
    ones once SFT has ended); run only after the new checkpoint is complete. Returns what was deleted."""
    done = complete_checkpoints(output_dir)
    kept = done[-max(keep_last, 1):]
    sft_ended = any(p.name == SFT_CHECKPOINT for p in done)  # then every sft_* is older than step_000000
    doomed = [p for p in done if p.name != SFT_CHECKPOINT
              and (p not in kept or (sft_ended and p.name.startswith("sft_")))]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
