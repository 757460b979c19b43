"""`ray job submit` to a head started here with token auth on 127.0.0.1; the run lands in MLflow. `ray job stop`
during GRPO (the README's commands): the driver finishes its step, checkpoints it, marks the run KILLED, and a
resumed run goes on with the batches an uninterrupted run has."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.integration.conftest import BIN, REPO, free_port, short_run_overrides, stop, wait_for_port
from tests.integration.test_interrupts import batch_lines

pytestmark = pytest.mark.integration


@pytest.fixture
def ray_head(tmp_path):
    token = secrets.token_hex(32)
    # single-node: without it Ray on Linux swaps 127.0.0.1 for the routable address and binds every interface
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's unix socket paths must stay under 108 bytes
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=4",
         "--resources=" + json.dumps({"rollout_slot": 1, "learner_slot": 2}), f"--temp-dir={ray_tmp}"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(dashboard_port, proc, seconds=180)
        yield {"address": f"http://127.0.0.1:{dashboard_port}", "env": env, "token": token}
    finally:
        stop(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ray_job_submit_runs_training_and_logs_to_mlflow(ray_head, tmp_path, tiny_qwen2_audio, synth_data, mlflow_server):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "job-run"
    entrypoint = [
        str(BIN / "python"), "-m", "sari_ray.train", str(REPO / "configs" / "demo_cpu.yaml"),
        f"run.output_dir={out}", "run.name=job-submit-test", f"model.path={tiny_qwen2_audio}", f"data.train={synth_data}",
        "curriculum.num_tiers=3", "learner.num_workers=1", "sft.steps=1", "sft.batch_size=2", "grpo.steps=1", "grpo.prompts_per_step=2",
        "grpo.num_generations=2", "grpo.max_completion_length=8", "eval.max_samples=2", "eval.silent_audio=false",
        f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=job-submit"]
    # Without the token the job API refuses us.
    no_token = {k: v for k, v in ray_head["env"].items() if k != "RAY_AUTH_TOKEN"}
    refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", ray_head["address"]],
                             env={**no_token, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--no-wait", "--", *entrypoint],
        env=ray_head["env"], capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout + submit.stderr).group(0)  # output is colourised
    status, deadline = "", time.time() + 900
    while time.time() < deadline:  # the CLI ends with "Job '<id>' succeeded" (or failed / stopped) when done
        result = subprocess.run([str(BIN / "ray"), "job", "status", "--address", ray_head["address"], job_id],
                                env=ray_head["env"], capture_output=True, text=True, timeout=120)
        status = (result.stdout + result.stderr).lower()
        if any(f"{job_id.lower()}' {s}" in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(5)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", ray_head["address"], job_id],
                          env=ray_head["env"], capture_output=True, text=True, timeout=120).stdout
    assert f"{job_id.lower()}' succeeded" in status, status + logs[-5000:]
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("job-submit").experiment_id])
    assert [r.info.run_name for r in runs] == ["job-submit-test"]
    assert runs[0].info.status == "FINISHED" and "reward/mean" in runs[0].data.metrics


def ray_job(head, *args: str, timeout: float = 300) -> str:
    result = subprocess.run([str(BIN / "ray"), "job", *args[:1], "--address", head["address"], *args[1:]],
                            env=head["env"], capture_output=True, text=True, timeout=timeout)
    return result.stdout + result.stderr


def test_ray_job_stop_during_grpo_checkpoints_the_finished_step_and_the_resumed_run_goes_on(
        ray_head, tmp_path, tiny_qwen2_audio, synth_data, mlflow_server, short_training_run):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "stopped"
    overrides = [*short_run_overrides(out, synth_data, tiny_qwen2_audio), "sft.checkpoint_every=0",
                 f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=job-stop"]
    long = [*overrides, "grpo.steps=40"]  # long enough that the stop lands mid-run
    # the README's submit command: the stop window in the job's runtime environment
    submitted = ray_job(ray_head, "submit", "--no-wait", "--runtime-env-json",
                        json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}}), "--",
                        str(BIN / "python"), "-m", "sari_ray.train", str(REPO / "configs" / "demo_cpu.yaml"), *long)
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submitted).group(0)
    deadline, polls = time.time() + 900, 0
    while batch_lines(out) < 1:  # GRPO step 1 done
        assert time.time() < deadline, ray_job(ray_head, "logs", job_id)[-5000:]
        polls += 1
        if polls % 20 == 0:  # a `ray job status` takes seconds: now and then, to fail early on a failed job
            assert "failed" not in ray_job(ray_head, "status", job_id).lower(), ray_job(ray_head, "logs", job_id)[-5000:]
        time.sleep(0.5)
    t_stop = time.monotonic()
    ray_job(ray_head, "stop", job_id, timeout=600)  # waits until the job has stopped
    stop_s = time.monotonic() - t_stop
    status = ray_job(ray_head, "status", job_id).lower()
    logs = ray_job(ray_head, "logs", job_id)
    assert "stopped" in status, status
    assert "leaves 120 s (RAY_JOB_STOP_WAIT_TIME_S)" in logs and "interrupted (SIGTERM) at GRPO step" in logs, logs[-5000:]
    trained = batch_lines(out)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept[-1] == f"step_{trained:06d}", (kept, trained)  # the last finished step, checkpointed: none lost
    assert trained < 40
    client = MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("job-stop").experiment_id])[0]
    assert run.info.status == "KILLED"
    print(f"ray job stop at GRPO step {trained}: stopped in {stop_s:.1f} s with step_{trained:06d} written, "
          f"0 steps lost")

    # resume as the README says (the same command plus run.resume=true), for two steps more
    resumed = subprocess.run([str(BIN / "sari-ray"), "train", str(REPO / "configs" / "demo_cpu.yaml"), *overrides,
                              f"grpo.steps={trained + 2}", "run.resume=true"],
                             capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    rows = [json.loads(line) for line in (out / "batches.jsonl").open()]
    reference = [json.loads(line) for line in (short_training_run["output_dir"] / "batches.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, trained + 3))  # every step once: nothing lost or redone
    n = min(len(rows), len(reference))
    assert rows[:n] == reference[:n], "the stopped and resumed run drew other batches than the uninterrupted one"
