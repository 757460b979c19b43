"""Real faults, not simulated ones: `kill -9` of a rollout worker's process during GRPO (2 workers). Ray restarts
it, the driver gives it the current weights and re-issues its prompts, and the run ends with every step's batch
and the final weights of an uninterrupted run."""
from __future__ import annotations

import signal
import time

import psutil
import pytest

from tests.integration.conftest import REPO
from tests.integration.test_interrupts import assert_same_as_uninterrupted, log_text, start, wait_for

pytestmark = pytest.mark.integration


def rollout_workers(driver_pid: int) -> list[psutil.Process]:
    procs = []
    for p in psutil.Process(driver_pid).children(recursive=True):
        try:
            if p.cmdline() and p.cmdline()[0].startswith("ray::RolloutWorker"):
                procs.append(p)
        except psutil.Error:
            pass
    return procs


def test_kill_9_of_a_rollout_worker_during_grpo(short_training_run, tmp_path, tiny_qwen2_audio, synth_data):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    batches = out / "batches.jsonl"
    proc = start(out, tiny_qwen2_audio, synth_data, "rollout.num_workers=2", "cluster.num_cpus=5")
    wait_for(lambda: batches.exists() and batches.read_text().count("\n") >= 1, proc)
    workers = rollout_workers(proc.pid)
    assert len(workers) == 2, [w.cmdline()[0] for w in workers]
    victim = workers[-1]
    victim.send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    proc.wait(900)
    text = log_text(out)
    assert proc.returncode == 0, text[-3000:]
    assert "restarted by Ray and back with weights" in text
    print(next(line for line in text.splitlines() if "back with weights" in line))  # the time to recover
    assert_same_as_uninterrupted(out, short_training_run["output_dir"])
    import json

    summary = json.loads((out / "summary.json").read_text())
    history = MlflowClient(summary["tracking_uri"]).get_metric_history(summary["mlflow_run_id"], "faults/rollout_restarts")
    assert max(m.value for m in history) >= 1
    assert sorted({m.step for m in MlflowClient(summary["tracking_uri"]).get_metric_history(
        summary["mlflow_run_id"], "reward/mean")}) == [1, 2, 3, 4]
    print(f"run finished {time.monotonic() - t_kill:.0f} s after the kill")
