"""`sari-ray ablate` on a cluster (sari_ray/ablate_jobs.py) without Ray: how many runs fit at once against
hand-computed cases, and the scheduler with a fake launcher (at most N in flight, the next started as one ends, a
failure reported while the others go on, resume flags, a stop passed on to every run in flight)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sari_ray import ablate_jobs
from sari_ray.ablate_jobs import largest_need, run_concurrently, run_need, runs_at_once
from sari_ray.cli import main
from sari_ray.config import load_config
from sari_ray.stopping import Interrupted
from tests.unit.test_ablate import DEMO, SHUFFLED, FakeParent, write_finished

pytestmark = pytest.mark.unit


# -------------------------------------------------------------------------------------------- how many fit
def test_runs_at_once_by_hand():
    need = {"CPU": 3.0, "learner_slot": 2.0, "rollout_slot": 1.0}
    offered = {"CPU": 8.0, "learner_slot": 4.0, "rollout_slot": 3.0, "memory": 1e10, "node:127.0.0.1": 1.0}
    assert runs_at_once(need, offered, most=10) == 2  # CPU 8 // 3 = 2, learner_slot 4 // 2 = 2, rollout 3 // 1 = 3
    assert runs_at_once(need, {**offered, "learner_slot": 6.0, "CPU": 12.0}, most=10) == 3  # rollout_slot now
    assert runs_at_once(need, {**offered, "CPU": 16.0, "learner_slot": 10.0, "rollout_slot": 9.0}, most=4) == 4
    assert runs_at_once(need, {"CPU": 8.0, "learner_slot": 4.0}, most=10) == 0  # no rollout_slot at all
    assert runs_at_once(need, {**offered, "CPU": 2.0}, most=10) == 0  # not even one run's CPUs
    assert runs_at_once({"CPU": 0.1, "GPU": 0.5}, {"CPU": 0.3, "GPU": 2.0}, most=10) == 3  # 0.3 / 0.1 is 2.999...
    assert runs_at_once({}, {"CPU": 1.0}, most=5) == 5  # asks for nothing: only the cap


def test_a_run_needs_its_learners_and_its_rollout_pool_at_its_ceiling():
    demo = load_config([DEMO], [])  # 1 rollout worker (1 CPU, rollout_slot), 2 learners (1 CPU, learner_slot each)
    assert run_need(demo) == {"CPU": 3.0, "rollout_slot": 1.0, "learner_slot": 2.0}
    elastic = load_config([DEMO], ["rollout.max_workers=3", "learner.num_workers=1"])
    assert run_need(elastic) == {"CPU": 4.0, "rollout_slot": 3.0, "learner_slot": 1.0}  # 3 x 1 + 1 x 1 CPUs
    assert largest_need([run_need(demo), run_need(elastic)]) == {"CPU": 4.0, "rollout_slot": 3.0, "learner_slot": 2.0}


# ------------------------------------------------------------------------------------------- the scheduler
class FakeJob:
    """A run's driver process: ends with `code` after `polls` polls, or (stubborn) only when killed. A SIGTERM
    (terminate) makes a running one exit 130 at its next poll, as a run that checkpoints and stops."""

    def __init__(self, board, run, polls: int, code: int, stubborn: bool = False):
        self.board, self.run, self.polls, self.code, self.stubborn = board, run, polls, code, stubborn
        self.terminated = self.killed = 0
        self.exit: int | None = None
        board.running.add(run.arm + str(run.seed))
        board.most = max(board.most, len(board.running))

    def poll(self):
        if self.exit is None:
            self.polls -= 1
            if self.killed:
                self.exit = -9
            elif self.terminated and not self.stubborn:
                self.exit = 130
            elif self.polls <= 0 and not self.stubborn:
                self.exit = self.code
                if self.code == 0:
                    write_finished(self.run.dir, self.run.seed, 0.9 if self.run.arm == "shuffled" else 0.6)
                else:
                    self.run.dir.mkdir(parents=True, exist_ok=True)
                    (self.run.dir / "console.log").write_text("step 1\nerror: engine died\n")
            if self.exit is not None:
                self.board.running.discard(self.run.arm + str(self.run.seed))
                self.board.ended.append(self.run.arm + str(self.run.seed))
        return self.exit

    def terminate(self):
        self.terminated += 1

    def kill(self):
        self.killed += 1


class Board:
    """What the fake launcher saw: runs started in order, in flight, ended; the most in flight at once."""

    def __init__(self, polls=None, codes=None, stubborn=()):
        self.started, self.running, self.ended, self.most, self.jobs = [], set(), [], 0, []
        self.polls, self.codes, self.stubborn = polls or {}, codes or {}, set(stubborn)

    def launch(self, run, address=None):
        name = run.arm + str(run.seed)
        self.started.append((name, dict(o.split("=", 1) for o in run.overrides).get("run.resume"),
                             list(self.ended)))  # and which had ended when it started
        job = FakeJob(self, run, self.polls.get(name, 2), self.codes.get(name, 0), name in self.stubborn)
        self.jobs.append(job)
        return job


class Stop:
    requested = None


def pending(tmp_path, names):
    from sari_ray.ablate_cli import RunSpec

    runs = [RunSpec(n[:-1], int(n[-1]), tmp_path / n, (DEMO,), ("run.resume=false",)) for n in names]
    return [(f"[{i}/{len(runs)}] {r.arm} {r.seed}", r) for i, r in enumerate(runs, 1)]


def test_at_most_n_at_once_the_next_as_one_ends_and_a_failure_lets_the_others_go_on(tmp_path, capsys):
    board = Board(polls={"a0": 1, "b0": 5, "c0": 1, "d0": 1, "e0": 1}, codes={"c0": 1, "e0": 130})
    failed = run_concurrently(pending(tmp_path, ["a0", "b0", "c0", "d0", "e0"]), board.launch, 2, Stop(), poll_s=0)
    assert board.most == 2
    assert [name for name, _, _ in board.started] == ["a0", "b0", "c0", "d0", "e0"]  # in the given order
    assert board.started[2] == ("c0", "false", ["a0"])  # c0 took a0's place as soon as a0 ended, b0 still running
    assert sorted(board.ended) == ["a0", "b0", "c0", "d0", "e0"]
    assert failed[0] == {"arm": "c", "seed": 0, "dir": str(tmp_path / "c0"),
                         "error": f"exit 1: error: engine died; see {tmp_path / 'c0' / 'console.log'}"}
    assert [f["error"][:8] for f in failed] == ["exit 1: ", "exit 130"]  # stopped by something else: a failure
    out, err = capsys.readouterr()
    assert "[1/5] a 0: training as a Ray job into" in out and "[1/5] a 0: done in 0 s" in out
    assert "[3/5] c 0: FAILED after 0 s: exit 1: error: engine died" in err


def test_one_at_once_is_one_after_another(tmp_path):
    board = Board()
    run_concurrently(pending(tmp_path, ["a0", "b0", "c0"]), board.launch, 1, Stop(), poll_s=0)
    assert board.most == 1 and [ended for _, _, ended in board.started] == [[], ["a0"], ["a0", "b0"]]


def test_a_stop_passes_sigterm_to_every_run_in_flight_and_starts_no_more(tmp_path, capsys):
    stop = Stop()
    board = Board(polls={"a0": 100, "b0": 100})

    def launch(run):
        job = board.launch(run)
        if len(board.started) == 2:
            stop.requested = "SIGINT"
        return job

    with pytest.raises(Interrupted, match=r"ablation stopped \(SIGINT\); 1 run\(s\) not started"):
        run_concurrently(pending(tmp_path, ["a0", "b0", "c0"]), launch, 2, stop, poll_s=0)
    assert [j.terminated for j in board.jobs] == [1, 1] and [j.exit for j in board.jobs] == [130, 130]
    assert len(board.started) == 2
    assert "[1/3] a 0: stopped after 0 s (checkpointed; a rerun resumes it)" in capsys.readouterr().err


def test_a_second_stop_stops_the_runs_at_once_and_kills_what_is_left(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate_jobs, "KILL_AFTER_S", 0.0)
    stop = Stop()
    board = Board(stubborn={"a0"})  # does not stop on SIGTERM
    waits = []

    def launch(run):
        stop.requested = "SIGTERM"
        return board.launch(run)

    def second_signal(_s):  # the second Ctrl-C arrives while the ablation waits for the runs to stop
        waits.append(1)
        if len(waits) == 2:  # the first: the loop's poll after starting the run; the second: waiting for it to stop
            raise KeyboardInterrupt

    monkeypatch.setattr(ablate_jobs.time, "sleep", second_signal)
    with pytest.raises(KeyboardInterrupt):
        run_concurrently(pending(tmp_path, ["a0"]), launch, 1, stop, poll_s=0)
    job = board.jobs[0]
    assert job.terminated == 2 and job.killed == 1 and job.poll() == -9


# ------------------------------------------------------------------------------------ through `sari-ray ablate`
@pytest.fixture
def on_a_fake_cluster(monkeypatch):
    """RAY_ADDRESS set; the cluster holds 2 runs at once; each run's driver is a FakeJob (no Ray)."""
    board, parent, asked = Board(), FakeParent(), []

    def holds(cfgs, address, max_concurrent):
        asked.append((len(cfgs), address, max_concurrent))
        return min(2, max_concurrent or 2)

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setattr(ablate_jobs, "runs_the_cluster_holds", holds)
    monkeypatch.setattr(ablate_jobs, "launch_train", board.launch)
    monkeypatch.setattr(ablate_jobs, "POLL_S", 0.0)
    from sari_ray import ablate_cli

    monkeypatch.setattr(ablate_cli, "open_parent_run", lambda *a, **k: parent)
    return board, parent, asked


def test_ablate_on_a_cluster_skips_finished_runs_resumes_stopped_ones_and_nests_them(tmp_path, on_a_fake_cluster,
                                                                                      capsys):
    board, parent, asked = on_a_fake_cluster
    out = tmp_path / "abl"
    write_finished(out / "runs" / "base" / "seed0", 0, 0.6)  # finished earlier: skipped
    (out / "runs" / "base" / "seed1" / "checkpoints" / "step_000002").mkdir(parents=True)  # stopped midway
    argv = ["ablate", DEMO, "--arm", "base=", "--arm", f"shuffled={SHUFFLED}", "--seeds", "0", "1", "--out", str(out),
            "grpo.steps=4"]
    assert main(argv) == 0
    assert asked == [(3, "127.0.0.1:6379", None)]  # asked once, for the three runs left
    assert [(name, resume) for name, resume, _ in board.started] == [("shuffled0", "false"), ("base1", "true"),
                                                                     ("shuffled1", "false")]
    assert board.most == 2 and parent.status == "FINISHED"
    assert all(dict(o.split("=", 1) for o in j.run.overrides)["tracking.parent_run_id"] == "parent123"
               for j in board.jobs)
    assert "[1/4] arm base, seed 0: finished earlier, skipped" in capsys.readouterr().out
    summary = json.loads((out / "ablation.json").read_text())
    assert [r["mlflow_run_id"] for r in summary["runs"]] == ["run-base-0", "run-shuffled-0", "run-base-1",
                                                             "run-shuffled-1"]
    board.started.clear()
    assert main(argv) == 0 and board.started == []  # everything finished: nothing runs, the cluster is not asked
    assert len(asked) == 1


def test_ablate_on_a_cluster_reports_a_failed_run_and_a_stop_ends_the_parent_killed(tmp_path, on_a_fake_cluster,
                                                                                    capsys, monkeypatch):
    import os
    import signal

    board, parent, _ = on_a_fake_cluster
    board.codes["base0"] = 1
    out = tmp_path / "abl"
    argv = ["ablate", DEMO, "--arm", "base=", "--arm", f"shuffled={SHUFFLED}", "--seeds", "0", "1", "--out", str(out)]
    assert main(argv) == 1 and parent.status == "FAILED" and len(board.started) == 4
    assert json.loads((out / "ablation.json").read_text())["failed"][0]["error"].startswith("exit 1: error: engine")

    board.codes.clear()
    board.polls["base0"] = 10**6
    launch = board.launch

    def signalled(run, address=None):  # a SIGTERM to the ablation once base0 runs again
        job = launch(run, address)
        os.kill(os.getpid(), signal.SIGTERM)
        return job

    monkeypatch.setattr(ablate_jobs, "launch_train", signalled)
    assert main(argv) == 130
    assert parent.status == "KILLED" and board.jobs[-1].terminated == 1
    assert "rerun the same command to continue" in capsys.readouterr().err


def test_max_concurrent_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = str(tmp_path / "abl")
    assert main(["ablate", DEMO, "--arm", "a=", "--out", out, "--max-concurrent", "2"]) == 2
    assert "--max-concurrent 2 needs a Ray cluster (cluster.address or RAY_ADDRESS)" in capsys.readouterr().err
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert main(["ablate", DEMO, "--arm", "a=", "--out", out, "--max-concurrent", "0"]) == 2
    assert "--max-concurrent 0: use N >= 1" in capsys.readouterr().err
    assert not Path(out).exists()


def test_a_cluster_too_small_for_one_run_is_an_error_naming_the_resource(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "learner_slot": 1.0, "rollout_slot": 4.0})
    out = tmp_path / "abl"
    assert main(["ablate", DEMO, "--arm", "a=", "--out", str(out), "cluster.resource_wait_s=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the Ray cluster does not offer what the actors need") and \
        "learner_slot: needs 2, offers 1" in err, err
    assert not out.exists()  # asked before anything is written
