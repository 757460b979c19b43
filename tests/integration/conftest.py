"""Services the integration tests start themselves on 127.0.0.1 and stop by pid, and one short real training
run (tiny model, synthetic data, 2 DeepSpeed learners, 1 vLLM rollout worker, Ray, an MLflow server) that
several tests read."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 120.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {seconds} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (sqlite backend, local artifacts)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def short_run_overrides(out: Path, data: Path, model: Path) -> list[str]:
    """A few SFT and GRPO steps on a tiny model; small enough for CI on 2 cores."""
    return [f"run.output_dir={out}", "run.name=it", f"model.path={model}", f"data.train={data}",
            "prompt.style=structured",  # SARI's style (the demo itself uses implicit, see configs/demo_cpu.yaml)
            "curriculum.num_tiers=3",  # synth_data has tiers 0-2 (the `mixed` set; the demo trains `pitch_ladder`)
            "data.eval_fraction=0.25", "sft.steps=2", "sft.batch_size=4", "grpo.steps=4", "grpo.prompts_per_step=4",
            "grpo.num_generations=2", "grpo.max_completion_length=24", "learner.micro_batch_size=4",
            "checkpoint.every=2", "eval.max_samples=8", "tracking.completions_table_every=2",
            "curriculum.promote_threshold=1.0", "curriculum.min_steps_at_tier=1000", "rollout.max_model_len=1024",
            # the asynchronous pipeline (step t+1 generated while step t trains), as the demo runs it: the tests
            # built on this run (resume, interrupts, faults) check it serves the same batches and weights
            "rollout.max_staleness=1", "grpo.vllm_importance_sampling_correction=true"]


@pytest.fixture(scope="session")
def short_training_run(tmp_path_factory, mlflow_server, tiny_qwen2_audio, synth_data):
    """(tracking_uri, run_id, output_dir, per-step checks) of a short real run logged to the MLflow server."""
    from sari_ray.config import load_config
    from sari_ray.train import Trainer

    out = tmp_path_factory.mktemp("short-run")
    cfg = load_config(REPO / "configs" / "demo_cpu.yaml",
                      short_run_overrides(out, synth_data, tiny_qwen2_audio) + [f"tracking.tracking_uri={mlflow_server}"])
    trainer = Trainer(cfg)
    checks = []
    try:
        trainer.sft()
        checks.append(sync_check(trainer, "after-sft"))
        while trainer.state["step"] < cfg.grpo.steps:
            trainer.state["step"] += 1
            metrics = trainer.grpo_step(trainer.state["step"])
            checks.append({**sync_check(trainer, trainer.state["step"]), "metrics": metrics})
            if trainer.state["step"] % cfg.checkpoint.every == 0:
                trainer.save_checkpoint()
        summary = trainer.finish(0.0)
    finally:
        trainer.shutdown()
    return {"tracking_uri": mlflow_server, "run_id": summary["mlflow_run_id"], "output_dir": out,
            "checks": checks, "summary": summary}


def sync_check(trainer, label, rel_tol: float = 1e-5, abs_tol: float = 1e-4) -> dict:
    """Learner vs every rollout engine, tensor by tensor (by name), plus ranks agreeing and weight versions."""
    from sari_ray.engines.weight_buckets import compare_param_sums

    learner = trainer.learners.call("param_sums")
    engines = [ranks[0] for ranks in trainer.rollout.call("param_sums")]
    versions = trainer.rollout.call("weight_version")
    return {"label": label, "ranks_agree": all(sums == learner[0] for sums in learner[1:]),
            "mismatches": [compare_param_sums(learner[0], e, rel_tol=rel_tol, abs_tol=abs_tol) for e in engines],
            "tensors": len(learner[0]), "versions": versions, "expected_version": trainer.state["weight_version"]}
