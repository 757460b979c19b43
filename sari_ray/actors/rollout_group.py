"""The rollout workers as a group that survives a worker's death.

Ray restarts a dead worker (`max_restarts`); the new one starts from the base model at weight version 0. The
group notices (a failed call, or completions from the wrong weight version), waits for the new worker, gives it
the current weights and version, and re-issues that worker's shard with the same rows and seeds, so the step's
batch is what it would have been. More than `rollout.max_restarts` deaths of one worker stop the run with an
error naming the worker and the cause.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import ray

from sari_ray.actors.group import ActorDied, ActorGroup, SetupTimeout, StepTimeout, first_line, get_all, get_within


class RolloutWorkerLost(RuntimeError):
    """A rollout worker died more often than `rollout.max_restarts` allows."""


class RolloutRequestError(ValueError):
    """A rollout worker's call raised the same exception again after a restart: an error in the request or in the
    code, not a fault a restart cures. A ValueError, so the CLI prints it without a traceback (--debug shows it)."""


@dataclass
class PendingCalls:
    """Calls sent to the workers and not yet collected, with the weight version they were sent under."""
    calls: list[tuple[int, Callable]]
    refs: dict[int, Any]
    version: int
    what: str = "a call"  # the method, for a deadline's error
    ids: dict[int, list[str]] | None = None  # worker -> the prompt ids of its shard, for an error's message


class RolloutGroup(ActorGroup):
    def __init__(self, actors: list, max_restarts: int, ready_timeout_s: float,
                 on_restart: Callable[[int, str, float], None] = lambda index, cause, seconds: None,
                 step_timeout_s: float | None = None, keep_versions: int = 1):
        super().__init__(actors, "rollout worker", step_timeout_s)
        self.max_restarts, self.ready_timeout_s, self.on_restart = max_restarts, ready_timeout_s, on_restart
        self.restarts = [0] * len(actors)
        self.synced_version: int | None = None  # the version of the last sync (None: none yet, base model)
        # the buckets of the last versions, kept alive so that a shard sent under one of them and re-issued after
        # a restart runs on the same weights as before (rollout.max_staleness + 1 versions; the object store pays).
        # A collective sync keeps none: a worker that needs its version gets a fresh export (`export_refs`).
        self.keep_versions = keep_versions
        self.recent_weights: dict[int, list] = {}
        self.pids: dict[int, int] = {}  # worker index -> process id last seen (a new one means a restart)
        self.loads: PendingCalls | None = None  # weight loads sent and not yet checked
        self.last_loads: list[dict] = []
        self.export_refs: Callable[[], list] | None = None  # fresh buckets for a re-sync after a collective sync
        self.sync_group_stale = False  # a worker restarted outside the collective sync group

    @property
    def restart_count(self) -> int:
        return sum(self.restarts)

    def load_weights(self, bucket_refs: list, version: int, wait: bool = True) -> list[dict]:
        """Every worker reloads `bucket_refs` as `version` (remembered for workers restarted later). wait=False:
        each worker loads when its calls sent earlier are done (no barrier); the next `collect` checks the loads."""
        self.synced_version = version
        self.recent_weights = {v: r for v, r in self.recent_weights.items() if v > version - self.keep_versions}
        self.recent_weights[version] = bucket_refs
        self.loads = self.submit_sharded("load_weights", [bucket_refs] * len(self), version)
        return self.finish_loads() if wait else []

    def receive_weights_refs(self, plan: list, version: int) -> list:
        """Collective sync: every worker receives the buckets `plan` lays out, by broadcast from learner rank 0,
        as `version` (`actors.weight_sync` waits on these with the broadcast). No buckets are kept for workers
        restarted later: they get a fresh export (`export_refs`)."""
        self.synced_version = version
        self.recent_weights.pop(version, None)  # a re-delivered version: these weights, not older buckets
        return [actor.receive_weights.remote(plan, version) for actor in self.actors]

    def finish_loads(self) -> list[dict]:
        """The results of the last `load_weights` not yet checked (a worker that died meanwhile is restarted and
        given the weights)."""
        loads, self.loads = self.loads, None
        if loads is None:
            return []
        self.last_loads = self._collect(loads.calls, loads.refs, valid=None, what="load_weights")
        return self.last_loads

    def sharded(self, method: str, shards: list, *args, **kwargs) -> list:
        """One shard per worker (empty shards skipped); results must carry the current weight version."""
        return self.collect(self.submit_sharded(method, shards, *args, **kwargs))

    def submit_sharded(self, method: str, shards: list, *args, **kwargs) -> "PendingCalls":
        """Send one shard per worker now, wait later with `collect` (the async pipeline keeps a step's rollouts
        in flight while the learners train). A worker runs its calls in the order sent, so a call sent after a
        weight load runs on those weights."""
        calls = [(i, lambda a, shard=shard: getattr(a, method).remote(shard, *args, **kwargs))
                 for i, shard in enumerate(shards) if shard]
        ids = {i: [row["id"] for row in shard] for i, shard in enumerate(shards)
               if shard and all(isinstance(row, dict) and "id" in row for row in shard)}
        return PendingCalls(calls, {i: make(self.actors[i]) for i, make in calls}, self.version, method, ids)

    def collect(self, pending: "PendingCalls") -> list:
        """The results of `submit_sharded`, re-issuing a dead worker's shard. Its completions must carry the
        weights it was sent under, or newer ones (a worker restarted meanwhile gets the newest)."""
        self.finish_loads()
        return self._collect(pending.calls, pending.refs,
                             valid=lambda result: self._weights_at_least(result, pending.version), what=pending.what,
                             version=pending.version, ids=pending.ids)

    @property
    def version(self) -> int:
        return self.synced_version or 0

    def _weights_at_least(self, result: list[dict], version: int) -> bool:
        """A worker that restarted between calls serves the base model (version 0): its answers say so."""
        versions = {c["weight_version"] for r in result for c in r.get("completions", [r])}
        return all(version <= v <= self.version for v in versions)

    def _collect(self, calls: list[tuple[int, Callable]], refs: dict[int, Any],
                 valid: Callable[[Any], bool] | None, what: str = "a call", version: int | None = None,
                 ids: dict[int, list[str]] | None = None) -> list:
        """Each worker's result, within `timeout_s` per call (a re-issued call gets its own). `version`: the
        weights the calls were sent under; a re-issued call runs on them again if they are still kept. A call
        that raises is retried once on a fresh worker; the same exception again stops the run
        (`RolloutRequestError`, naming the worker, the prompt ids and the exception)."""
        out: dict[int, Any] = {}
        behind: set[int] = set()
        raised: dict[int, str] = {}  # worker -> the exception its call raised (retried once)
        for i, make in calls:
            while i not in out:
                try:
                    result = ray.get(refs[i], timeout=self.timeout_s)
                    if valid is None or valid(result):
                        out[i] = result
                        continue
                    self._recover(i, "it answered with the base model's weights: it restarted between calls",
                                  died=True)
                except ray.exceptions.GetTimeoutError:
                    raise StepTimeout(f"rollout worker {i} did not finish {what} within {self.timeout_s:.0f} s "
                                      f"(cluster.step_timeout_s; the last complete checkpoint stays, resume with "
                                      f"run.resume=true). Check its log for what it waits on.") from None
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                    self._recover(i, first_line(err), died=True)  # the process died (signal, OOM, node loss)
                except ray.exceptions.RayTaskError as err:  # the worker lives but its call raised
                    if isinstance(err.cause, ray.exceptions.ObjectLostError):  # weights whose owner is gone
                        raise ActorDied("learner", 0, what, f"the weight buckets learner rank 0 put in the object "
                                                            f"store are lost with it: {first_line(err)}") from None
                    cause = first_line(err)
                    if raised.get(i) == cause:
                        shard = f"prompts {ids[i]}" if ids and i in ids else "its shard"
                        raise RolloutRequestError(
                            f"rollout worker {i} raised the same exception on {what} of {shard} after a restart: "
                            f"{cause}. An error in the request or the code, not a fault a restart cures; the "
                            f"last complete checkpoint stays") from None
                    raised[i] = cause
                    self._recover(i, cause, died=False)
                if version is not None and version != self.version and version in self.recent_weights:
                    self._reload(i, version)
                    behind.add(i)  # re-issued on the weights it was sent under (async): the same completions
                refs[i] = make(self.actors[i])
        for i in behind:  # back to the newest weights for the calls that follow
            self._reload(i, self.version)
        return [out[i] for i, _ in calls]

    def _recover(self, index: int, cause: str, died: bool) -> None:
        """Wait for Ray's restart of the worker (or force one), then give it the current weights. A restart is
        counted by the worker's new process id."""
        import time

        t0 = time.monotonic()
        actor = self.actors[index]
        if not died:  # a fresh process and engine: Ray restarts it (the old one must not answer for the new one)
            self.pids[index] = get_within(actor.pid.remote(), self.ready_timeout_s, f"rollout worker {index}")
            ray.kill(actor, no_restart=False)
        try:
            pid = self._wait_until_back(index, old_pid=None if died else self.pids[index])
        except RolloutWorkerLost as gave_up:  # Ray's own max_restarts (the same bound) is spent: one death too many
            raise self._lost(index, self.restarts[index] + 1, cause) from gave_up
        restarted = pid != self.pids.get(index)
        self.pids[index] = pid
        if restarted:
            self.restarts[index] += 1
            if self.restarts[index] > self.max_restarts:
                raise self._lost(index, self.restarts[index], cause)
        if self.synced_version is not None:
            self._reload(index, self.synced_version)
        if not restarted:
            return  # one death fails every call then in flight to the worker: counted once
        self.on_restart(index, cause, time.monotonic() - t0)

    def _lost(self, index: int, failures: int, cause: str) -> RolloutWorkerLost:
        return RolloutWorkerLost(f"rollout worker {index} failed {failures} times "
                                 f"(rollout.max_restarts={self.max_restarts}); last cause: {cause}")

    def _reload(self, index: int, version: int) -> None:
        """One worker loads `version` through the object store, within the step deadline: the buckets kept for
        it, or for the current version after a collective sync (none kept) a fresh export, after which the
        worker is outside the sync group (re-formed before the next broadcast). The one path by which a single
        worker is given weights: after its restart, to re-run a shard on the weights it was sent under, and
        back to the newest after that."""
        refs = self.recent_weights.get(version)
        if refs is None:
            refs = self.export_refs()
            self.sync_group_stale = True
        get_all([self.actors[index].load_weights.remote(refs, version)], self.timeout_s, self.role, "load_weights",
                [index])

    def _wait_until_back(self, index: int, old_pid: int | None = None) -> int:
        """Calls fail with ActorUnavailableError while Ray restarts the worker; retry until it answers, from a
        process other than `old_pid` when given. Returns its process id."""
        import time

        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            try:
                actor, left = self.actors[index], max(1.0, deadline - time.monotonic())
                get_within(actor.ready.remote(), left, f"restart of rollout worker {index}")
                pid = get_within(actor.pid.remote(), left, f"restart of rollout worker {index}")
                if pid != old_pid:
                    return pid
                if time.monotonic() > deadline:
                    raise SetupTimeout(f"rollout worker {index} was not restarted within {self.ready_timeout_s:.0f} s")
                time.sleep(0.2)
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
            except ray.exceptions.ActorDiedError as err:  # Ray gave up on it (its own max_restarts)
                raise RolloutWorkerLost(f"rollout worker {index} could not be restarted: {first_line(err)}") from None

