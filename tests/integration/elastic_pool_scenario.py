"""Inside a fresh network namespace (tests.integration.multinode.NamespacedScript): a Ray cluster laid out like
KubeRay's groups (a head with no actor resources, a learner node offering learner_slot: 2, rollout nodes
offering rollout_slot: 1 each) and a training run attached to it through RAY_ADDRESS, whose rollout pool is
elastic (rollout.min_workers=1, rollout.max_workers=2). Writes a JSON report (--report) for test_elastic_pool.py.

- grow-and-shrink: one rollout node at the start; a second joins after GRPO step 2; once the pool has used the
  second worker for a step, that node is lost (`remove_node(allow_graceful=False)`: its raylet and every process
  on it killed, as kill -9 of the raylet or a pod removed by KubeRay). The run goes on with one worker.
- lose-only: the only rollout node is lost after GRPO step 3 and none comes back.

    python -m tests.integration.elastic_pool_scenario --model M --data D --out DIR --report R.json \
        [--lose-only] [--resource-wait S] [key=value ...]
"""
from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from tests.integration.conftest import short_run_overrides
from tests.integration.multinode import (REPO, add_node, assert_loopback_only, constructed, node_processes,
                                         shutdown, start_cluster, start_driver, stop_driver, wait_until,
                                         write_report)

LEARNER_NODE = {"num_cpus": 2, "resources": {"learner_slot": 2}}
ROLLOUT_NODE = {"num_cpus": 1, "resources": {"rollout_slot": 1}}
STEPS = 16  # ~1 s each; the driver waits for the joiner's engine (paused) and for a lost node to be noticed


def elastic_run_overrides(out: Path, data: Path, model: Path) -> list[str]:
    """The run both the elastic and the fixed-pool reference make (only the pool's bounds differ)."""
    return [*short_run_overrides(out, data, model), f"grpo.steps={STEPS}", "checkpoint.every=4",
            "sft.checkpoint_every=0", "tracking.completions_table_every=1"]


def main() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--model", "--data", "--out", "--report"):
        p.add_argument(flag, type=Path, required=True)
    p.add_argument("--lose-only", action="store_true", help="lose the only rollout node; none comes back")
    p.add_argument("--resource-wait", type=float, default=120.0, help="cluster.resource_wait_s")
    p.add_argument("overrides", nargs="*", help="more key=value for the run (learner.sync_backend=collective)")
    a = p.parse_args()
    assert_loopback_only()
    a.out.mkdir(parents=True)
    log = a.out.parent / f"{a.out.name}-driver.log"
    batches = a.out / "batches.jsonl"
    report: dict = {}
    t0 = time.monotonic()
    cluster = start_cluster()
    try:
        add_node(cluster, **LEARNER_NODE)
        first = add_node(cluster, **ROLLOUT_NODE)
        report["cluster_start_s"] = time.monotonic() - t0
        driver = start_driver(cluster.address, [
            str(REPO / "configs" / "demo_cpu.yaml"), *elastic_run_overrides(a.out, a.data, a.model),
            "rollout.num_workers=1", "rollout.min_workers=1", f"rollout.max_workers={1 if a.lose_only else 2}",
            f"cluster.resource_wait_s={a.resource_wait}", *a.overrides], log)

        def steps_done() -> int:
            return batches.read_text().count("\n") if batches.exists() else 0

        try:
            if a.lose_only:
                wait_until(lambda: steps_done() >= 3, 900, "GRPO step 3", driver)
                t_loss = time.monotonic()
                cluster.remove_node(first, allow_graceful=False)
            else:
                wait_until(lambda: steps_done() >= 2, 900, "GRPO step 2", driver)
                t_added = time.monotonic()
                second = add_node(cluster, **ROLLOUT_NODE)
                wait_until(lambda: "rollout worker 1 starting" in log.read_text(), 300, "rollout worker 1 starting",
                           driver)
                # the driver is paused while the joiner's engine starts (the run's steps take ~1 s, an engine
                # start ~15-40 s on 2 shared cores): the join then comes at a known point of the run, not at
                # whatever step the start happened to take
                os.kill(driver.pid, signal.SIGSTOP)
                try:
                    report["engine_start_s"] = wait_until(lambda: constructed(second, "RolloutWorker"), 300,
                                                          "the joiner's engine up") - t_added
                finally:
                    os.kill(driver.pid, signal.SIGCONT)
                joined = wait_until(lambda: "rollout worker 1 joined" in log.read_text(), 300,
                                    "rollout worker 1 joining", driver)
                report["node_added_to_join_line_s"] = joined - t_added
                report["joined_at_step"] = steps_done() + 1
                report["on_second_node"] = node_processes(second)
                wait_until(lambda: steps_done() >= report["joined_at_step"] + 1, 300,
                           "a step with two workers", driver)
                report["lost_after_step"] = steps_done()
                t_loss = time.monotonic()
                cluster.remove_node(second, allow_graceful=False)
                left = wait_until(lambda: "rollout worker 1 left" in log.read_text(), 300,
                                  "rollout worker 1 leaving", driver)
                report["loss_to_leave_line_s"] = left - t_loss
                after = steps_done()
                going_on = wait_until(lambda: steps_done() > after, 300, "a step after the loss", driver)
                report["loss_to_next_step_s"] = going_on - t_loss
            driver.wait(900)
            report["loss_to_exit_s"] = time.monotonic() - t_loss
        finally:
            stop_driver(driver)
        report["exit_code"] = driver.returncode
    finally:
        shutdown(cluster)
    write_report(a.report, report, log, a.out, {
        "workers": "rollout/workers", "node_losses": "faults/rollout_node_losses", "join_s": "rollout/join_s",
        "completions_per_s": "throughput/completions_per_s"})


if __name__ == "__main__":
    main()
