"""What the driver does when an actor dies mid-run.

- A rollout worker: Ray restarts it and its group re-syncs it and re-issues its prompts (`actors.rollout_group`);
  the driver only counts it. A worker whose node left the cluster is dropped from the pool, its prompts going to
  the others, and workers join where the cluster offers room (the elastic pool): said and counted here too.
- The reward scorer holds no state: a new one is started and the step's call asked again.
- A learner rank cannot be replaced inside a DeepSpeed group, so the whole group is rebuilt; the curriculum
  scheduler holds state (tier, running accuracies, its sampler). Both go back to the last complete checkpoint,
  exactly as run.resume=true would (`trainer_state.restore`), so the steps after it are replayed and give the
  batches and weights an uninterrupted run gives. (Rebuilding the curriculum from what the driver logs per step
  would need its state after every call, not every step: a batch is drawn steps ahead of its update.)
  A learner's node may be lost with it (a KubeRay pod replaced): the new group waits up to
  cluster.resource_wait_s for the learners' resources to be offered again, else the run stops with an error
  that names what is missing (`wiring.restart_learners`).

Each kind is bounded by run.max_restarts and counted in MLflow as `faults/<kind>` at the step it happened.
"""
from __future__ import annotations

import time

from rich.markup import escape

from sari_ray import checkpoints, trainer_state
from sari_ray.actors.group import ActorDied, SetupTimeout

LEARNER, CURRICULUM, REWARD_SCORER = "learner", "curriculum scheduler", "reward scorer"
FAULT_NAMES = {LEARNER: "learner_restarts", CURRICULUM: "curriculum_restarts", REWARD_SCORER: "reward_restarts"}


class LearnerGroupLost(RuntimeError):
    """An actor died more often than run.max_restarts allows; the message names it and the cause."""


def rollout_worker_restarted(trainer, index: int, cause: str, seconds: float) -> None:
    faults = trainer.state.setdefault("faults", {})
    faults["rollout_restarts"] = faults.get("rollout_restarts", 0) + 1
    trainer.console.print(f"[yellow]rollout worker {index} failed ({escape(cause)}); restarted by Ray and back with "
                          f"weights v{trainer.state['weight_version']} after {seconds:.0f} s; its prompts are re-issued",
                          soft_wrap=True)


def rollout_pool_changed(trainer, event) -> None:
    """A rollout worker joined the pool or left it with its node (`RolloutGroup.reconcile`): said on the console,
    a node loss counted as `faults/rollout_node_losses`."""
    pool = trainer.rollout
    if event.kind == "starting":
        line = (f"rollout worker {event.name} starting: the cluster has room for it (pool {event.workers} of at "
                f"most {pool.max_workers})")
    elif event.kind == "join":
        line = (f"[green]rollout worker {event.name} joined after {event.seconds:.0f} s ({event.detail}); pool "
                f"{event.workers} of at most {pool.max_workers}")
    elif event.kind == "leave":
        faults = trainer.state.setdefault("faults", {})
        faults["rollout_node_losses"] = faults.get("rollout_node_losses", 0) + 1
        line = (f"[yellow]rollout worker {event.name} left: {escape(event.detail)}; its prompts go to the other "
                f"workers on the weights they were sent under; pool {event.workers} (at least {pool.min_workers})")
    else:
        line = f"[yellow]rollout worker {event.name} did not join: {escape(event.detail)}"
    trainer.console.print(line, soft_wrap=True)


def pool_metrics(trainer) -> dict[str, float]:
    """The rollout pool's per-step metrics: its size, the faults so far, a joiner's time to first completions."""
    faults, pool = trainer.state.get("faults", {}), trainer.rollout
    out = {"rollout/workers": len(pool), "faults/rollout_restarts": faults.get("rollout_restarts", 0),
           "faults/rollout_node_losses": faults.get("rollout_node_losses", 0)}
    if pool.join_seconds:
        out["rollout/join_s"] = pool.join_seconds.pop()
        pool.join_seconds.clear()
    return out


def _count(trainer, err: ActorDied) -> dict[str, int]:
    """The fault counts with this death added (a copy); past run.max_restarts, the error that stops the run."""
    bound, name = trainer.cfg.run.max_restarts, FAULT_NAMES[err.role]
    faults = {**trainer.state.get("faults", {})}
    faults[name] = faults.get(name, 0) + 1
    if faults[name] > bound:
        raise LearnerGroupLost(f"{err}; the {err.role} was already restarted {bound} time(s) "
                               f"(run.max_restarts={bound}): stopping. The last complete checkpoint stays; resume "
                               f"with run.resume=true") from err
    return faults


def _at(state: dict) -> int:
    return state["step"] if state["phase"] == "grpo" else state["sft_step"]


def replace_reward_scorer(trainer, err: ActorDied) -> None:
    """The reward scorer died during a call: start a new one (the caller asks it again)."""
    from sari_ray.actors import wiring

    t0 = time.monotonic()
    trainer.state["faults"] = faults = _count(trainer, err)
    trainer.reward = wiring.start_reward_scorer(trainer.cfg)
    trainer.tracker.log_metrics({"faults/reward_restarts": faults["reward_restarts"]}, _at(trainer.state))
    trainer.console.print(f"[yellow]{escape(str(err))}; a new reward scorer asked again after "
                          f"{time.monotonic() - t0:.0f} s",
                          soft_wrap=True)


def back_to_checkpoint(trainer, err: Exception) -> None:
    """A learner rank or the curriculum scheduler died (`ActorDied`): start a new one (for a learner every rank
    is killed first, those blocked in a collective with it too, and a new group starts), then go back to the last
    complete checkpoint, at most run.max_restarts times per kind. Rollouts in flight are discarded; the steps
    after the checkpoint are trained and logged again (same MLflow run; readers take a step's last value).
    Other actors' deaths are re-raised. A death met on the way back is handled the same way, in turn (the
    curriculum scheduler lives on the driver's node, so a lost learner node no longer takes it along, but it
    can still be killed while the run goes back)."""
    while True:
        try:
            return _go_back(trainer, err)
        except ActorDied as again:
            err = again


def _go_back(trainer, err: Exception) -> None:
    import ray

    from sari_ray.actors import wiring

    if not (isinstance(err, ActorDied) and err.role in (LEARNER, CURRICULUM)):
        raise err
    cfg, t0, name = trainer.cfg, time.monotonic(), FAULT_NAMES[err.role]
    faults = _count(trainer, err)
    checkpoint = checkpoints.latest_checkpoint(trainer.out)
    failed_at = _at(trainer.state)
    what = "learner group" if err.role == LEARNER else err.role
    trainer.console.print(f"[yellow]{escape(str(err))}; restarting the {what} from "
                          f"{checkpoint.name if checkpoint else 'the start (no checkpoint yet)'} "
                          f"(restart {faults[name]} of at most {cfg.run.max_restarts})", soft_wrap=True)
    trainer.pipeline.discard()
    kept = {k: trainer.state[k] for k in ("mlflow_run_id", "tracking_uri") if k in trainer.state}
    trainer.state = {**trainer_state.state_at(checkpoint, cfg.run.seed), **kept, "faults": faults}
    if err.role == CURRICULUM or checkpoint is None:  # nothing saved yet: a fresh curriculum too
        ray.kill(trainer.curriculum, no_restart=True)
        trainer.curriculum = wiring.start_curriculum(cfg, trainer.tiers)
    if err.role == LEARNER or checkpoint is None:  # nothing saved yet: learners back to the base model too
        trainer.learners.kill()
        trainer.learners = _new_learners(trainer, err, checkpoint)
        trainer.weight_sync = wiring.start_weight_sync(cfg, trainer.learners, trainer.rollout, trainer.console)
    if checkpoint is not None:
        trainer_state.restore(trainer, checkpoint)
    else:  # GRPO without SFT starts in GRPO
        trainer.state["phase"] = "sft" if cfg.sft.steps > 0 else "grpo"
        trainer.sync_weights(new_version=False)
    trainer.tracker.log_metrics({f"faults/{name}": faults[name]}, failed_at)
    where = f"GRPO step {trainer.state['step'] + 1}" if trainer.state["phase"] == "grpo" else \
        f"SFT step {trainer.state['sft_step'] + 1}"
    trainer.console.print(f"{what} back after {time.monotonic() - t0:.0f} s; continuing at {where}", soft_wrap=True)


def _new_learners(trainer, err: Exception, checkpoint):
    """A new learner group, waiting up to cluster.resource_wait_s for its resources (its node may have been lost
    with the old one, see `wiring.restart_learners`); if they never come, a `SetupTimeout` (the CLI prints it
    without a traceback) that names what is missing and the checkpoint a resume starts from."""
    from sari_ray.actors import wiring

    def say(message: str) -> None:
        trainer.console.print(f"[yellow]{escape(message)}", soft_wrap=True)

    try:
        return wiring.restart_learners(trainer.cfg, trainer.learner_setup_kwargs(), say)
    except SetupTimeout as lost:
        kept = f"the last complete checkpoint ({checkpoint.name}) stays" if checkpoint else "no checkpoint yet"
        raise SetupTimeout(f"{err}, and no new learner group could start: {lost} Stopping; {kept}; resume with "
                           f"run.resume=true once the cluster offers them.") from None
