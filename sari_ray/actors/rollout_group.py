"""The rollout workers as a pool that survives a worker's death and grows and shrinks with the cluster.

Ray restarts a dead worker (`max_restarts`); the new one starts from the base model at weight version 0. The
group notices (a failed call, or completions from the wrong weight version), waits for the new worker, gives it
the current weights and version, and re-issues that worker's shard with the same rows and seeds, so the step's
batch is what it would have been. More than `rollout.max_restarts` deaths of one worker stop the run with an
error naming the worker and the cause.

The pool is elastic between `rollout.min_workers` and `rollout.max_workers` (`reconcile`, at every step
boundary). A worker whose node has left the cluster (scale-down, eviction, node loss) is not waited for: it is
dropped and its shards go to the survivors, on the weights they were sent under. When the cluster offers room
for more workers, new ones start in the background; each joins once its engine is up and it holds the current
weights (through the object store). A prompt's sampling seeds follow its place in the batch, so the completions
do not depend on how many workers share it. Workers keep a number for life (`names`): a pool that lost worker
1 and grew again has workers 0 and 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from sari_ray.actors.group import ActorDied, ActorGroup, SetupTimeout, StepTimeout, first_line, get_all, get_within


class RolloutWorkerLost(RuntimeError):
    """A rollout worker died more often than `rollout.max_restarts` allows."""


class WorkerNodeLost(RuntimeError):
    """A rollout worker's node left the cluster: the worker is dropped, not waited for."""


class RolloutRequestError(ValueError):
    """A rollout worker's call raised the same exception again after a restart: an error in the request or in the
    code, not a fault a restart cures. A ValueError, so the CLI prints it without a traceback (--debug shows it)."""


@dataclass
class PendingCalls:
    """Calls sent to the workers and not yet collected, with the weight version they were sent under. Keyed by
    shard; `owner` names the worker each shard is on now (a lost worker's shard moves to a survivor)."""
    calls: list[tuple[int, Callable]]
    refs: dict[int, Any]
    version: int
    what: str = "a call"  # the method, for a deadline's error
    ids: dict[int, list[str]] | None = None  # shard -> its prompt ids, for an error's message
    owner: dict[int, int] = field(default_factory=dict)  # shard -> worker name
    per_worker: bool = False  # one call per worker (a weight load): a lost worker's call is dropped, not moved


@dataclass
class Joiner:
    """A worker started because the cluster offered room for it; it joins the pool once its engine is up."""
    name: int
    actor: Any
    ready: Any  # the ref of its `ready` call
    started: float  # time.monotonic() when it was asked for


@dataclass
class PoolEvent:
    """A join or a leave, for the driver's console line and metrics."""
    kind: str  # "starting" | "join" | "leave" | "join_failed"
    name: int
    seconds: float  # join: from asking for the worker to it holding the weights; leave: from the loss noticed
    detail: str
    workers: int  # the pool's size after it


class RolloutGroup(ActorGroup):
    def __init__(self, actors: list, max_restarts: int, ready_timeout_s: float,
                 on_restart: Callable[[int, str, float], None] = lambda index, cause, seconds: None,
                 step_timeout_s: float | None = None, keep_versions: int = 1, *,
                 min_workers: int | None = None, max_workers: int | None = None,
                 start_worker: Callable[[], Any] | None = None, worker_resources: dict[str, float] | None = None,
                 resource_wait_s: float = 300.0, on_pool_change: Callable[[PoolEvent], None] = lambda event: None):
        """min_workers / max_workers (default: the starting size): the pool's bounds; start_worker: a new worker
        actor (needed to grow); worker_resources: what one worker asks Ray for (CPU, GPU, custom), read against
        what the cluster has free; resource_wait_s: how long a pool below min_workers waits for room."""
        super().__init__(actors, "rollout worker", step_timeout_s)
        self.max_restarts, self.ready_timeout_s, self.on_restart = max_restarts, ready_timeout_s, on_restart
        self.names = list(range(len(actors)))  # each worker's number, for life
        self.next_name = len(actors)
        self.restarts = {name: 0 for name in self.names}
        self.min_workers = max(1, len(actors) if min_workers is None else min_workers)  # never an empty pool
        self.max_workers = len(actors) if max_workers is None else max_workers
        self.start_worker, self.resource_wait_s, self.on_pool_change = start_worker, resource_wait_s, on_pool_change
        self.worker_resources = {k: v for k, v in (worker_resources or {}).items() if v}
        self.joining: list[Joiner] = []
        self.nodes: dict[int, str] = {}  # worker name -> the node it runs on (known once it answered)
        self.first_results: dict[int, float] = {}  # a joiner's start time, until its first completions
        self.join_seconds: list[float] = []  # a joiner's time from being asked for to its first completions
        self.synced_version: int | None = None  # the version of the last sync (None: none yet, base model)
        # the buckets of the last versions, kept alive so that a shard sent under one of them and re-issued after
        # a restart runs on the same weights as before (rollout.max_staleness + 1 versions; the object store pays).
        # A collective sync keeps none: a worker that needs its version gets a fresh export (`export_refs`).
        self.keep_versions = keep_versions
        self.recent_weights: dict[int, list] = {}
        self.pids: dict[int, int] = {}  # worker name -> process id last seen (a new one means a restart)
        self.loads: PendingCalls | None = None  # weight loads sent and not yet checked
        self.last_loads: list[dict] = []
        self.export_refs: Callable[[], list] | None = None  # fresh buckets for a re-sync after a collective sync
        self.sync_group_stale = False  # a worker restarted, joined or left outside the collective sync group

    @property
    def restart_count(self) -> int:
        return sum(self.restarts.values())

    def actor(self, name: int):
        return self.actors[self.names.index(name)]

    def load_weights(self, bucket_refs: list, version: int, wait: bool = True) -> list[dict]:
        """Every worker reloads `bucket_refs` as `version` (remembered for workers restarted later). wait=False:
        each worker loads when its calls sent earlier are done (no barrier); the next `collect` checks the loads."""
        self.synced_version = version
        self.recent_weights = {v: r for v, r in self.recent_weights.items() if v > version - self.keep_versions}
        self.recent_weights[version] = bucket_refs
        self.loads = self.submit_sharded("load_weights", [bucket_refs] * len(self), version)
        self.loads.per_worker = True
        return self.finish_loads() if wait else []

    def receive_weights_refs(self, plan: list, version: int) -> list:
        """Collective sync: every worker receives the buckets `plan` lays out, by broadcast from learner rank 0,
        as `version` (`actors.weight_sync` waits on these with the broadcast). No buckets are kept for workers
        restarted later: they get a fresh export (`export_refs`). Buckets kept from a broadcast that fell back to
        the object store are dropped too: the rollouts sent under them were collected before this broadcast, so
        no shard can be re-run on them, and 7B buckets left pinned would hold the learner's object store."""
        self.synced_version = version
        self.recent_weights.clear()
        return [actor.receive_weights.remote(plan, version) for actor in self.actors]

    def finish_loads(self) -> list[dict]:
        """The results of the last `load_weights` not yet checked (a worker that died meanwhile is restarted and
        given the weights)."""
        loads, self.loads = self.loads, None
        if loads is None:
            return []
        self.last_loads = self._collect(loads, valid=None)
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
        return PendingCalls(calls, {i: make(self.actors[i]) for i, make in calls}, self.version, method, ids,
                            owner={i: self.names[i] for i, _ in calls})

    def collect(self, pending: "PendingCalls") -> list:
        """The results of `submit_sharded`, re-issuing a dead worker's shard. Its completions must carry the
        weights it was sent under, or newer ones (a worker restarted meanwhile gets the newest)."""
        self.finish_loads()
        return self._collect(pending, valid=lambda result: self._weights_at_least(result, pending.version),
                             version=pending.version)

    @property
    def version(self) -> int:
        return self.synced_version or 0

    def _weights_at_least(self, result: list[dict], version: int) -> bool:
        """A worker that restarted between calls serves the base model (version 0): its answers say so."""
        versions = {c["weight_version"] for r in result for c in r.get("completions", [r])}
        return all(version <= v <= self.version for v in versions)

    def _collect(self, pending: PendingCalls, valid: Callable[[Any], bool] | None,
                 version: int | None = None) -> list:
        """Each shard's result, within `timeout_s` per call (a re-issued call gets its own). `version`: the
        weights the calls were sent under; a re-issued call runs on them again if they are still kept. A call
        that raises is retried once on a fresh worker; the same exception again stops the run
        (`RolloutRequestError`, naming the worker, the prompt ids and the exception). A shard whose worker left
        the pool goes to a survivor (a per-worker call is dropped with its worker)."""
        out: dict[int, Any] = {}
        behind: set[int] = set()  # workers that ran a re-issued shard on older weights
        raised: dict[int, str] = {}  # shard -> the exception its call raised (retried once)
        what, ids = pending.what, pending.ids
        for i, make in pending.calls:
            while i not in out:
                name = pending.owner[i]
                if name not in self.names:  # its worker left the pool
                    if pending.per_worker:
                        break
                    self._move(pending, i, version, behind)
                    continue
                try:
                    result = ray.get(pending.refs[i], timeout=self.timeout_s)
                    if valid is None or valid(result):
                        out[i] = result
                        self._first_result(name)
                        continue
                    self._recover(name, "it answered with the base model's weights: it restarted between calls",
                                  died=True)
                except ray.exceptions.GetTimeoutError:
                    raise StepTimeout(f"rollout worker {name} did not finish {what} within {self.timeout_s:.0f} s "
                                      f"(cluster.step_timeout_s; the last complete checkpoint stays, resume with "
                                      f"run.resume=true). Check its log for what it waits on.") from None
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                    self._recover(name, first_line(err), died=True)  # the process died (signal, OOM, node loss)
                except ray.exceptions.RayTaskError as err:  # the worker lives but its call raised
                    if isinstance(err.cause, ray.exceptions.ObjectLostError):  # weights whose owner is gone
                        raise ActorDied("learner", 0, what, f"the weight buckets learner rank 0 put in the object "
                                                            f"store are lost with it: {first_line(err)}") from None
                    cause = first_line(err)
                    if raised.get(i) == cause:
                        shard = f"prompts {ids[i]}" if ids and i in ids else "its shard"
                        raise RolloutRequestError(
                            f"rollout worker {name} raised the same exception on {what} of {shard} after a restart: "
                            f"{cause}. An error in the request or the code, not a fault a restart cures; the "
                            f"last complete checkpoint stays") from None
                    raised[i] = cause
                    self._recover(name, cause, died=False)
                if pending.owner[i] not in self.names:  # the worker left: the loop moves its shard
                    continue
                if version is not None and version != self.version and version in self.recent_weights:
                    self._reload(name, version)
                    behind.add(name)  # re-issued on the weights it was sent under (async): the same completions
                pending.refs[i] = make(self.actor(name))
        for name in behind & set(self.names):  # back to the newest weights for the calls that follow
            self._reload(name, self.version)
        return [out[i] for i, _ in pending.calls if i in out]

    def _move(self, pending: PendingCalls, shard: int, version: int | None, behind: set[int]) -> None:
        """A lost worker's shard to a survivor (`_drop` kept at least min_workers), on the weights the shard was
        sent under."""
        survivor = self.names[shard % len(self.names)]
        pending.owner[shard] = survivor
        if version is not None and version != self.version and version in self.recent_weights:
            self._reload(survivor, version)
            behind.add(survivor)
        pending.refs[shard] = dict(pending.calls)[shard](self.actor(survivor))

    def _recover(self, name: int, cause: str, died: bool) -> None:
        """Wait for Ray's restart of the worker (or force one), then give it the current weights. A restart is
        counted by the worker's new process id. A worker whose node is gone is dropped from the pool instead."""
        import time

        t0 = time.monotonic()
        actor = self.actor(name)
        if not died:  # a fresh process and engine: Ray restarts it (the old one must not answer for the new one)
            self.pids[name] = get_within(actor.pid.remote(), self.ready_timeout_s, f"rollout worker {name}")
            ray.kill(actor, no_restart=False)
        try:
            pid = self._wait_until_back(name, old_pid=None if died else self.pids[name])
        except WorkerNodeLost as lost:
            return self._drop(name, str(lost), t0)
        except RolloutWorkerLost as gave_up:  # Ray's own max_restarts (the same bound) is spent: one death too many
            raise self._lost(name, self.restarts[name] + 1, cause) from gave_up
        restarted = pid != self.pids.get(name)
        self.pids[name] = pid
        if restarted:
            self.restarts[name] += 1
            self.sync_group_stale = True
            if self.restarts[name] > self.max_restarts:
                raise self._lost(name, self.restarts[name], cause)
        if self.synced_version is not None:
            self._reload(name, self.synced_version)
        if not restarted:
            return  # one death fails every call then in flight to the worker: counted once
        self.on_restart(name, cause, time.monotonic() - t0)

    def _lost(self, name: int, failures: int, cause: str) -> RolloutWorkerLost:
        return RolloutWorkerLost(f"rollout worker {name} failed {failures} times "
                                 f"(rollout.max_restarts={self.max_restarts}); last cause: {cause}")

    def _reload(self, name: int, version: int) -> None:
        """One worker loads `version` through the object store, within the step deadline: the buckets kept for
        it, or for the current version after a collective sync (none kept) a fresh export, after which the
        worker is outside the sync group (re-formed before the next broadcast). The one path by which a single
        worker is given weights: after its restart or its join, to re-run a shard on the weights it was sent
        under, and back to the newest after that."""
        refs = self.recent_weights.get(version)
        if refs is None:
            refs = self.export_refs()
            self.sync_group_stale = True
        get_all([self.actor(name).load_weights.remote(refs, version)], self.timeout_s, self.role, "load_weights",
                [name])

    def _wait_until_back(self, name: int, old_pid: int | None = None) -> int:
        """Calls fail with ActorUnavailableError while Ray restarts the worker; retry until it answers, from a
        process other than `old_pid` when given. Returns its process id. Its node gone: `WorkerNodeLost` (Ray
        could only restart it where there is room, and the room may never come)."""
        import time

        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            actor, left = self.actor(name), max(1.0, deadline - time.monotonic())
            if self._node_gone(name):
                raise WorkerNodeLost(f"its node {self.nodes[name][:12]} left the cluster")
            try:  # short waits: a call to a worker whose node just died can hang until Ray notices the node
                ray.get(actor.ready.remote(), timeout=min(left, 5.0))
                pid, node = ray.get([actor.pid.remote(), actor.node_id.remote()], timeout=min(left, 5.0))
                self.nodes[name] = node
                if pid != old_pid:
                    return pid
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                pass
            except ray.exceptions.ActorDiedError as err:  # Ray gave up on it (its own max_restarts)
                if self._node_gone(name):
                    raise WorkerNodeLost(f"its node {self.nodes[name][:12]} left the cluster") from None
                raise RolloutWorkerLost(f"rollout worker {name} could not be restarted: {first_line(err)}") from None
            if time.monotonic() > deadline:
                raise SetupTimeout(f"rollout worker {name} was not restarted within {self.ready_timeout_s:.0f} s")
            time.sleep(0.5)

    # ------------------------------------------------------------------ the elastic pool
    def note_nodes(self) -> None:
        """Where each worker runs (asked once, when the pool starts)."""
        self.nodes.update(zip(self.names, get_within([a.node_id.remote() for a in self.actors],
                                                     self.ready_timeout_s, "rollout workers' nodes")))

    def _node_gone(self, name: int) -> bool:
        node = self.nodes.get(name)
        return node is not None and node not in alive_nodes()

    def reconcile(self) -> None:
        """At a step boundary: drop workers whose node has left, admit joiners whose engine is up, and start new
        workers where the cluster has room for them (up to max_workers)."""
        import time

        alive = alive_nodes()
        for name in [n for n in self.names if self.nodes.get(n) not in (None, *alive)]:
            self._drop(name, f"its node {self.nodes[name][:12]} left the cluster", time.monotonic())
        self._admit_ready()
        self._grow()
        if len(self) < self.min_workers:
            self._refill()

    def _admit_ready(self) -> None:
        for joiner in [j for j in self.joining if ray.wait([j.ready], timeout=0)[0]]:
            self._admit(joiner)

    def _grow(self) -> int:
        """Start as many workers as the cluster has room for and max_workers allows; returns how many."""
        import time

        room = self.max_workers - len(self) - len(self.joining)
        if room <= 0 or self.start_worker is None:
            return 0
        free = ray.available_resources()
        fits = min((int(free.get(k, 0.0) / v + 1e-9) for k, v in self.worker_resources.items()), default=room)
        for _ in range(min(room, fits)):
            actor = self.start_worker()
            self.joining.append(Joiner(self.next_name, actor, actor.ready.remote(), time.monotonic()))
            self.on_pool_change(PoolEvent("starting", self.next_name, 0.0, "the cluster has room for it", len(self)))
            self.next_name += 1
        return min(room, fits)

    def _admit(self, joiner: Joiner) -> None:
        """A joiner whose engine is up takes the current weights (object store), then prompts."""
        import time

        self.joining.remove(joiner)
        try:
            get_within([joiner.ready], 5.0, f"rollout worker {joiner.name}")
            pid, node = get_within([joiner.actor.pid.remote(), joiner.actor.node_id.remote()], 30.0,
                                   f"rollout worker {joiner.name}")
        except (ray.exceptions.RayActorError, SetupTimeout) as err:  # it died while starting: its node too, maybe
            ray.kill(joiner.actor, no_restart=True)
            return self.on_pool_change(PoolEvent("join_failed", joiner.name, time.monotonic() - joiner.started,
                                                 f"died while starting ({first_line(err)})", len(self)))
        self.actors.append(joiner.actor)
        self.names.append(joiner.name)
        self.restarts[joiner.name], self.pids[joiner.name], self.nodes[joiner.name] = 0, pid, node
        if self.synced_version is not None:
            self._reload(joiner.name, self.synced_version)
        self.sync_group_stale = True  # outside the collective group until it is formed again
        self.first_results[joiner.name] = joiner.started
        self.on_pool_change(PoolEvent("join", joiner.name, time.monotonic() - joiner.started,
                                      f"node {node[:12]}, weights v{self.version}", len(self)))

    def _first_result(self, name: int) -> None:
        import time

        if name in self.first_results:
            self.join_seconds.append(time.monotonic() - self.first_results.pop(name))

    def _drop(self, name: int, cause: str, t0: float) -> None:
        """Out of the pool: a worker whose node is gone (its actor killed so that Ray never restarts it into a
        slot the pool did not ask for). Below min_workers the pool waits for room (`_refill`)."""
        import time

        index = self.names.index(name)
        actor = self.actors.pop(index)
        self.names.pop(index)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.sync_group_stale = True
        self.on_pool_change(PoolEvent("leave", name, time.monotonic() - t0, cause, len(self)))
        if len(self) < self.min_workers:
            self._refill()

    def _refill(self) -> None:
        """Below min_workers: start workers where there is room and wait for them up to resource_wait_s, then
        stop with an error naming what the cluster lacks."""
        import time

        deadline = time.monotonic() + self.resource_wait_s
        while len(self) < self.min_workers:
            self._grow()
            self._admit_ready()
            if len(self) >= self.min_workers:
                return
            if time.monotonic() > deadline:
                free = ray.available_resources()
                lacking = ", ".join(f"{k}: needs {v:g} per worker, free {free.get(k, 0.0):g}"
                                    for k, v in sorted(self.worker_resources.items()) if free.get(k, 0.0) < v)
                raise SetupTimeout(
                    f"the rollout pool has {len(self)} worker(s), below rollout.min_workers={self.min_workers}, and "
                    f"the Ray cluster offered no room for another within {self.resource_wait_s:.0f} s "
                    f"(cluster.resource_wait_s): {lacking or 'nothing free'}. The last complete checkpoint stays; "
                    f"resume with run.resume=true once rollout nodes are back")
            time.sleep(0.5)


def alive_nodes() -> set[str]:
    """Ids of the nodes the cluster counts as alive (a lost node drops out once Ray's health checks give up on
    it: about 15 s by default)."""
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
