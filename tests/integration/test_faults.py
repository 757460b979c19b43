"""Real faults, not simulated ones, in one run (2 rollout workers): `kill -9` of a rollout worker's process during
GRPO (Ray restarts it, the driver gives it the current weights and re-issues its prompts), then later `kill -9` of
a learner's process (the driver kills the whole learner group, starts a new one and goes on from the last
complete checkpoint, as run.resume=true would). The run ends on its own with every step's batch and the final
weights of an uninterrupted run, every step in MLflow, and no process of it left behind."""
from __future__ import annotations

import json
import re
import signal
import time

import psutil
import pytest

from tests.integration.test_interrupts import (assert_none_left, assert_same_as_uninterrupted, log_text,
                                               run_processes, start, wait_for)

pytestmark = pytest.mark.integration


def actor_processes(driver_pid: int, actor: str) -> list[psutil.Process]:
    procs = []
    for p in psutil.Process(driver_pid).children(recursive=True):
        try:
            if p.cmdline() and p.cmdline()[0].startswith(f"ray::{actor}"):
                procs.append(p)
        except psutil.Error:
            pass
    return procs


def test_kill_9_of_a_rollout_worker_then_of_a_learner_during_grpo(short_training_run, tmp_path, tiny_qwen2_audio,
                                                                   synth_data):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    batches = out / "batches.jsonl"

    def grpo_batches(n):
        return lambda: batches.exists() and batches.read_text().count("\n") >= n

    proc = start(out, tiny_qwen2_audio, synth_data, "rollout.num_workers=2", "cluster.num_cpus=5")
    wait_for(grpo_batches(1), proc)
    workers = actor_processes(proc.pid, "RolloutWorker")
    assert len(workers) == 2, [w.cmdline()[0] for w in workers]
    workers[-1].send_signal(signal.SIGKILL)

    # after step 3 (checkpoints at steps 0 and 2): the learners die in step 4, which goes back to step 2
    wait_for(grpo_batches(3), proc)
    learners = actor_processes(proc.pid, "LearnerActor")
    assert len(learners) == 2, [p.cmdline()[0] for p in learners]
    procs = run_processes(proc.pid)
    learners[-1].send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    wait_for(lambda: "learner group back" in log_text(out), proc)
    back_s = time.monotonic() - t_kill
    procs += run_processes(proc.pid)  # the new learners
    proc.wait(900)
    text = log_text(out)
    assert proc.returncode == 0, text[-3000:]
    assert "restarted by Ray and back with weights" in text
    lines = [line for line in text.splitlines() if "back with weights" in line or "learner" in line and "rank" in line
             or "learner group back" in line]
    print("\n".join(lines))  # the rollout worker's and the learners' recovery, with times
    assert "restarting the learner group from step_000002 (restart 1 of at most 3)" in text, lines
    print(f"learner kill -> run going on again: {back_s:.0f} s")

    assert_same_as_uninterrupted(out, short_training_run["output_dir"])
    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(summary["tracking_uri"])

    def history(key):
        return client.get_metric_history(summary["mlflow_run_id"], key)

    assert max(m.value for m in history("faults/rollout_restarts")) >= 1
    assert [m.value for m in history("faults/learner_restarts")] == [1]
    reward_steps = [m.step for m in history("reward/mean")]
    assert sorted(set(reward_steps)) == [1, 2, 3, 4] and reward_steps.count(3) == 2  # step 3 replayed, logged again
    assert_none_left(proc.pid, procs)


def test_kill_9_of_the_reward_scorer_then_of_the_curriculum_scheduler_during_grpo(short_training_run, tmp_path,
                                                                                   tiny_qwen2_audio, synth_data):
    """The reward scorer holds no state: a new one is asked the step's call again. The curriculum scheduler holds
    state: the run goes back to the last complete checkpoint, as after a learner's death. Either way the run ends
    as the uninterrupted one, with each death counted once in MLflow."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    batches = out / "batches.jsonl"

    def grpo_batches(n):
        return lambda: batches.exists() and batches.read_text().count("\n") >= n

    def kill_9(actor: str, back: str) -> float:
        """kill -9 of the actor's process; seconds until the console says the run goes on."""
        found = actor_processes(proc.pid, actor)
        assert len(found) == 1, [p.cmdline()[0] for p in found]
        found[0].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        wait_for(lambda: back in log_text(out), proc)
        return time.monotonic() - t_kill

    proc = start(out, tiny_qwen2_audio, synth_data)
    wait_for(grpo_batches(1), proc)
    procs = run_processes(proc.pid)
    reward_back_s = kill_9("RewardScorer", "a new reward scorer asked again")
    wait_for(grpo_batches(3), proc)  # checkpoints at steps 0 and 2: the curriculum dies in step 4
    curriculum_back_s = kill_9("CurriculumScheduler", "curriculum scheduler back after")
    procs += run_processes(proc.pid)
    proc.wait(900)
    text = log_text(out)
    assert proc.returncode == 0, text[-3000:]
    assert "reward scorer rank 0 died during score" in text, text[-3000:]
    assert "restarting the curriculum scheduler from step_000002 (restart 1 of at most 3)" in text, text[-3000:]
    print(f"reward scorer kill -> run going on: {reward_back_s:.1f} s; curriculum scheduler kill -> run going on "
          f"(back at step 2): {curriculum_back_s:.1f} s")

    assert_same_as_uninterrupted(out, short_training_run["output_dir"])
    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(summary["tracking_uri"])
    for key in ("faults/reward_restarts", "faults/curriculum_restarts"):
        assert [m.value for m in client.get_metric_history(summary["mlflow_run_id"], key)] == [1], key
    assert_none_left(proc.pid, procs)


def test_kill_9_of_a_rollout_worker_mid_collective_broadcast(tmp_path, tiny_qwen2_audio, synth_data, monkeypatch):
    """learner.sync_backend=collective, 2 rollout workers: `kill -9` of one worker while a broadcast is in flight
    (the test-only SARI_TEST_RECEIVE_PAUSE_S widens a tiny model's broadcast to seconds: each worker pauses after
    every bucket it receives, and says so). The surviving worker leaves the broken broadcast within
    learner.sync_timeout_s (it would stay in it for cluster.setup_timeout_s, 30 min, before), the sync is redone
    through the object store, the group is formed again for the next broadcast, and the run ends on its own with
    every step logged."""
    from mlflow.tracking import MlflowClient

    from sari_ray.engines.vllm_worker_ext import TEST_RECEIVE_PAUSE_ENV

    sync_timeout_s = 30
    monkeypatch.setenv(TEST_RECEIVE_PAUSE_ENV, "0.5")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")  # every worker's pause line reaches the console, none folded
    out = tmp_path / "run"
    batches = out / "batches.jsonl"
    proc = start(out, tiny_qwen2_audio, synth_data, "rollout.num_workers=2", "cluster.num_cpus=5",
                 "learner.sync_backend=collective", f"learner.sync_timeout_s={sync_timeout_s}",
                 "learner.sync_bucket_mb=0.25")  # 11 buckets of the tiny model's 4 MiB: about 6 s a broadcast
    # GRPO step 1 logged: the next broadcast is step 2's (two more follow it, on the group formed again)
    wait_for(lambda: batches.exists() and batches.read_text().count("\n") >= 1, proc)
    seen = log_text(out).count("sari test pause: weight bucket 2/")
    wait_for(lambda: log_text(out).count("sari test pause: weight bucket 2/") > seen, proc)
    pauses = [line for line in log_text(out).splitlines() if "sari test pause: weight bucket 2/" in line]
    pid = int(re.search(r"pid=(\d+)", pauses[-1]).group(1))  # a worker pausing between two buckets it received
    workers = actor_processes(proc.pid, "RolloutWorker")
    assert len(workers) == 2 and pid in [w.pid for w in workers], (pauses[-1], [w.pid for w in workers])
    procs = run_processes(proc.pid)
    t_kill = time.monotonic()
    next(w for w in workers if w.pid == pid).send_signal(signal.SIGKILL)
    wait_for(lambda: "redone through the object store" in log_text(out), proc)
    going_on_s = time.monotonic() - t_kill
    procs += run_processes(proc.pid)  # the restarted worker
    proc.wait(900)
    text = log_text(out)
    assert proc.returncode == 0, text[-3000:]
    failed = [line for line in text.splitlines() if "collective weight sync v" in line]
    assert len(failed) == 1, failed  # one broadcast broken; the ones after it went through the new group
    held = re.search(r"the other members left the broken broadcast after ([\d.]+) s", failed[0])
    assert held and "died" in failed[0], failed[0]
    held_s = float(held.group(1))
    # the restart is seen when the redo reaches the worker while Ray restarts it (not when it is back already)
    restart = [line for line in text.splitlines() if "restarted by Ray and back with weights" in line]
    formed_again = [line for line in text.splitlines() if "weight-sync group formed again" in line]
    print(failed[0], *restart, *formed_again, sep="\n")
    print(f"failure -> the survivors out of the broken broadcast: {held_s:.1f} s (learner.sync_timeout_s="
          f"{sync_timeout_s}); kill -> run going on (sync redone, killed worker back): {going_on_s:.1f} s")
    assert held_s <= sync_timeout_s + 5, failed[0]  # one operation's timeout, plus a pause and a loaded machine
    assert formed_again and text.index(formed_again[0]) > text.index(failed[0]), formed_again

    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(summary["tracking_uri"])

    def history(key):
        return client.get_metric_history(summary["mlflow_run_id"], key)

    assert sorted(m.step for m in history("reward/mean")) == [1, 2, 3, 4]  # every step, once
    assert max(m.value for m in history("faults/rollout_restarts")) == len(restart) <= 1
    assert_none_left(proc.pid, procs)
