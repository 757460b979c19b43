"""Real faults, not simulated ones, in one run (2 rollout workers): `kill -9` of a rollout worker's process during
GRPO (Ray restarts it, the driver gives it the current weights and re-issues its prompts), then later `kill -9` of
a learner's process (the driver kills the whole learner group, starts a new one and goes on from the last
complete checkpoint, as run.resume=true would). The run ends on its own with every step's batch and the final
weights of an uninterrupted run, every step in MLflow, and no process of it left behind."""
from __future__ import annotations

import json
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
