"""SIGINT the driver (what Ctrl-C, `ray job stop` and a pod eviction send, SIGTERM alike) during SFT and during
GRPO: it finishes the step in flight, writes a checkpoint, shuts down and exits 130 naming the resume setting;
`run.resume=true` then serves every step's batch and ends with the same weights as the uninterrupted run. The
GRPO case also SIGKILLs the resumed driver: no process of its run outlives it by 30 s, and a second resume
still ends as the uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, short_run_overrides

pytestmark = pytest.mark.integration

SARI_RAY = str(Path(sys.executable).parent / "sari-ray")


def start(out: Path, model: Path, data: Path, *extra: str) -> subprocess.Popen:
    args = [SARI_RAY, "train", str(REPO / "configs" / "demo_cpu.yaml"),
            *short_run_overrides(out, data, model), "sft.checkpoint_every=0", *extra]
    log = open(out.parent / f"{out.name}-{len(list(out.parent.glob(out.name + '-*.log')))}.log", "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=out.parent)


def wait_for(predicate, proc: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, f"run ended (exit {proc.returncode}) before the moment to interrupt it"
        assert time.monotonic() < deadline, "the moment to interrupt never came"
        time.sleep(0.2)


def log_text(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(out.parent.glob(out.name + "-*.log")))


def run_processes(driver_pid: int) -> list:
    """The driver's descendants now, and every process marked as part of its local cluster."""
    import psutil

    from sari_ray.deploy.local_ray import marked_processes

    procs = {p.pid: p for p in psutil.Process(driver_pid).children(recursive=True)}
    for pid in marked_processes(driver_pid):
        try:
            procs.setdefault(pid, psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return list(procs.values())


def assert_none_left(driver_pid: int, procs: list, seconds: float = 30.0) -> float:
    """Every process of the run (`procs`, seen while it ran, and any marked as its cluster's) is gone within
    `seconds` of the driver's exit; returns how long that took."""
    import psutil

    from sari_ray.deploy.local_ray import marked_processes

    def running(process) -> bool:  # a process may exit between any two of these calls
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def process(pid: int):
        try:
            return psutil.Process(pid)
        except psutil.Error:
            return None

    t0 = time.monotonic()
    while True:
        alive = [p for p in procs if running(p)]
        seen = {p.pid for p in alive}
        alive += [p for p in map(process, [pid for pid in marked_processes(driver_pid) if pid not in seen])
                  if p is not None and running(p)]
        if not alive:
            return time.monotonic() - t0
        if time.monotonic() - t0 > seconds:
            names = []
            for p in alive:
                try:
                    names.append(f"{p.pid} {p.name()}")
                except psutil.Error:
                    pass
            raise AssertionError(f"{len(alive)} process(es) of the run alive {seconds:.0f} s after the driver "
                                 f"exited: {names}")
        time.sleep(0.2)


def batch_lines(out: Path) -> int:
    batches = out / "batches.jsonl"
    return batches.read_text().count("\n") if batches.exists() else 0


def run_interrupted_then_resumed(out: Path, model: Path, data: Path, when, sigkill_resumed: bool = False) -> dict:
    """SIGINT at `when`; then resume. With `sigkill_resumed`: SIGKILL the resumed driver once it has trained a GRPO
    step of its own (mid-run, a step in flight), check nothing of its run is left after 30 s, and resume again."""
    proc = start(out, model, data)
    wait_for(lambda: when(out), proc)
    os.kill(proc.pid, signal.SIGINT)
    procs = run_processes(proc.pid)
    proc.wait(600)
    text = log_text(out)
    assert proc.returncode == 130, text[-3000:]
    assert "interrupted (SIGINT) at" in text and "Resume with run.resume=true" in text
    interrupted_at = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert_none_left(proc.pid, procs)
    result = {"checkpoints_at_interrupt": interrupted_at}
    if sigkill_resumed:
        before = batch_lines(out)
        killed = start(out, model, data, "run.resume=true")
        try:
            wait_for(lambda: batch_lines(out) > before, killed)
            procs = run_processes(killed.pid)
            assert len(procs) >= 5, [p.name() for p in procs]  # Ray's, the engine's and the learners' processes
        finally:
            killed.send_signal(signal.SIGKILL)
            killed.wait(60)
        result["seconds_to_no_process"] = assert_none_left(killed.pid, procs)
    resumed = start(out, model, data, "run.resume=true")
    resumed.wait(900)
    assert resumed.returncode == 0, log_text(out)[-3000:]
    return {**result, "log": log_text(out)}


def assert_same_as_uninterrupted(out: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    def batches(run):
        return {row["step"]: row["ids"] for row in map(json.loads, (run / "batches.jsonl").open())}

    assert batches(out) == batches(reference)
    # the same seed reproduces the held-out evaluations exactly, item by item (issue: reproducible runs)
    state = "checkpoints/step_000000/trainer_state.json"
    assert json.loads((out / state).read_text())["after_sft_items"] == json.loads((reference / state).read_text())[
        "after_sft_items"]
    assert json.loads((out / "summary.json").read_text())["final_eval"] == json.loads(
        (reference / "summary.json").read_text())["final_eval"]
    final = "checkpoints/step_000004/model/model.safetensors"
    a, b = load_file(reference / final), load_file(out / final)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-6, f"weights after the resumed run differ from the uninterrupted run's by {diff}"


def test_sigint_during_sft_then_resume(short_training_run, tmp_path, tiny_qwen2_audio, synth_data):
    out = tmp_path / "run"
    # the signal arrives during startup or SFT step 1: the run stops after that step, in SFT
    result = run_interrupted_then_resumed(out, tiny_qwen2_audio, synth_data, lambda o: "actors up" in log_text(o))
    assert result["checkpoints_at_interrupt"] == ["sft_000001"], result["checkpoints_at_interrupt"]
    assert "at SFT step 1" in result["log"]
    assert_same_as_uninterrupted(out, short_training_run["output_dir"])


def test_sigint_during_grpo_then_resume(short_training_run, tmp_path, tiny_qwen2_audio, synth_data):
    out = tmp_path / "run"
    # SIGINT after GRPO step 1; the resumed driver is SIGKILLed after a step of its own (mid-run, a step in
    # flight); the second resume goes on from the last complete checkpoint
    result = run_interrupted_then_resumed(out, tiny_qwen2_audio, synth_data, lambda o: batch_lines(o) >= 1,
                                          sigkill_resumed=True)
    stopped = result["checkpoints_at_interrupt"][-1]
    assert stopped.startswith("step_") and stopped != "step_000004", result["checkpoints_at_interrupt"]
    print(f"no process of the SIGKILLed run left {result['seconds_to_no_process']:.1f} s after the kill")
    assert_same_as_uninterrupted(out, short_training_run["output_dir"])
