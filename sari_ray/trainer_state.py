"""The driver's state and its checkpoints: what a run starts from, what a checkpoint holds, and how the actors
are put back to it. The files themselves (staging, atomic renames, rotation) are `checkpoints`'; this module
talks to the actors through the trainer (learners write their part, the curriculum hands over its state).

The state is one JSON-able dict, so a checkpoint's `trainer_state.json` is the whole driver: phase, SFT and GRPO
step, weight version, MLflow run id, curriculum, data cursor (RNG, SFT order), history and per-step curve.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from sari_ray import checkpoints
from sari_ray.config import ConfigError


def initial_state(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"phase": "sft", "sft_step": 0, "step": 0, "weight_version": 0, "mlflow_run_id": None,
            "curriculum": None, "rng": rng.bit_generator.state, "sft_order": None, "history": [], "curve": []}


def state_at(checkpoint: Path | None, seed: int) -> dict[str, Any]:
    """The trainer state a checkpoint holds (the initial state without one)."""
    if checkpoint is None:
        return initial_state(seed)
    return json.loads((checkpoint / checkpoints.STATE_FILE).read_text())


def rng_of(state: dict[str, Any]) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    return rng


def open_run_dir(out: Path, resume: bool, console) -> Path | None:
    """The checkpoint a run starts from (None: a fresh start). Removes staging directories an earlier run left
    incomplete; refuses to start fresh over a run's checkpoints unless resumed."""
    stale = checkpoints.drop_stale_staging(out)
    if stale:
        console.print(f"[yellow]removed {len(stale)} incomplete checkpoint(s) an earlier run left: "
                      f"{', '.join(p.name for p in stale)}")
    root = out / checkpoints.CHECKPOINTS
    if not resume:
        if root.exists() and any(root.iterdir()):
            raise ConfigError(f"{out} already holds checkpoints; set run.resume=true to continue it "
                              f"or choose another run.output_dir / run.name")
        return None
    checkpoint = checkpoints.latest_checkpoint(out)
    if checkpoint is None:
        console.print(f"[yellow]run.resume=true but no checkpoint in {root}; starting fresh")
    return checkpoint


def checkpoint_due(cfg, step: int, last_at: float) -> bool:
    """After GRPO step `step`: every `checkpoint.every` steps, at the last step, and once
    `checkpoint.every_minutes` of wall time (time.monotonic) have passed since `last_at`."""
    c = cfg.checkpoint
    late = c.every_minutes > 0 and time.monotonic() - last_at >= c.every_minutes * 60
    return step % c.every == 0 or step == cfg.grpo.steps or late


def save(trainer) -> Path:
    """Learners write into a staging directory; trainer_state.json last; then it is renamed into place, so a
    checkpoint is complete or absent (a failure mid-write leaves none). Rotation runs only after that. Sets
    trainer.last_checkpoint to (when it was done, seconds it took)."""
    t0, state = time.monotonic(), trainer.state
    final = checkpoints.checkpoint_dir(trainer.out, state)
    state["curriculum"] = trainer.ask_curriculum("state_dict")
    with checkpoints.staged(final, checkpoints.expected_bytes(trainer.out, trainer.model_path)) as staging:
        trainer.learners.call("save_checkpoint", str(staging))
        checkpoints.write_json(staging / checkpoints.IN_FLIGHT_FILE, trainer.pipeline.in_flight_state())
        checkpoints.write_json(staging / checkpoints.STATE_FILE, state)
    checkpoints.rotate(trainer.out, trainer.cfg.checkpoint.keep_last)
    trainer.last_checkpoint = (time.monotonic(), time.monotonic() - t0)
    return final


def restore(trainer, checkpoint: Path) -> None:
    """Actors back to `checkpoint` (trainer.state already holds its state): curriculum and data cursor, learner
    and optimizer (the reference model came with the learners' setup), the engines' weights as the version
    they were, the rollouts it kept in flight. What run.resume=true does at startup and a learner restart
    mid-run."""
    if trainer.state["curriculum"] is not None:
        trainer.ask_curriculum("load_state_dict", trainer.state["curriculum"])
    trainer.learners.call("load_checkpoint", str(checkpoint))
    # engines restart from the base model: give them the checkpoint's weights, as the version they were
    trainer.sync_weights(new_version=False)
    in_flight = checkpoints.read_in_flight(checkpoint)
    bound = trainer.cfg.rollout.max_staleness
    kept = within_staleness(in_flight, trainer.state["weight_version"], bound)
    if kept != in_flight:
        trainer.console.print(f"rollout.max_staleness={bound} is lower than the run's was: the completions the "
                              f"checkpoint kept for steps {[f['step'] for f in kept if 'rollouts' not in f]} "
                              f"are too stale now and are generated again (same batches)")
    trainer.pipeline.restore(kept)


def within_staleness(in_flight: list[dict], weight_version: int, max_staleness: int) -> list[dict]:
    """A checkpoint's in-flight steps, without the completions that would be more than `max_staleness` weight
    versions old when their step trains (a resume that lowers rollout.max_staleness): those keep their batch and
    are generated again. Step t + j after a checkpoint at t trains at version weight_version + j - 1."""
    if not in_flight:
        return in_flight
    first = in_flight[0]["step"]
    out = []
    for f in in_flight:
        trained_at = weight_version + f["step"] - first
        versions = [c["weight_version"] for r in f["rollouts"] for c in r["completions"]]
        out.append(f if trained_at - min(versions) <= max_staleness else {"step": f["step"], "ids": f["ids"]})
    return out
