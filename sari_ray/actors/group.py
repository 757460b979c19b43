"""Calls to a group of actors, and the errors the driver acts on. The plumbing every other module of `actors/`
and the driver build on: it imports nothing of `actors/`, so nothing here can lead back up into the wiring.

Every call has a deadline: `get_all` (one call per rank, failing fast on a death), `get_within` (setup and
other one-off calls). Errors name the group, the rank and the call.
"""
from __future__ import annotations

import time
from typing import Any

import ray

PEER_DEATH_GRACE_S = 10.0  # an error on one rank may be its collective losing a dead peer: look for that death


class ActorDied(RuntimeError):
    """An actor's process is gone (kill -9, OOM, node loss) while it served a call; names the group, the rank,
    the call and Ray's cause. For learners the driver rebuilds the group from the last checkpoint (recovery.py)."""

    def __init__(self, role: str, rank: int, phase: str, cause: str):
        super().__init__(f"{role} rank {rank} died during {phase} ({cause})")
        self.role, self.rank, self.phase, self.cause = role, rank, phase, cause


class StepTimeout(TimeoutError):
    """A per-step remote call did not finish within `cluster.step_timeout_s`; names the actors and the call."""


class SetupTimeout(TimeoutError):
    """Actors could not be placed or did not come up in time (a TimeoutError, so the CLI reports it as a
    user-facing error: the message says what is missing and the fix)."""


def first_line(err: Exception) -> str:
    """The cause Ray reports (signal, OOM, exception text), without the stack: for an exception the actor's call
    raised, its type and message."""
    cause = getattr(err, "cause", None)
    if isinstance(err, ray.exceptions.RayTaskError) and isinstance(cause, Exception) and str(cause).strip():
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}"[:500]
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if any(k in line for k in ("SIGKILL", "OOM", "memory", "signal", "died",
                                                                "Error", "exit"))]
    return (useful or lines or [type(err).__name__])[0][:500]


def get_within(refs: list, seconds: float, what: str, hint: str = "") -> list:
    """ray.get with a deadline whose error names the group and the phase (a hung setup otherwise holds its
    CPUs / GPUs forever: a RayJob has no deadline of its own)."""
    try:
        return ray.get(refs, timeout=seconds)
    except ray.exceptions.GetTimeoutError:
        raise SetupTimeout(f"{what} did not finish within {seconds:.0f} s (cluster.setup_timeout_s). {hint}".strip()) from None


def get_one(ref, seconds: float | None, role: str, phase: str):
    """ray.get of one per-step call to a single actor (the curriculum scheduler, the reward scorer) within the
    step deadline; a death raises `ActorDied` naming the actor and the call."""
    try:
        return ray.get(ref, timeout=seconds)
    except ray.exceptions.GetTimeoutError:
        raise StepTimeout(f"the {role} did not answer {phase} within {seconds:.0f} s (cluster.step_timeout_s). The "
                          f"last complete checkpoint stays; resume with run.resume=true") from None
    except ray.exceptions.RayActorError as err:
        raise ActorDied(role, 0, phase, first_line(err)) from None


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
