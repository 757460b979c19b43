"""The driver side of the weight sync (`actors.weight_sync.WeightSync`) with stand-in groups: which path each sync
takes, what it asks the learner for (the frozen encoder only in the first sync), the collective group's ranks, its
re-forming after a restart, and the object-store fallback when a broadcast fails."""
from __future__ import annotations

from pathlib import Path

import pytest
import ray

from sari_ray.actors import rollout_group as rollout_group_lib
from sari_ray.actors import weight_sync as weight_sync_lib
from sari_ray.actors.weight_sync import WeightSync

pytestmark = pytest.mark.unit


class Ref:
    """What a stand-in `.remote(...)` returns: the value, or the exception its `ray.get` raises."""

    def __init__(self, value):
        self.value = value


class Method:
    """`actor.method.remote(...)` runs at once; its result comes back through the `Ref` it returns."""

    def __init__(self, fn):
        self.remote = lambda *args: Ref(fn(*args))


class FakeLearner:
    def __init__(self, log, rank):
        self.log, self.rank = log, rank
        self.weight_sync_plan = Method(lambda bucket, frozen: log.append(("plan", frozen)) or [["layout"]] * 3)
        self.open_weight_sync_store = Method(lambda world, timeout: log.append(("store", world)) or ("10.0.0.1", 4242))
        self.join_weight_sync_group = Method(
            lambda host, port, world, timeout, op_timeout: log.append(("join", 0, port, world, timeout, op_timeout)))
        self.broadcast_weights = Method(self._broadcast)

    def _broadcast(self, plan, bucket, frozen):
        self.log.append(("broadcast", self.rank, frozen))
        if self.log.count("fail") and self.rank == 0:
            return ray.exceptions.RayError("gloo: connection closed by peer")  # raised by the wait
        return 300 if self.rank == 0 else 0


class FakeLearners:
    role, timeout_s = "learner", 7

    def __init__(self, log, n=2):
        self.log, self.actors = log, [FakeLearner(log, r) for r in range(n)]

    def call(self, method, *args):
        assert method == "export_weight_bucket_refs"
        self.log.append(("export", args[1]))
        return [(["ref1", "ref2"], 123)] + [([], 0) for _ in self.actors[1:]]

    def call_refs(self, method, *args):
        return [getattr(a, method).remote(*args) for a in self.actors]


class FakeWorker:
    def __init__(self, log, index, tp):
        self.engine_ranks = Method(lambda: tp)
        self.join_weight_sync_group = Method(
            lambda host, port, world, off, timeout, op_timeout: log.append(("join", off, port, world, timeout,
                                                                            op_timeout)))
        self.pid = Method(lambda: log.append(("idle?", index)) or 1000 + index)
        self.receive_weights = Method(self._receive)
        self.load_weights = Method(lambda refs, version: log.append(("load", index, tuple(refs), version)))
        self.log, self.index = log, index

    def _receive(self, plan, version):
        self.log.append(("receive", self.index, version))
        if ("die", self.index) in self.log:
            return ray.exceptions.RayActorError()
        if ("peer died", self.index) in self.log:
            return ray.exceptions.RayError("gloo: Connection closed by peer")
        return {"bytes": 300}


class FakeRollout:
    role, timeout_s = "rollout worker", 9

    def __init__(self, log, tps):
        self.log, self.actors, self.sync_group_stale = log, [FakeWorker(log, i, tp) for i, tp in enumerate(tps)], False

    def load_weights(self, refs, version, wait=True):
        self.log.append(("group_load", tuple(refs), version, wait))
        return [{"bytes": 123}] if wait else []

    def receive_weights_refs(self, plan, version):
        return [a.receive_weights.remote(plan, version) for a in self.actors]


def _value(ref):
    if isinstance(ref.value, Exception):
        raise ref.value
    return ref.value


@pytest.fixture
def deadlines():
    """(what, seconds) of every get_within / get_all the driver made."""
    return []


@pytest.fixture(autouse=True)
def no_ray(monkeypatch, deadlines):
    def get_within(refs, seconds, what, hint=""):
        deadlines.append((what, seconds))
        return [_value(r) for r in refs] if isinstance(refs, list) else _value(refs)

    def get_all(refs, seconds, role, phase, ranks=None):
        deadlines.append((phase, seconds))
        return [_value(r) for r in refs]

    def wait(refs, num_returns=1, timeout=None):
        late = [r for r in refs if getattr(r.value, "late", False)]  # a member still in the broadcast
        ready = [r for r in refs if r not in late]
        return ready[:num_returns], ready[num_returns:] + late

    monkeypatch.setattr(weight_sync_lib, "get_within", get_within)
    monkeypatch.setattr(weight_sync_lib, "get_all", get_all)
    monkeypatch.setattr(weight_sync_lib.ray, "get", lambda ref, **_: _value(ref))
    monkeypatch.setattr(weight_sync_lib.ray, "wait", wait)


def make(backend, tps=(1,), **kwargs):
    log, reports = [], []
    learners, rollout = FakeLearners(log), FakeRollout(log, list(tps))
    sync = WeightSync(learners, rollout, backend=backend, bucket_bytes=64, timeout_s=5, report=reports.append,
                      **kwargs)
    sync.setup()
    sync.reports = reports
    return sync, rollout, log


def test_object_store_ships_the_frozen_encoder_in_the_first_sync_only():
    sync, _, log = make("object_store")
    first = sync.sync(1)
    second = sync.sync(2, wait=False)
    assert log == [("export", True), ("group_load", ("ref1", "ref2"), 1, True),
                   ("export", False), ("group_load", ("ref1", "ref2"), 2, False)]
    assert first["bytes"] == second["bytes"] == 123 and first["buckets"] == 2  # what was exported, waited or not


def test_collective_group_spans_learner_rank_0_and_every_engine_rank():
    _, _, log = make("collective", tps=(2, 1, 3), sync_timeout_s=2)
    world = 1 + 2 + 1 + 3
    assert log[0] == ("store", world)
    # forming the group has the setup deadline (5), each operation on it the sync deadline (2)
    assert sorted(e for e in log if e[0] == "join") == [("join", off, 4242, world, 5, 2) for off in (0, 1, 3, 4)]


def test_collective_sync_broadcasts_from_every_learner_rank_and_reforms_after_a_restart():
    sync, rollout, log = make("collective", tps=(1, 1))
    log.clear()
    result = sync.sync(1)
    assert log == [("plan", True), ("idle?", 0), ("idle?", 1),  # every worker free before the broadcast starts
                   ("broadcast", 0, True), ("broadcast", 1, True), ("receive", 0, 1), ("receive", 1, 1)]
    assert result["bytes"] == 300 and result["buckets"] == 3
    rollout.sync_group_stale = True  # a worker restarted: it is outside the group
    log.clear()
    sync.sync(2)
    assert log[0][0] == "store" and ("plan", False) in log and not rollout.sync_group_stale
    assert sync.reports == ["weight-sync group formed again (3 processes, the old group dropped by each) in 0.0 s"]


def test_a_failed_broadcast_is_redone_through_the_object_store():
    sync, rollout, log = make("collective")
    log.append("fail")
    result = sync.sync(5)
    assert ("export", True) in log and ("group_load", ("ref1", "ref2"), 5, True) in log
    assert rollout.sync_group_stale and sync.fallbacks == 1 and result["bytes"] == 123
    assert sync.reports[0].startswith("collective weight sync v5 failed (learner rank 0: gloo: connection "
                                      "closed by peer); the other members left the broken broadcast after ")


def test_a_worker_killed_mid_broadcast_is_named_and_the_others_are_waited_for_within_the_deadline(deadlines):
    sync, rollout, log = make("collective", tps=(1, 1), sync_timeout_s=3)
    log += [("die", 1), ("peer died", 0)]
    sync.sync(4)
    assert ("group_load", ("ref1", "ref2"), 4, True) in log and rollout.sync_group_stale and sync.fallbacks == 1
    report = sync.reports[-1]
    assert report.startswith("collective weight sync v4 failed (rollout worker 1 died: "), report
    # how the survivor got out of the broken broadcast
    assert "left the broken broadcast after 0.0 s (rollout worker 0: gloo: Connection closed by peer)" in report
    assert "(learner.sync_timeout_s=3); redone through the object store in " in report, report
    # the plan within the learners' step deadline; the workers' calls in flight within theirs
    assert ("weight_sync_plan", FakeLearners.timeout_s) in deadlines
    assert ("the calls in flight before a collective weight sync", FakeRollout.timeout_s) in deadlines


def test_a_broadcast_past_its_deadline_is_redone_through_the_object_store(monkeypatch):
    sync, rollout, log = make("collective", tps=(1, 1), sync_timeout_s=3)

    class Late(dict):
        late = True

    rollout.actors[0].receive_weights = Method(lambda plan, version: Late(bytes=300))  # never returns
    sync.sync(6)
    report = sync.reports[-1]
    assert report.startswith("collective weight sync v6 failed (rollout worker 0 did not finish the broadcast within "
                             "3 s (learner.sync_timeout_s)); 1 member(s) still in the broken broadcast after "), report
    assert ("group_load", ("ref1", "ref2"), 6, True) in log and rollout.sync_group_stale


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"learner.sync_backend must be one of \['object_store', 'collective'\]"):
        WeightSync(FakeLearners([]), FakeRollout([], [1]), backend="nccl", bucket_bytes=1, timeout_s=1)


def test_a_restarted_worker_after_a_collective_sync_gets_a_fresh_export(monkeypatch):
    monkeypatch.setattr(rollout_group_lib, "get_all", lambda refs, *_: [_value(r) for r in refs])
    log = []
    group = rollout_group_lib.RolloutGroup([FakeWorker(log, 0, 1)], max_restarts=1, ready_timeout_s=1)
    group.export_refs = lambda: log.append("export") or ["fresh"]
    group.load_weights(["fallback"], 6, wait=False)  # a broadcast redone through the object store keeps its buckets
    assert group.recent_weights == {6: ["fallback"]}
    log.clear()
    group.receive_weights_refs([], 7)  # ... until the next broadcast: no buckets kept
    assert group.recent_weights == {}
    group._reload(0, group.version)
    assert log[-2:] == ["export", ("load", 0, ("fresh",), 7)] and group.sync_group_stale
    log.clear()
    group.sync_group_stale = False
    group.load_weights(["kept"], 8, wait=False)
    log.clear()
    group._reload(0, group.version)
    assert log == [("load", 0, ("kept",), 8)] and not group.sync_group_stale


def test_the_console_line_keeps_error_text_that_looks_like_markup():
    """gloo's errors begin with "[/path/pair.cc:553]", which rich would read as a closing tag and raise."""
    import io

    from rich.console import Console

    from sari_ray.actors import wiring
    from sari_ray.config import load_config

    console = Console(file=io.StringIO(), width=400)
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml")
    sync = wiring.start_weight_sync(cfg, FakeLearners([]), FakeRollout([], [1]), console)
    sync.report("rollout worker 0: RuntimeError: [/__w/gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    assert "[/__w/gloo/transport/tcp/pair.cc:553] Connection closed by peer" in console.file.getvalue()
    assert sync.sync_timeout_s == cfg.learner.sync_timeout_s == 300 and sync.timeout_s == cfg.cluster.setup_timeout_s
