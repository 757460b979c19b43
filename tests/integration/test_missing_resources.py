"""A run on a cluster that lacks the configured custom resources fails within cluster.resource_wait_s, naming
what is missing and what the cluster offers, instead of pending forever."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.integration.conftest import BIN, REPO, free_port, stop, wait_for_port

pytestmark = pytest.mark.integration


def test_a_cluster_without_the_slots_fails_fast_with_the_fix(tmp_path, tiny_qwen2_audio, synth_data):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's unix socket paths must stay under 108 bytes
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=4", "--include-dashboard=false", f"--temp-dir={ray_tmp}"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, head)
        t0 = time.monotonic()
        proc = subprocess.run(
            [str(BIN / "sari-ray"), "train", str(REPO / "configs" / "demo_cpu.yaml"), f"cluster.address=127.0.0.1:{port}",
             "cluster.resource_wait_s=3", f"model.path={tiny_qwen2_audio}", f"data.train={synth_data}",
             f"run.output_dir={tmp_path / 'run'}", "curriculum.num_tiers=3"],  # synth_data has tiers 0-2
            env=env, capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - t0
    finally:
        stop(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    err = proc.stderr
    assert proc.returncode == 2, proc.stdout[-2000:] + err[-2000:]
    assert "does not offer what the actors need after 3 s" in err
    assert "rollout_slot: needs 1, offers 0" in err and "learner_slot: needs 2, offers 0" in err
    assert "ray start --resources" in err and "Traceback" not in err
    print(f"failed after {seconds:.1f} s")
