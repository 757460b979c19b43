"""The elastic rollout pool on a real multi-node Ray cluster (tests/integration/multinode.py: every node its own
raylet and object store, in a private network namespace on 127.0.0.1; elastic_pool_scenario.py drives it).

- A second rollout node joins after GRPO step 2 and is lost (its raylet killed) once the pool has used it: the
  pool reads 1, then 2, then 1 worker, the run finishes with every step in one MLflow run, and its batches,
  completions and final weights are bit for bit those of a fixed one-worker run (a prompt's seeds follow its
  place in the batch, not its worker). With both weight-sync backends.
- The only rollout node is lost with rollout.min_workers=1: an `error:` naming what the cluster lacks within
  cluster.resource_wait_s, the last complete checkpoint kept.

No process of a run is left in its namespace afterwards.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.elastic_pool_scenario import STEPS, elastic_run_overrides
from tests.integration.multinode import REPO, run_scenario, why_no_namespace

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(why_no_namespace() is not None, reason=str(why_no_namespace()))]


@pytest.fixture(scope="module")
def fixed_pool_run(tmp_path_factory, tiny_qwen2_audio, synth_data) -> Path:
    """The same run with a fixed one-worker pool, on a local single-node cluster."""
    out = tmp_path_factory.mktemp("fixed-pool") / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    done = subprocess.run([sys.executable, "-m", "sari_ray.train", str(REPO / "configs" / "demo_cpu.yaml"),
                           *elastic_run_overrides(out, synth_data, tiny_qwen2_audio), "rollout.num_workers=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def run_elastic(tmp_path, model, data, *flags: str) -> dict:
    return run_scenario("tests.integration.elastic_pool_scenario", tmp_path, model, data, *flags)


def runs_of(values: list[tuple[int, float]]) -> list[float]:
    """A metric's values with repeats collapsed: [1, 1, 2, 2, 1] -> [1, 2, 1]."""
    out: list[float] = []
    for _, value in values:
        if not out or out[-1] != value:
            out.append(value)
    return out


def completions_by_step(run: Path) -> dict[str, str]:
    """The per-step completions tables the run logged to MLflow (tracking.completions_table_every=1)."""
    return {path.name: path.read_text() for path in run.glob("mlartifacts/**/completions/step_*.json")}


def assert_same_as_fixed_pool(run: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    assert (run / "batches.jsonl").read_text() == (reference / "batches.jsonl").read_text()
    tables = completions_by_step(run)
    assert len(tables) == STEPS and tables == completions_by_step(reference)
    final = f"checkpoints/step_{STEPS:06d}/model/model.safetensors"
    a, b = load_file(reference / final), load_file(run / final)
    assert a.keys() == b.keys()
    different = [name for name in a if not a[name].equal(b[name])]
    assert not different, f"final weights differ from the fixed-pool run's in {different[:5]}"


@pytest.mark.parametrize("backend", ["object_store", "collective"])
def test_the_pool_grows_when_a_node_joins_and_shrinks_when_it_is_lost(backend, fixed_pool_run, tmp_path,
                                                                       tiny_qwen2_audio, synth_data):
    r = run_elastic(tmp_path, tiny_qwen2_audio, synth_data, f"learner.sync_backend={backend}")
    text = (tmp_path / "run-driver.log").read_text()
    assert r["exit_code"] == 0, r["log_tail"]
    assert runs_of(r["workers"]) == [1, 2, 1], r["workers"]
    assert [value for _, value in r["node_losses"]][-1] == 1
    assert len(r["on_second_node"].get("ray::RolloutWorker", [])) == 1  # the joiner ran on the new node
    assert len(r["join_s"]) == 1 and r["join_s"][0][1] > 0
    assert "rollout worker 1 joined after" in text and "rollout worker 1 left: its node" in text
    assert r["reward_steps"] == list(range(1, STEPS + 1))  # every step once: no step replayed
    assert len(r["mlflow_run_ids"]) == 1 and r["mlflow_status"] == ["FINISHED"]
    assert r["left"] == [], r["left"]
    assert_same_as_fixed_pool(tmp_path / "run", fixed_pool_run)
    print(f"{backend}: node added -> joiner's engine up {r['engine_start_s']:.0f} s (driver paused meanwhile), "
          f"-> join line {r['node_added_to_join_line_s']:.0f} s; join_s (asked for -> first completions) "
          f"{r['join_s'][0][1]:.1f} s; node lost -> leave line {r['loss_to_leave_line_s']:.0f} s, "
          f"-> next step done {r['loss_to_next_step_s']:.0f} s; test {r['seconds']:.0f} s")


def test_losing_the_only_rollout_node_is_an_error_naming_what_is_missing(tmp_path, tiny_qwen2_audio, synth_data):
    from sari_ray.checkpoints import latest_checkpoint

    r = run_elastic(tmp_path, tiny_qwen2_audio, synth_data, "--lose-only", "--resource-wait", "20")
    text = (tmp_path / "run-driver.log").read_text()
    error = [line for line in text.splitlines() if line.startswith("error: ")]
    assert r["exit_code"] == 2, r["log_tail"]
    assert len(error) == 1 and "below rollout.min_workers=1" in error[0], text[-3000:]
    assert "no room for another within 20 s (cluster.resource_wait_s)" in error[0], error[0]
    assert "rollout_slot: needs 1 per worker, free 0" in error[0], error[0]
    assert "Traceback" not in text
    assert latest_checkpoint(tmp_path / "run").name == "step_000000"  # the SFT checkpoint; GRPO's first is at 4
    assert r["loss_to_exit_s"] < 20 + 60, r["loss_to_exit_s"]  # the window, the loss noticed, the shutdown
    assert r["mlflow_status"] == ["FAILED"]
    assert r["left"] == [], r["left"]
    print(f"only rollout node lost -> error: {r['loss_to_exit_s']:.0f} s; test {r['seconds']:.0f} s")
