"""`ray job submit` to a head started here with token auth on 127.0.0.1; the run lands in MLflow."""
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

from tests.integration.conftest import BIN, REPO, free_port, stop, wait_for_port

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
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=3",
         "--resources=" + json.dumps({"rollout_slot": 1, "learner_slot": 1}), f"--temp-dir={ray_tmp}"],
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
