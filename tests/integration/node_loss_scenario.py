"""Inside a fresh network namespace (tests.integration.multinode.NamespacedScript): a 3-node Ray cluster (a head
with no actor resources, a rollout node, a learner node with learner_slot: 2), a short training run attached to
it, and the learner node lost after GRPO step 3 (`remove_node(allow_graceful=False)`: its raylet and every
process on it killed, as when KubeRay replaces a pod). With --back a new learner node joins once the driver says
it waits for learner_slot; without, it never does. Writes a JSON report (--report) for test_node_loss.py.

    python -m tests.integration.node_loss_scenario --model M --data D --out DIR --report R.json [--back]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from tests.integration.conftest import short_run_overrides
from tests.integration.multinode import (REPO, add_node, assert_loopback_only, node_processes, shutdown,
                                         start_cluster, start_driver, stop_driver, wait_until, write_report)

LEARNER_NODE = {"num_cpus": 2, "resources": {"learner_slot": 2}}
ROLLOUT_NODE = {"num_cpus": 2, "resources": {"rollout_slot": 1}}
WAITS_FOR_LEARNER_SLOT = "for the Ray cluster to offer"  # wiring.wait_for_resources, then "learner_slot: ..."


def main() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--model", "--data", "--out", "--report"):
        p.add_argument(flag, type=Path, required=True)
    p.add_argument("--back", action="store_true", help="a new learner node joins after the loss")
    p.add_argument("--loss-after", type=int, default=3, help="GRPO steps done when the node is lost")
    p.add_argument("--resource-wait", type=float, default=120.0, help="cluster.resource_wait_s")
    a = p.parse_args()
    assert_loopback_only()
    a.out.mkdir(parents=True)
    log = a.out.parent / f"{a.out.name}-driver.log"
    report: dict = {}
    t0 = time.monotonic()
    cluster = start_cluster()
    try:
        add_node(cluster, **ROLLOUT_NODE)
        learner_node = add_node(cluster, **LEARNER_NODE)
        report["cluster_start_s"] = time.monotonic() - t0
        driver = start_driver(cluster.address, [
            str(REPO / "configs" / "demo_cpu.yaml"), *short_run_overrides(a.out, a.data, a.model),
            "sft.checkpoint_every=0", "grpo.steps=6", "checkpoint.every=2",
            f"cluster.resource_wait_s={a.resource_wait}"], log)
        try:
            batches = a.out / "batches.jsonl"
            wait_until(lambda: batches.exists() and batches.read_text().count("\n") >= a.loss_after, 900,
                       f"GRPO step {a.loss_after}", driver)
            report["on_learner_node"] = node_processes(learner_node)
            t_loss = time.monotonic()
            report["driver_start_to_loss_s"] = t_loss - t0 - report["cluster_start_s"]
            cluster.remove_node(learner_node, allow_graceful=False)
            if a.back:
                said = wait_until(lambda: WAITS_FOR_LEARNER_SLOT in log.read_text(), 120,
                                  "the driver waiting for learner_slot", driver)
                report["loss_to_waiting_s"] = said - t_loss
                new_node = add_node(cluster, **LEARNER_NODE)
                report["loss_to_node_back_s"] = time.monotonic() - t_loss
                back = wait_until(lambda: "learner group back after" in log.read_text(), 600,
                                  "the learner group back", driver)
                report["loss_to_run_going_on_s"] = back - t_loss
                report["on_new_learner_node"] = node_processes(new_node)
            driver.wait(900)
            report["loss_to_exit_s"] = time.monotonic() - t_loss
        finally:
            stop_driver(driver)
        report["exit_code"] = driver.returncode
    finally:
        shutdown(cluster)
    write_report(a.report, report, log, a.out, {"learner_restarts": "faults/learner_restarts"})


if __name__ == "__main__":
    main()
