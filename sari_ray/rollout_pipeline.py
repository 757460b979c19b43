"""The rollouts of the coming steps, generated while the learners train (`rollout.max_staleness`).

With max_staleness k, taking step t first makes sure the rollouts of steps t .. t+k have been sent, then waits
for step t's: k = 0 is the synchronous loop (a step's rollouts are sent when it starts); k = 1 generates step
t+1 while the learners train step t. A step's batch is drawn from the curriculum when its rollouts are sent, so
the curriculum sees rewards k steps late, the same way in every run. Each rollout worker runs its calls in the
order sent, so rollouts sent after a weight load use those weights and none is more than k versions old.

Checkpoints hold the in-flight steps' batch and completions (`in_flight_state`), so a resumed run trains on the
very completions the uninterrupted run would have, and draws the same batches after them.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class InFlight:
    step: int
    ids: list[str]
    pending: Any = None  # what `send` returned, until collected (neither: drawn, sent once due)
    rollouts: list[dict] | None = None


class RolloutPipeline:
    def __init__(self, max_staleness: int, last_step: int, draw_batch: Callable[[], list[str]],
                 send: Callable[[int, list[str]], Any], collect: Callable[[Any], list[dict]]):
        self.max_staleness, self.last_step = max_staleness, last_step
        self.draw_batch, self.send, self.collect = draw_batch, send, collect
        self.queue: deque[InFlight] = deque()

    def take(self, step: int) -> tuple[list[str], list[dict]]:
        """Step `step`'s batch ids and rollouts (waiting for them), after sending the next steps' rollouts."""
        for ahead in range(step, min(step + self.max_staleness, self.last_step) + 1):
            if ahead > self._last_sent(step - 1):
                ids = self.draw_batch()
                self.queue.append(InFlight(ahead, ids, self.send(ahead, ids)))
        for f in self.queue:  # drawn, not sent (a restore dropped completions too stale): sent once due
            if f.step <= step + self.max_staleness and f.pending is None and f.rollouts is None:
                f.pending = self.send(f.step, f.ids)
        head = self.queue.popleft()
        if head.step != step:
            raise RuntimeError(f"rollout pipeline out of order: asked for step {step}, next in flight is {head.step}")
        return head.ids, self._wait(head)

    def in_flight_state(self) -> list[dict]:
        """The steps sent but not yet trained, with their completions (waits for them): checkpoint content."""
        return [{"step": f.step, "ids": f.ids, "rollouts": self._wait(f)} for f in self.queue]

    def collect_in_flight(self) -> None:
        """Wait for every step sent and not yet trained (their rollouts are kept for `take`)."""
        for f in self.queue:
            if f.pending is not None:
                self._wait(f)

    def restore(self, in_flight: list[dict]) -> None:
        """Put a checkpoint's in-flight steps back: their rollouts are not generated again (an entry without
        `rollouts` keeps its batch and is generated anew when due)."""
        self.queue = deque(InFlight(f["step"], f["ids"], rollouts=f.get("rollouts")) for f in in_flight)

    def discard(self) -> None:
        """Drop whatever is in flight (a restore from a checkpoint follows)."""
        self.queue.clear()

    def _last_sent(self, before: int) -> int:
        return self.queue[-1].step if self.queue else before

    def _wait(self, f: InFlight) -> list[dict]:
        if f.rollouts is None:
            f.rollouts, f.pending = self.collect(f.pending), None
        return f.rollouts
