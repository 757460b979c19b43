"""The rollout pipeline's order of draws, sends and waits, with a recording stand-in for the workers."""
from __future__ import annotations

import pytest

from sari_ray.rollout_pipeline import RolloutPipeline

pytestmark = pytest.mark.unit


class Recorder:
    """Draws batches b1, b2, ... and answers each send with rollouts naming the step; logs every call."""

    def __init__(self):
        self.log: list[str] = []
        self.draws = 0

    def draw(self) -> list[str]:
        self.draws += 1
        self.log.append(f"draw b{self.draws}")
        return [f"b{self.draws}"]

    def send(self, step: int, ids: list[str]):
        self.log.append(f"send {step} {ids[0]}")
        return step

    def collect(self, pending: int) -> list[dict]:
        self.log.append(f"wait {pending}")
        return [{"step": pending}]


def run(max_staleness: int, last_step: int, steps: range, rec: Recorder, pipe: RolloutPipeline | None = None):
    pipe = pipe or RolloutPipeline(max_staleness, last_step, rec.draw, rec.send, rec.collect)
    for step in steps:
        ids, rollouts = pipe.take(step)
        assert rollouts == [{"step": step}]
        rec.log.append(f"train {step} {ids[0]}")
    return pipe


def test_staleness_0_is_the_synchronous_loop():
    rec = Recorder()
    run(0, 3, range(1, 4), rec)
    assert rec.log == ["draw b1", "send 1 b1", "wait 1", "train 1 b1",
                       "draw b2", "send 2 b2", "wait 2", "train 2 b2",
                       "draw b3", "send 3 b3", "wait 3", "train 3 b3"]


def test_staleness_1_sends_the_next_step_before_training_and_stops_at_the_last():
    rec = Recorder()
    run(1, 3, range(1, 4), rec)
    assert rec.log == ["draw b1", "send 1 b1", "draw b2", "send 2 b2", "wait 1", "train 1 b1",
                       "draw b3", "send 3 b3", "wait 2", "train 2 b2",
                       "wait 3", "train 3 b3"]  # nothing is sent beyond grpo.steps


def test_staleness_2_keeps_two_steps_ahead_in_flight():
    rec = Recorder()
    run(2, 5, range(1, 3), rec)
    assert rec.log[:5] == ["draw b1", "send 1 b1", "draw b2", "send 2 b2", "draw b3"]
    assert [e for e in rec.log if e.startswith("send")] == ["send 1 b1", "send 2 b2", "send 3 b3", "send 4 b4"]


def test_a_checkpoint_holds_the_steps_in_flight_and_a_restore_serves_them_without_drawing_again():
    """Resume exactness: the uninterrupted run and (checkpoint after step 2 -> restore) draw the same batches."""
    whole = Recorder()
    run(1, 5, range(1, 6), whole)

    first = Recorder()
    pipe = run(1, 5, range(1, 3), first)
    saved = pipe.in_flight_state()
    assert saved == [{"step": 3, "ids": ["b3"], "rollouts": [{"step": 3}]}]
    resumed = Recorder()
    resumed.draws = first.draws  # the curriculum's cursor comes back from the checkpoint
    pipe = RolloutPipeline(1, 5, resumed.draw, resumed.send, resumed.collect)
    pipe.restore(saved)
    run(1, 5, range(3, 6), resumed, pipe)
    trained = lambda rec: [e for e in rec.log if e.startswith("train")]  # noqa: E731
    assert trained(first) + trained(resumed) == trained(whole)
    assert "send 3 b3" not in resumed.log  # step 3's completions came from the checkpoint


def test_asking_out_of_order_is_an_error():
    rec = Recorder()
    pipe = run(1, 5, range(1, 2), rec)
    with pytest.raises(RuntimeError, match="asked for step 3, next in flight is 2"):
        pipe.take(3)
