"""Inside a fresh network namespace (tests.integration.multinode.NamespacedScript): a Ray head started as a user
starts one (`ray start --head`, token auth, 127.0.0.1) offering exactly two of the miniature's runs at once, and
`sari-ray ablate` attached to it through RAY_ADDRESS with 2 arms x 1 seed. Writes a JSON report (--report) for
test_ablate_cluster.py: ablate's exit code and the head's job table (every driver's job id, pid, start and end).

    python -m tests.integration.ablate_cluster_scenario --model M --data D --out DIR --report R.json
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.conftest import BIN, free_port, stop, wait_for_port
from tests.integration.multinode import REPO, assert_loopback_only
from tests.integration.test_ablate_miniature import MINIATURE

RUN_CPUS = 2  # one miniature run: 1 rollout worker + 1 learner (learner.num_workers=1), 1 CPU each
HEAD = {"num_cpus": 2 * RUN_CPUS, "resources": {"rollout_slot": 2, "learner_slot": 2}}  # two runs, not three


def main() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--model", "--data", "--out", "--report"):
        p.add_argument(flag, type=Path, required=True)
    a = p.parse_args()
    assert_loopback_only()
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the ablation's own sqlite store, DIR/mlflow.db
    port = free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--include-dashboard=false", f"--num-cpus={HEAD['num_cpus']}", "--resources=" + json.dumps(HEAD["resources"]),
         f"--temp-dir={os.environ['RAY_TMPDIR']}/ray"],
        env=env, stdout=open(a.out.parent / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    report: dict = {}
    try:
        wait_for_port(port, head, seconds=180)
        short_sft = a.out.parent / "short_sft.yaml"
        short_sft.write_text("sft:\n  steps: 2\n")
        argv = ["ablate", str(REPO / "configs" / "demo_cpu.yaml"), "--arm", f"sft={short_sft}",
                "--arm", f"no_sft={REPO / 'configs' / 'ablations' / 'no_sft.yaml'}", "--seeds", "0",
                "--out", str(a.out), f"model.path={a.model}", f"data.train={a.data}", *MINIATURE]
        t0 = time.monotonic()
        with open(a.out.parent / f"{a.out.name}-driver.log", "w") as log:  # run_scenario shows it on a failure
            done = subprocess.run([sys.executable, "-m", "sari_ray.cli", *argv], cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                                  timeout=1000)
        report.update(ablate_rc=done.returncode, ablate_s=time.monotonic() - t0)
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        import ray
        from ray._private.state import jobs

        ray.init(address=f"127.0.0.1:{port}", logging_level="ERROR", log_to_driver=False)
        report["jobs"] = jobs()
        ray.shutdown()
    finally:
        stop(head)
        a.report.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
