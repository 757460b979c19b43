"""The rollout group's recovery policy on a real local Ray (stand-in workers that exit on cue): a worker that dies is restarted,
given the current weights and asked again; one that keeps dying stops the run naming it."""
from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.integration


class FlakyWorker:
    """Dies (os._exit) on the call numbers listed in a file, counting calls across restarts there too."""

    def __init__(self, state_dir: str):
        self.state_dir, self.version = state_dir, 0

    def _count(self) -> int:
        path = os.path.join(self.state_dir, "calls")
        n = int(open(path).read()) + 1 if os.path.exists(path) else 1
        open(path, "w").write(str(n))
        return n

    def ready(self) -> float:
        return 0.0

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def load_weights(self, refs, version):
        self.version = version
        return {"bytes": 1, "version": version}

    def generate(self, shard):
        die_on = {int(x) for x in open(os.path.join(self.state_dir, "die_on")).read().split()}
        if self._count() in die_on:
            os._exit(9)
        bad = [row["id"] for row in shard if isinstance(row, dict) and row.get("bad")]
        if bad:  # what vLLM's input checks do with a request they refuse
            raise ValueError(f"the request for {bad} is refused: Overflow when unpacking long long")
        return [{"sample_id": s, "completions": [{"weight_version": self.version}]} for s in shard]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pathlib import Path

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})  # workers import this file
    yield ray
    ray.shutdown()


def make_group(ray, tmp_path, die_on: str, max_restarts: int):
    from sari_ray.actors.rollout_group import RolloutGroup

    (tmp_path / "die_on").write_text(die_on)
    actor = ray.remote(FlakyWorker).options(max_restarts=max_restarts, max_task_retries=0, num_cpus=0).remote(
        str(tmp_path))
    events = []
    return RolloutGroup([actor], max_restarts, 120, on_restart=lambda i, cause, seconds: events.append((i, cause))), events


def test_a_dead_worker_is_restarted_resynced_and_asked_again(ray_local, tmp_path):
    group, events = make_group(ray_local, tmp_path, "2", max_restarts=2)
    group.load_weights(["w"], 7)
    assert group.sharded("generate", [["a", "b"]]) == [[{"sample_id": s, "completions": [{"weight_version": 7}]}
                                                       for s in ("a", "b")]]
    # call 2 dies: Ray restarts the worker (version 0), the group reloads v7 and re-issues the same shard
    assert group.sharded("generate", [["c"]]) == [[{"sample_id": "c", "completions": [{"weight_version": 7}]}]]
    assert group.restart_count == 1 and events[0][0] == 0


def test_a_worker_that_keeps_dying_stops_the_run_naming_it(ray_local, tmp_path):
    from sari_ray.actors.rollout_group import RolloutWorkerLost

    group, _ = make_group(ray_local, tmp_path, "1 2 3 4", max_restarts=2)
    with pytest.raises(RolloutWorkerLost, match=r"rollout worker 0 failed 3 times \(rollout.max_restarts=2\)"):
        group.sharded("generate", [["a"]])


class StandInRank:
    """A learner rank stand-in: `step` blocks forever (a collective waiting for a dead peer) or exits."""

    def step(self, mode):
        if mode == "exit":
            os._exit(9)
        import threading

        threading.Event().wait()

    def ready(self) -> float:
        return 0.0


def test_a_dead_rank_is_named_at_once_the_blocked_ones_killed_and_hangs_time_out(ray_local):
    import time

    from sari_ray.actors.group import ActorDied, StepTimeout
    from sari_ray.actors.group import ActorGroup

    remote = ray_local.remote(StandInRank).options(num_cpus=0)
    group = ActorGroup([remote.remote(), remote.remote()], "learner", timeout_s=600)
    t0 = time.monotonic()
    with pytest.raises(ActorDied, match=r"learner rank 1 died during step") as died:
        group.call_sharded("step", ["block", "exit"])  # rank 0 blocks, rank 1 dies: no waiting for rank 0
    assert died.value.rank == 1 and time.monotonic() - t0 < 60
    group.kill()  # rank 0 was blocked in its call: killed anyway
    with pytest.raises(ray_local.exceptions.RayActorError):
        ray_local.get(group.actors[0].ready.remote(), timeout=60)

    hung = ActorGroup([remote.remote()], "learner", timeout_s=2)
    with pytest.raises(StepTimeout, match=r"learner rank\(s\) \[0\] did not finish step within 2 s "
                                          r"\(cluster.step_timeout_s"):
        hung.call_sharded("step", ["block"])
    hung.kill()


def test_a_rollout_call_past_its_deadline_names_the_worker_and_the_call(ray_local, tmp_path):
    from sari_ray.actors.group import StepTimeout
    from sari_ray.actors.rollout_group import RolloutGroup

    actor = ray_local.remote(StandInRank).options(num_cpus=0).remote()
    group = RolloutGroup([actor], 0, 60, step_timeout_s=2)
    with pytest.raises(StepTimeout, match=r"rollout worker 0 did not finish step within 2 s"):
        group.sharded("step", [["block"]])
    ray_local.kill(actor)


def test_async_a_shard_sent_before_a_sync_is_reissued_on_the_weights_it_was_sent_under(ray_local, tmp_path):
    """rollout.max_staleness=1: a step's rollouts are sent, then new weights; the worker dies during the rollouts.
    The re-issued shard must run on the old weights (the same completions as without the fault), and the worker
    must end on the new ones for what follows."""
    from sari_ray.actors.rollout_group import RolloutGroup

    (tmp_path / "die_on").write_text("1")
    actor = ray_local.remote(FlakyWorker).options(max_restarts=2, max_task_retries=0, num_cpus=0).remote(str(tmp_path))
    group = RolloutGroup([actor], 2, 120, keep_versions=2)
    group.load_weights(["w7"], 7)
    pending = group.submit_sharded("generate", [["a"]])  # sent under v7; the worker dies running it
    group.load_weights(["w8"], 8, wait=False)  # the next sync, sent behind it
    assert group.collect(pending) == [[{"sample_id": "a", "completions": [{"weight_version": 7}]}]]
    assert group.restart_count == 1
    assert group.sharded("generate", [["b"]]) == [[{"sample_id": "b", "completions": [{"weight_version": 8}]}]]


def test_an_error_that_is_not_a_fault_is_retried_once_then_stops_naming_worker_prompts_and_error(ray_local, tmp_path):
    """A call that raises (our code, vLLM's input checks) is not a crash: one retry on a fresh worker, then an error
    naming the worker, the prompt ids and the exception, not an endless round of restarts into the same prompts."""
    from sari_ray.actors.rollout_group import RolloutRequestError

    group, events = make_group(ray_local, tmp_path, "", max_restarts=5)
    group.load_weights(["w"], 3)
    shard = [{"id": "q1"}, {"id": "q2", "bad": True}]
    with pytest.raises(RolloutRequestError, match=r"rollout worker 0 raised the same exception on generate of "
                                                  r"prompts \['q1', 'q2'\] after a restart: .*ValueError: the "
                                                  r"request for \['q2'\] is refused"):
        group.sharded("generate", [shard])
    assert group.restart_count == 1 and len(events) == 1  # one retry, on a restarted worker
    assert isinstance(RolloutRequestError("x"), ValueError)  # the CLI prints it without a traceback


class BucketOwner:
    """Learner rank 0's part in an object-store sync: it puts the buckets, so it owns them."""

    def export(self):
        import ray

        return [ray.put(b"w" * 2**21)]  # inside a list: the refs stay owned by this actor (2 MiB: in the store)


class LoadingWorker(FlakyWorker):
    def load_weights(self, refs, version):
        import ray

        ray.get(refs)  # what the rollout worker does with each bucket
        return super().load_weights(refs, version)


def test_weight_buckets_lost_with_their_owner_are_the_learners_death_not_the_workers(ray_local, tmp_path):
    """Learner rank 0 owns the buckets it puts; if it dies before a worker loads them, the load fails on lost
    objects. That is the learner's death (the driver restarts the learners from a checkpoint), not the healthy
    worker's: the worker is not killed and restarted into the same lost objects."""
    from sari_ray.actors.group import ActorDied
    from sari_ray.actors.rollout_group import RolloutGroup

    (tmp_path / "die_on").write_text("")
    owner = ray_local.remote(BucketOwner).options(num_cpus=0).remote()
    worker = ray_local.remote(LoadingWorker).options(max_restarts=2, max_task_retries=0, num_cpus=0).remote(
        str(tmp_path))
    group = RolloutGroup([worker], 2, 120)
    fresh = ray_local.get(owner.export.remote())  # a sync's buckets, not loaded before their owner dies
    ray_local.kill(owner)
    with pytest.raises(ray_local.exceptions.OwnerDiedError):  # the buckets are lost with it, as Ray tells the driver
        for _ in range(120):
            ray_local.get(fresh[0], timeout=30)
            time.sleep(0.5)
    with pytest.raises(ActorDied, match=r"learner rank 0 died during load_weights \(the weight buckets learner rank 0 "
                                        r"put in the object store are lost with it"):
        group.load_weights(fresh, 2)
    assert group.restart_count == 0


class HangingLoader(FlakyWorker):
    def load_weights(self, refs, version):  # a worker stuck on a weight load (an object it cannot fetch, say)
        import threading

        threading.Event().wait()


def test_a_weight_reload_of_one_worker_has_the_step_deadline(ray_local, tmp_path):
    """A single worker's reload (after its restart, or to re-run a shard on the weights it was sent under) waits
    within the per-step deadline and names the worker and the call, instead of waiting forever."""
    from sari_ray.actors.group import StepTimeout
    from sari_ray.actors.rollout_group import RolloutGroup

    (tmp_path / "die_on").write_text("")
    actor = ray_local.remote(HangingLoader).options(num_cpus=0).remote(str(tmp_path))
    group = RolloutGroup([actor], 0, 60, step_timeout_s=2)
    group.recent_weights[3] = ["w3"]
    t0 = time.monotonic()
    with pytest.raises(StepTimeout, match=r"rollout worker rank\(s\) \[0\] did not finish load_weights within 2 s"):
        group._reload(0, 3)
    assert time.monotonic() - t0 < 30
    ray_local.kill(actor)
