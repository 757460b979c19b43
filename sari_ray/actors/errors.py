"""Errors of actor calls the driver acts on; importable without Ray (the driver loop imports them at the top)."""
from __future__ import annotations


class ActorDied(RuntimeError):
    """An actor's process is gone (kill -9, OOM, node loss) while it served a call; names the group, the rank,
    the call and Ray's cause. For learners the driver rebuilds the group from the last checkpoint (train.py)."""

    def __init__(self, role: str, rank: int, phase: str, cause: str):
        super().__init__(f"{role} rank {rank} died during {phase} ({cause})")
        self.role, self.rank, self.phase, self.cause = role, rank, phase, cause


class StepTimeout(TimeoutError):
    """A per-step remote call did not finish within `cluster.step_timeout_s`; names the actors and the call."""
