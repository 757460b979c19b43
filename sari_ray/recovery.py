"""What the driver does when an actor dies mid-run. A rollout worker is restarted by Ray and re-synced by its
group (`actors.rollout_group`); the driver only counts it. A learner rank cannot be replaced inside a DeepSpeed
group, so the whole group is rebuilt and the run goes back to its last complete checkpoint, exactly as
run.resume=true would (`trainer_state.restore`)."""
from __future__ import annotations

import time

from sari_ray import checkpoints, trainer_state
from sari_ray.actors.group import ActorDied


class LearnerGroupLost(RuntimeError):
    """Learners died more often than run.max_restarts allows; the message names the rank and the cause."""


def count_fault(state: dict, name: str) -> int:
    """Add one to `faults/<name>` in the trainer state (checkpointed, so counts survive a resume)."""
    faults = state.setdefault("faults", {})
    faults[name] = faults.get(name, 0) + 1
    return faults[name]


def rollout_worker_restarted(trainer, index: int, cause: str, seconds: float) -> None:
    count_fault(trainer.state, "rollout_restarts")
    trainer.console.print(f"[yellow]rollout worker {index} failed ({cause}); restarted by Ray and back with weights "
                          f"v{trainer.state['weight_version']} after {seconds:.0f} s; its prompts are re-issued",
                          soft_wrap=True)


def restart_learners_from_checkpoint(trainer, err: Exception) -> None:
    """A learner rank died (`ActorDied`, role learner): every rank is killed (those blocked in a collective with
    it too), a new group starts, and the run goes back to the last complete checkpoint, at most
    run.max_restarts times. Rollouts in flight are discarded; the steps after the checkpoint are trained and
    logged again (same MLflow run; readers take a step's last value). Other actors' deaths are re-raised."""
    from sari_ray.actors import wiring

    if not (isinstance(err, ActorDied) and err.role == "learner"):
        raise err
    cfg, t0 = trainer.cfg, time.monotonic()
    faults = {**trainer.state.get("faults", {})}
    faults["learner_restarts"] = faults.get("learner_restarts", 0) + 1
    if faults["learner_restarts"] > cfg.run.max_restarts:
        raise LearnerGroupLost(f"{err}; the learner group was already restarted {cfg.run.max_restarts} time(s) "
                               f"(run.max_restarts={cfg.run.max_restarts}): stopping. The last complete checkpoint "
                               f"stays; resume with run.resume=true") from err
    checkpoint = checkpoints.latest_checkpoint(trainer.out)
    failed_at = trainer.state["step"] if trainer.state["phase"] == "grpo" else trainer.state["sft_step"]
    trainer.console.print(f"[yellow]{err}; restarting the learner group from "
                          f"{checkpoint.name if checkpoint else 'the start (no checkpoint yet)'} "
                          f"(restart {faults['learner_restarts']} of at most {cfg.run.max_restarts})", soft_wrap=True)
    trainer.learners.kill()
    trainer.pipeline.discard()
    kept = {k: trainer.state[k] for k in ("mlflow_run_id", "tracking_uri") if k in trainer.state}
    trainer.state = {**trainer_state.state_at(checkpoint, cfg.run.seed), **kept, "faults": faults}
    trainer.learners = wiring.start_learners(cfg, trainer.learner_setup_kwargs())
    trainer.weight_sync = wiring.start_weight_sync(cfg, trainer.learners, trainer.rollout)
    if checkpoint is not None:
        trainer_state.restore(trainer, checkpoint)
    else:  # nothing saved yet: the base model, a fresh curriculum (GRPO without SFT starts in GRPO)
        import ray

        ray.kill(trainer.curriculum)
        trainer.curriculum = wiring.start_curriculum(cfg, trainer.tiers)
        trainer.state["phase"] = "sft" if cfg.sft.steps > 0 else "grpo"
        trainer.sync_weights(new_version=False)
    trainer.tracker.log_metrics({"faults/learner_restarts": faults["learner_restarts"]}, failed_at)
    where = f"GRPO step {trainer.state['step'] + 1}" if trainer.state["phase"] == "grpo" else \
        f"SFT step {trainer.state['sft_step'] + 1}"
    trainer.console.print(f"learner group back after {time.monotonic() - t0:.0f} s; continuing at {where}",
                          soft_wrap=True)
