"""The rollout workers as a group that survives a worker's death.

Ray restarts a dead worker (`max_restarts`); the new one starts from the base model at weight version 0. The
group notices (a failed call, or completions from the wrong weight version), waits for the new worker, gives it
the current weights and version, and re-issues that worker's shard with the same rows and seeds, so the step's
batch is what it would have been. More than `rollout.max_restarts` deaths of one worker stop the run with an
error naming the worker and the cause.
"""
from __future__ import annotations

from typing import Any, Callable

import ray

from sari_ray.actors.wiring import ActorGroup, StepTimeout, get_within
from sari_ray.actors.wiring import first_line as _first_line


class RolloutWorkerLost(RuntimeError):
    """A rollout worker died more often than `rollout.max_restarts` allows."""


class RolloutGroup(ActorGroup):
    def __init__(self, actors: list, max_restarts: int, ready_timeout_s: float,
                 on_restart: Callable[[int, str, float], None] = lambda index, cause, seconds: None,
                 step_timeout_s: float | None = None):
        super().__init__(actors, "rollout worker", step_timeout_s)
        self.max_restarts, self.ready_timeout_s, self.on_restart = max_restarts, ready_timeout_s, on_restart
        self.restarts = [0] * len(actors)
        self.weights: tuple[list, int] | None = None  # (bucket refs, version) of the last sync
        self.export_refs: Callable[[], list] | None = None  # fresh buckets for a re-sync after a collective sync
        self.sync_group_stale = False  # a worker restarted outside the collective sync group

    @property
    def restart_count(self) -> int:
        return sum(self.restarts)

    def load_weights(self, bucket_refs: list, version: int) -> list[dict]:
        """Every worker reloads `bucket_refs` as `version` (remembered for workers restarted later)."""
        self.weights = (bucket_refs, version)
        return self._each([(i, lambda a: a.load_weights.remote(bucket_refs, version)) for i in range(len(self))],
                          what="load_weights")

    def receive_weights_refs(self, plan: list, version: int) -> list:
        """Collective sync: every worker receives the buckets `plan` lays out, by broadcast from learner rank 0,
        as `version` (`actors.weight_sync` waits on these with the broadcast). No buckets are kept for workers
        restarted later: they get a fresh export (`export_refs`)."""
        self.weights = (None, version)
        return [actor.receive_weights.remote(plan, version) for actor in self.actors]

    def sharded(self, method: str, shards: list, *args, **kwargs) -> list:
        """One shard per worker (empty shards skipped); results must carry the current weight version."""
        calls = [(i, lambda a, shard=shard: getattr(a, method).remote(shard, *args, **kwargs))
                 for i, shard in enumerate(shards) if shard]
        return self._each(calls, valid=self._current_weights, what=method)

    def _current_weights(self, result: list[dict]) -> bool:
        """A worker that restarted between calls serves the base model: its answers say so."""
        expected = self.weights[1] if self.weights else 0
        versions = {c["weight_version"] for r in result for c in r.get("completions", [r])}
        return versions <= {expected}

    def _each(self, calls: list[tuple[int, Callable]], valid: Callable[[Any], bool] | None = None,
              what: str = "a call") -> list:
        """Each worker's result, within `timeout_s` per call (a re-issued call gets its own)."""
        refs = {i: make(self.actors[i]) for i, make in calls}
        out: dict[int, Any] = {}
        for i, make in calls:
            while i not in out:
                try:
                    result = ray.get(refs[i], timeout=self.timeout_s)
                    if valid is None or valid(result):
                        out[i] = result
                        continue
                    self._restart(i, "it answered with the base model's weights: it restarted between calls",
                                  died=True)
                except ray.exceptions.GetTimeoutError:
                    raise StepTimeout(f"rollout worker {i} did not finish {what} within {self.timeout_s:.0f} s "
                                      f"(cluster.step_timeout_s; the last complete checkpoint stays, resume with "
                                      f"run.resume=true). Check its log for what it waits on.") from None
                except ray.exceptions.RayActorError as err:  # the worker process died (signal, OOM, node loss)
                    self._restart(i, _first_line(err), died=True)
                except ray.exceptions.RayTaskError as err:  # the worker lives but its engine failed
                    self._restart(i, _first_line(err), died=False)
                refs[i] = make(self.actors[i])
        return [out[i] for i, _ in calls]

    def _restart(self, index: int, cause: str, died: bool) -> None:
        self.restarts[index] += 1
        if self.restarts[index] > self.max_restarts:
            raise RolloutWorkerLost(f"rollout worker {index} failed {self.restarts[index]} times "
                                    f"(rollout.max_restarts={self.max_restarts}); last cause: {cause}")
        import time

        t0 = time.monotonic()
        actor = self.actors[index]
        if not died:
            ray.kill(actor, no_restart=False)  # a fresh process and engine; Ray restarts it
        self._wait_until_back(index)
        if self.weights is not None:
            self._resync(index)
        self.on_restart(index, cause, time.monotonic() - t0)

    def _resync(self, index: int) -> None:
        """A restarted worker gets the current weights through the object store: the last sync's buckets, or
        after a collective sync (none kept) a fresh export; it is then outside the sync group (re-formed later)."""
        refs, version = self.weights
        if refs is None:
            refs = self.export_refs()
            self.sync_group_stale = True
        ray.get(self.actors[index].load_weights.remote(refs, version))

    def _wait_until_back(self, index: int) -> None:
        """Calls fail with ActorUnavailableError while Ray restarts the worker; retry until it answers."""
        import time

        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            try:
                get_within(self.actors[index].ready.remote(), max(1.0, deadline - time.monotonic()),
                           f"restart of rollout worker {index}")
                return
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
            except ray.exceptions.ActorDiedError as err:  # Ray gave up on it (its own max_restarts)
                raise RolloutWorkerLost(f"rollout worker {index} could not be restarted: {_first_line(err)}") from None

