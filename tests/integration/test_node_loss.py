"""A learner node lost mid-run on a real 3-node Ray cluster (tests/integration/multinode.py: every node its own
raylet and object store, in a private network namespace on 127.0.0.1), as when KubeRay replaces a learner pod:
the learner node's raylet and every process on it are killed after GRPO step 3 (checkpoints at steps 0 and 2).

- It comes back: the driver waits for learner_slot, starts a new learner group on the new node, goes back to
  step_000002 and finishes all 6 steps in the same MLflow run.
- It never does: the driver stops within cluster.resource_wait_s with an `error:` line (no traceback) naming
  `learner_slot: needs 2, offers 0`; the last complete checkpoint stays.

No process of either run is left in the namespace afterwards. 75-130 s each on 2 cores (measured).
"""
from __future__ import annotations

import pytest

from tests.integration.multinode import run_scenario, why_no_namespace

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(why_no_namespace() is not None, reason=str(why_no_namespace()))]


def lose_the_learner_node(tmp_path, model, data, *flags: str) -> dict:
    return run_scenario("tests.integration.node_loss_scenario", tmp_path, model, data, *flags)


def test_a_lost_learner_node_that_comes_back_and_the_run_goes_on(tmp_path, tiny_qwen2_audio, synth_data):
    r = lose_the_learner_node(tmp_path, tiny_qwen2_audio, synth_data, "--back")
    log = r["log_tail"]
    assert r["exit_code"] == 0, log
    text = (tmp_path / "run-driver.log").read_text()
    assert len(r["on_learner_node"]["ray::LearnerActor"]) == len(r["on_new_learner_node"]["ray::LearnerActor"]) == 2
    assert "restarting the learner group from step_000002 (restart 1 of at most 3)" in text, log
    assert "for the Ray cluster to offer" in text and "learner_slot: needs 2, offers 0" in text, log
    assert len(r["mlflow_run_ids"]) == 1 and r["mlflow_status"] == ["FINISHED"]
    assert sorted(set(r["reward_steps"])) == [1, 2, 3, 4, 5, 6]  # step 3 replayed from step_000002
    assert [value for _, value in r["learner_restarts"]] == [1]
    assert r["left"] == [], r["left"]
    print(f"node loss -> run going on: {r['loss_to_run_going_on_s']:.0f} s (the driver waited for learner_slot "
          f"after {r['loss_to_waiting_s']:.0f} s, the new node joined at {r['loss_to_node_back_s']:.0f} s); "
          f"test {r['seconds']:.0f} s")


def test_a_lost_learner_node_that_never_comes_back_is_an_error_naming_it(tmp_path, tiny_qwen2_audio, synth_data):
    from sari_ray.checkpoints import latest_checkpoint

    r = lose_the_learner_node(tmp_path, tiny_qwen2_audio, synth_data, "--resource-wait", "20")
    text = (tmp_path / "run-driver.log").read_text()
    error = [line for line in text.splitlines() if line.startswith("error: ")]
    assert r["exit_code"] == 2, r["log_tail"]
    assert len(error) == 1 and "learner_slot: needs 2, offers 0" in error[0], text[-3000:]
    assert "no new learner group could start" in error[0] and "after 20 s (cluster.resource_wait_s)" in error[0]
    assert "the last complete checkpoint (step_000002) stays" in error[0] and "Traceback" not in text
    assert latest_checkpoint(tmp_path / "run").name == "step_000002"
    assert r["loss_to_exit_s"] < 20 + 30, r["loss_to_exit_s"]  # the window, the loss noticed, the shutdown
    assert r["mlflow_status"] == ["FAILED"]
    assert r["left"] == [], r["left"]
    print(f"node loss -> error: {r['loss_to_exit_s']:.0f} s; test {r['seconds']:.0f} s")
