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


def _in_flight(step: int, version: int) -> dict:
    return {"step": step, "ids": [f"b{step}"], "rollouts": [{"completions": [{"weight_version": version}]}]}


def test_a_resume_with_a_lower_staleness_bound_regenerates_the_too_stale_completions_of_the_same_batches():
    """Checkpointed at step 2 (weights v5) with max_staleness 2: steps 3 and 4 in flight, sent under v4 and v5.
    Resumed with max_staleness 0: step 3 trains at v5 (staleness 1), step 4 at v6 (staleness 1): both are
    generated again, each when due, with the batch the checkpoint recorded; nothing is drawn anew for them."""
    from sari_ray.trainer_state import within_staleness

    in_flight = [_in_flight(3, 4), _in_flight(4, 5)]
    assert within_staleness(in_flight, 5, 2) == in_flight  # the bound it ran with: kept as they are
    assert within_staleness(in_flight, 5, 1) == in_flight
    kept = within_staleness(in_flight, 5, 0)
    assert kept == [{"step": 3, "ids": ["b3"]}, {"step": 4, "ids": ["b4"]}]
    rec = Recorder()
    pipe = RolloutPipeline(0, 5, rec.draw, rec.send, rec.collect)
    pipe.restore(kept)
    run(0, 5, range(3, 6), rec, pipe)
    assert rec.log == ["send 3 b3", "wait 3", "train 3 b3", "send 4 b4", "wait 4", "train 4 b4",
                       "draw b1", "send 5 b1", "wait 5", "train 5 b1"]


def test_collecting_in_flight_waits_once_and_take_serves_what_was_collected():
    """Before a collective weight sync the driver collects the steps in flight (their shards are then redone on
    the weights they were sent under if a worker is lost); `take` later gives those rollouts without waiting."""
    rec = Recorder()
    pipe = run(1, 4, range(1, 2), rec)
    assert rec.log[-2:] == ["wait 1", "train 1 b1"]  # step 2 sent, in flight
    pipe.collect_in_flight()
    pipe.collect_in_flight()  # nothing left to wait for
    assert rec.log[-1] == "wait 2" and rec.log.count("wait 2") == 1
    run(1, 4, range(2, 3), rec, pipe)
    assert rec.log[-3:] == ["draw b3", "send 3 b3", "train 2 b2"]  # no second wait for step 2
