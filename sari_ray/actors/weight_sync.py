"""Learner rank 0 -> every rollout engine, by `learner.sync_backend` (driver side; the engines do the work).

object_store: rank 0 puts safetensors buckets in Ray's object store as each fills; each worker fetches them one
at a time and applies each as it arrives. A worker takes new weights between its own requests (no barrier), and
a worker restarted later reloads the same buckets.

collective: one torch.distributed group (learner rank 0 + every engine worker process, gloo on CPU, NCCL on GPU;
`engines.weight_sync_group`), formed once at startup; each sync broadcasts bucket by bucket, the layouts
travelling by the actor call. A broadcast needs every member, so a collective sync is a barrier across the
workers. A restarted worker is outside the group: it is re-synced alone through the object store (a fresh
export from the learner), and the group is re-formed before the next broadcast. A broadcast that fails is
redone through the object store.

A frozen audio encoder (`learner.train_audio_encoder: false`) is shipped by the first sync after the engines
start (a resumed run's checkpoint could hold an encoder trained before it was frozen) and never again.
"""
from __future__ import annotations

import time
from itertools import accumulate

import ray

from sari_ray.actors.group import ActorGroup, get_within

BACKENDS = ("object_store", "collective")


class WeightSync:
    def __init__(self, learners: ActorGroup, rollout, *, backend: str, bucket_bytes: int, timeout_s: float):
        if backend not in BACKENDS:
            raise ValueError(f"learner.sync_backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.learners, self.rollout, self.backend = learners, rollout, backend
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.engines_hold_frozen = False  # the first sync ships everything
        self.fallbacks = 0  # collective syncs redone through the object store
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
        workers = self.rollout.actors
        ranks = get_within([a.engine_ranks.remote() for a in workers], self.timeout_s, "rollout engine ranks")
        world = 1 + sum(ranks)
        offsets = [1 + before for before in accumulate([0] + ranks[:-1])]
        host, port = get_within(self.learners.actors[0].open_weight_sync_store.remote(world, self.timeout_s),
                                self.timeout_s, "the weight-sync group's store on learner rank 0")
        joins = [self.learners.actors[0].join_weight_sync_group.remote(host, port, world, self.timeout_s)]
        joins += [a.join_weight_sync_group.remote(host, port, world, off, self.timeout_s)
                  for a, off in zip(workers, offsets)]
        get_within(joins, self.timeout_s, f"forming the weight-sync group ({world} processes at {host}:{port})",
                   "Can every rollout node reach learner rank 0's node on that port? learner.sync_backend="
                   "object_store needs no direct connection.")
        self.rollout.sync_group_stale = False

    def _broadcast(self, version: int, include_frozen: bool) -> dict[str, float]:
        if self.rollout.sync_group_stale:  # a worker restarted since the group was formed
            self._form_group()
        plan = ray.get(self.learners.actors[0].weight_sync_plan.remote(self.bucket_bytes, include_frozen))
        sends = self.learners.call_refs("broadcast_weights", plan, self.bucket_bytes, include_frozen)
        receives = self.rollout.receive_weights_refs(plan, version)
        try:
            sent = get_within(sends + receives, self.timeout_s, "the collective weight sync")[0]
        except (ray.exceptions.RayError, TimeoutError):
            # A worker died or failed mid-broadcast: the group is broken. Redo this sync through the object
            # store (the rollout group restarts a dead worker), and re-form the group before the next one.
            self.fallbacks += 1
            self.rollout.sync_group_stale = True
            refs, nbytes = self._export_refs(include_frozen=True)
            self.rollout.load_weights(refs, version)
            return {"bytes": float(nbytes), "buckets": len(refs)}
        return {"bytes": float(sent), "buckets": len(plan)}
