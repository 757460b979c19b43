"""A new learner group after a node loss (`wiring.restart_learners`): the actors placed on the dead node before
Ray marks it dead die, and are started again once the resources are offered; a node that never comes back is an
error naming what is missing, within cluster.resource_wait_s. Ray's calls are replaced by fakes here; the real
node loss is tests/integration/test_node_loss.py."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from sari_ray.actors import wiring
from sari_ray.actors.group import ActorDied, SetupTimeout
from sari_ray.config import load_config

pytestmark = pytest.mark.unit
DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml"
FULL = {"CPU": 4.0, "rollout_slot": 1.0, "learner_slot": 2.0}


def offers(monkeypatch, *snapshots: dict) -> None:
    """ray.cluster_resources() returns each snapshot in turn, then the last one forever."""
    seen = list(snapshots)
    monkeypatch.setattr(wiring.ray, "cluster_resources", lambda: seen.pop(0) if len(seen) > 1 else seen[0])


def test_learners_that_die_with_their_node_are_started_again_once_it_is_back(monkeypatch):
    cfg = load_config(DEMO, ["cluster.resource_wait_s=30"])
    # the dead node still offered (placed there, died), then gone (waited for), then its replacement
    offers(monkeypatch, FULL, {"CPU": 2.0, "rollout_slot": 1.0}, FULL)
    monkeypatch.setattr(wiring.time, "sleep", lambda s: None)
    attempts = []

    def start_learners(cfg, setup_kwargs):
        attempts.append(setup_kwargs)
        if len(attempts) == 1:
            raise ray.exceptions.ActorDiedError()
        return "group"

    monkeypatch.setattr(wiring, "start_learners", start_learners)
    said = []
    assert wiring.restart_learners(cfg, {"model_path": "m"}, said.append) == "group"
    assert len(attempts) == 2
    assert said[0].startswith("new learners died while starting") and said[0].endswith("starting them again")
    # the learners' own resources only (2 CPUs, offered): the rollout pool is not waited for
    assert said[1].endswith("for the Ray cluster to offer learner_slot: needs 2, offers 0"), said[1]


def test_a_node_that_never_comes_back_is_an_error_naming_what_is_missing(monkeypatch):
    cfg = load_config(DEMO, ["cluster.resource_wait_s=0.3"])
    offers(monkeypatch, {"CPU": 4.0, "rollout_slot": 1.0})
    monkeypatch.setattr(wiring, "start_learners", lambda *a: pytest.fail("nothing to place the learners on"))
    t0 = time.monotonic()
    with pytest.raises(SetupTimeout, match="learner_slot: needs 2, offers 0"):
        wiring.restart_learners(cfg, {}, lambda message: None)
    assert time.monotonic() - t0 < 5  # the window (0.3 s) plus at most one poll (2 s)


def test_learners_that_keep_dying_stop_at_the_end_of_the_window(monkeypatch):
    cfg = load_config(DEMO, ["cluster.resource_wait_s=0"])
    offers(monkeypatch, FULL)

    def start_learners(cfg, setup_kwargs):
        raise ray.exceptions.ActorDiedError()

    monkeypatch.setattr(wiring, "start_learners", start_learners)
    with pytest.raises(SetupTimeout, match=r"new learners kept dying while starting for 0 s \(cluster.resource_wait_s"):
        wiring.restart_learners(cfg, {}, lambda message: None)


def test_a_death_met_on_the_way_back_is_handled_in_turn(monkeypatch):
    """A lost node took the learners and the curriculum scheduler: the scheduler's death shows during the
    learners' restore and is gone back from too, not raised out of the recovery."""
    from sari_ray import recovery

    handled = []

    def go_back(trainer, err):
        handled.append(err.role)
        if len(handled) == 1:
            raise ActorDied(recovery.CURRICULUM, 0, "load_state_dict", "its node died")

    monkeypatch.setattr(recovery, "_go_back", go_back)
    recovery.back_to_checkpoint(object(), ActorDied(recovery.LEARNER, 0, "grpo_step", "its node died"))
    assert handled == [recovery.LEARNER, recovery.CURRICULUM]
