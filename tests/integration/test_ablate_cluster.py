"""`sari-ray ablate` on a Ray cluster with token auth (ablate_cluster_scenario.py, in a private network namespace on
127.0.0.1): 2 arms x 1 seed of the demo miniature on a head offering exactly two runs' resources. Checks that
ablate saw room for two, that the two runs were two Ray jobs whose drivers overlapped in time (the head's job
table), that both MLflow runs are nested under the ablation's run, each run's console.log, and ablation.json.
No process is left in the namespace afterwards."""
from __future__ import annotations

import json

import pytest

from tests.integration.multinode import run_scenario, why_no_namespace

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(why_no_namespace() is not None, reason=str(why_no_namespace()))]


def test_two_runs_train_at_once_as_two_ray_jobs_nested_under_the_ablation(tmp_path, tiny_qwen2_audio):
    from mlflow.tracking import MlflowClient

    from sari_ray.data.synth import synthesize

    data = synthesize(tmp_path / "pitch", n=40, seed=0, tiers=1)  # as test_ablate_miniature
    report = run_scenario("tests.integration.ablate_cluster_scenario", tmp_path, tiny_qwen2_audio, data)
    out, log = tmp_path / "run", (tmp_path / "run-driver.log").read_text()
    assert report["ablate_rc"] == 0 and report["left"] == [], log[-3000:]
    assert "the cluster holds 2 of the 2 run(s) to train at once" in log and "running 2 at once" in log, log

    drivers = [j for j in report["jobs"] if "run.name=" in j["Entrypoint"]]  # the two train drivers, not ablate's query
    assert len(drivers) == 2 and len({j["JobID"] for j in drivers}) == 2, report["jobs"]
    assert max(j["StartTime"] for j in drivers) < min(j["EndTime"] for j in drivers), drivers  # they overlapped
    overlap_s = (min(j["EndTime"] for j in drivers) - max(j["StartTime"] for j in drivers)) / 1000

    summary = json.loads((out / "ablation.json").read_text())
    assert list(summary["arms"]) == ["sft", "no_sft"] and summary["failed"] == []
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent_id = json.loads((out / "ablation_plan.json").read_text())["parent_run_id"]
    for run in summary["runs"]:
        child = client.get_run(run["mlflow_run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent_id and child.info.status == "FINISHED"
        console = (out / "runs" / run["arm"] / "seed0" / "console.log").read_text()
        assert f"MLflow run {run['mlflow_run_id']}" in console, console[-2000:]  # the run's own output
    assert client.get_run(parent_id).info.status == "FINISHED"
    print(f"2 runs at once on the cluster: ablate {report['ablate_s']:.0f} s, the drivers overlapped {overlap_s:.0f} s")
