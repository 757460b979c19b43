"""Learner rank 0 -> every rollout engine, by `learner.sync_backend` (driver side; the engines do the work).

object_store: rank 0 puts safetensors buckets in Ray's object store as each fills; each worker fetches them one
at a time and applies each as it arrives. A worker takes new weights between its own requests (no barrier), and
a worker restarted later reloads the same buckets.

collective: one torch.distributed group (learner rank 0 + every engine worker process, gloo on CPU, NCCL on GPU;
`engines.weight_sync_group`), formed once at startup; each sync broadcasts bucket by bucket, the layouts
travelling by the actor call. A broadcast needs every member, so a collective sync is a barrier across the
workers: it starts once every worker has finished the calls sent to it before (the asynchronous pipeline's next
rollouts, within the step deadline), so that its own deadline, `learner.sync_timeout_s`, covers the transfer
alone. That deadline bounds the driver's wait and each operation on the group: a member that dies mid-broadcast
holds the others in the broken broadcast at most that long (forming the group keeps the setup deadline). A
restarted worker is outside the group: it is re-synced alone through the object store (a fresh export from the
learner), and the group is re-formed before the next broadcast, every member dropping the old one first. A
broadcast that fails is redone through the object store, and said so on the console.

A frozen audio encoder (`learner.train_audio_encoder: false`) is shipped by the first sync after the engines
start (a resumed run's checkpoint could hold an encoder trained before it was frozen) and never again.
"""
from __future__ import annotations

import time
from itertools import accumulate

import ray

from typing import Callable

from sari_ray.actors.group import ActorDied, ActorGroup, first_line, get_all, get_within

BACKENDS = ("object_store", "collective")


class BroadcastFailed(RuntimeError):
    """A collective sync that did not complete: a member failed or died, or it ran past learner.sync_timeout_s."""


class WeightSync:
    def __init__(self, learners: ActorGroup, rollout, *, backend: str, bucket_bytes: int, timeout_s: float,
                 sync_timeout_s: float | None = None, report: Callable[[str], None] = lambda message: None):
        """timeout_s: forming the collective group (setup deadline); sync_timeout_s (default: timeout_s): one
        collective sync, the driver's wait and the group's timeout per operation; report: console lines."""
        if backend not in BACKENDS:
            raise ValueError(f"learner.sync_backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.learners, self.rollout, self.backend = learners, rollout, backend
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.sync_timeout_s = timeout_s if sync_timeout_s is None else sync_timeout_s
        self.report = report
        self.engines_hold_frozen = False  # the first sync ships everything
        self.fallbacks = 0  # collective syncs redone through the object store
        self.groups_formed = 0
        rollout.export_refs = lambda: self._export_refs(include_frozen=True)[0]

    def setup(self) -> None:
        """Form the collective group (startup; again after a worker restart)."""
        if self.backend == "collective":
            self._form_group()

    def sync(self, version: int, wait: bool = True) -> dict[str, float]:
        """Every worker gets the learner's weights as `version`. wait=False (object store only): workers load
        between their own requests and the next collect checks. Returns bytes, buckets, seconds, backend."""
        t0 = time.perf_counter()
        include_frozen = not self.engines_hold_frozen
        if self.backend == "collective":
            result = self._broadcast(version, include_frozen)
        else:
            refs, nbytes = self._export_refs(include_frozen)
            self.rollout.load_weights(refs, version, wait=wait)
            result = {"bytes": float(nbytes), "buckets": len(refs)}
        self.engines_hold_frozen = True
        return {**result, "seconds": time.perf_counter() - t0}

    def _export_refs(self, include_frozen: bool) -> tuple[list, int]:
        """(bucket refs, their bytes) from learner rank 0."""
        return tuple(self.learners.call("export_weight_bucket_refs", self.bucket_bytes, include_frozen)[0])

    def _form_group(self) -> None:
        t0 = time.monotonic()
        workers = self.rollout.actors
        ranks = get_within([a.engine_ranks.remote() for a in workers], self.timeout_s, "rollout engine ranks")
        world = 1 + sum(ranks)
        offsets = [1 + before for before in accumulate([0] + ranks[:-1])]
        host, port = get_within(self.learners.actors[0].open_weight_sync_store.remote(world, self.timeout_s),
                                self.timeout_s, "the weight-sync group's store on learner rank 0")
        op_timeout_s = self.sync_timeout_s
        joins = [self.learners.actors[0].join_weight_sync_group.remote(host, port, world, self.timeout_s,
                                                                       op_timeout_s)]
        joins += [a.join_weight_sync_group.remote(host, port, world, off, self.timeout_s, op_timeout_s)
                  for a, off in zip(workers, offsets)]
        get_within(joins, self.timeout_s, f"forming the weight-sync group ({world} processes at {host}:{port})",
                   "Can every rollout node reach learner rank 0's node on that port? learner.sync_backend="
                   "object_store needs no direct connection.")
        self.rollout.sync_group_stale = False
        self.groups_formed += 1
        if self.groups_formed > 1:
            self.report(f"weight-sync group formed again ({world} processes, the old group dropped by each) in "
                        f"{time.monotonic() - t0:.1f} s")

    def _broadcast(self, version: int, include_frozen: bool) -> dict[str, float]:
        if self.rollout.sync_group_stale:  # a worker restarted since the group was formed
            self._form_group()
        plan = get_all([self.learners.actors[0].weight_sync_plan.remote(self.bucket_bytes, include_frozen)],
                       self.learners.timeout_s, self.learners.role, "weight_sync_plan")[0]
        sends, receives = [], []
        try:
            # every worker first finishes what it was sent before (rollouts in flight): the broadcast's members
            # then enter it together, and its deadline is the transfer's alone
            get_all([a.pid.remote() for a in self.rollout.actors], self.rollout.timeout_s, self.rollout.role,
                    "the calls in flight before a collective weight sync")
            sends = self.learners.call_refs("broadcast_weights", plan, self.bucket_bytes, include_frozen)
            receives = self.rollout.receive_weights_refs(plan, version)
            return {"bytes": float(self._wait_broadcast(sends, receives)), "buckets": len(plan)}
        except (ActorDied, BroadcastFailed) as err:
            cause = str(err)
        return self._fall_back(version, cause, sends, receives)

    def _fall_back(self, version: int, cause: str, sends: list, receives: list) -> dict[str, float]:
        """A worker died or failed mid-broadcast, or it ran late: the group is broken. Redo this sync through the
        object store (the rollout group restarts a dead worker) and form the group again before the next one."""
        t_fail = time.monotonic()
        self.fallbacks += 1
        self.rollout.sync_group_stale = True
        stuck = []
        if sends or receives:  # those still in the broken broadcast leave it within one operation's timeout:
            # wait for that here (what follows on them would wait behind it anyway), to say how long it held them
            _, stuck = ray.wait(sends + receives, num_returns=len(sends + receives),
                                timeout=self.sync_timeout_s + 30)
        held_s = time.monotonic() - t_fail
        outcomes = [self._outcome(ref) for ref in receives]
        cause = next((f"rollout worker {i} died: {text}" for i, (kind, text) in enumerate(outcomes)
                      if kind == "died"), cause)
        how = "; ".join(f"rollout worker {i}: {text[:160]}" for i, (kind, text) in enumerate(outcomes)
                        if kind == "failed")  # how the survivors got out: their peer's error or the timeout
        refs, nbytes = self._export_refs(include_frozen=True)
        self.rollout.load_weights(refs, version)
        held = (f"{len(stuck)} member(s) still in the broken broadcast after {held_s:.1f} s" if stuck else
                f"the other members left the broken broadcast after {held_s:.1f} s")
        self.report(f"collective weight sync v{version} failed ({cause}); {held}{f' ({how})' if how else ''} "
                    f"(learner.sync_timeout_s={self.sync_timeout_s:g}); redone through the object store in "
                    f"{time.monotonic() - t_fail:.1f} s; the group is formed again before the next broadcast")
        return {"bytes": float(nbytes), "buckets": len(refs)}

    @staticmethod
    def _outcome(ref) -> tuple[str, str]:
        """(running | done | died | failed, the cause) of one member's call."""
        if not ray.wait([ref], timeout=0)[0]:
            return "running", ""
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as err:
            return "died", first_line(err)
        except ray.exceptions.RayError as err:
            return "failed", first_line(err)
        return "done", ""

    def _wait_broadcast(self, sends: list, receives: list) -> int:
        """Bytes learner rank 0 sent, once every member is done; the first member that fails or dies, or the
        deadline, raises `BroadcastFailed` at once (the others are not waited for)."""
        names = {ref: f"learner rank {r}" for r, ref in enumerate(sends)}
        names.update({ref: f"rollout worker {i}" for i, ref in enumerate(receives)})
        pending, deadline = list(names), time.monotonic() + self.sync_timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = ", ".join(names[r] for r in pending)
                raise BroadcastFailed(f"{late} did not finish the broadcast within {self.sync_timeout_s:g} s "
                                      f"(learner.sync_timeout_s)")
            try:
                ray.get(ready[0])
            except ray.exceptions.RayError as err:
                raise BroadcastFailed(f"{names[ready[0]]}: {first_line(err)}") from None
        return ray.get(sends[0])
