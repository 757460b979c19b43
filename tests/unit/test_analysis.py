"""Plotting helpers of the analysis notebooks on a small MLflow run logged here (sqlite store, seconds)."""
from __future__ import annotations

import numpy as np
import pytest

from sari_ray import analysis

pytestmark = pytest.mark.unit


def test_promotions_from_artifact_else_from_tier_metric():
    events = [{"step": 7, "from_tier": 0, "to_tier": 1, "accuracies": {"0": 0.8}}]
    assert analysis.promotion_steps(events) == [(7, 1)]
    history = {"curriculum/tier": (np.array([1, 2, 3, 4, 5]), np.array([0.0, 0.0, 1.0, 1.0, 2.0]))}
    assert analysis.promotion_steps([], history) == [(3, 1), (5, 2)]
    assert analysis.promotion_steps([], {}) == []


def test_ema_and_what_is_smoothed():
    x = np.array([0.0, 1.0, 1.0, 1.0])
    assert np.array_equal(analysis.ema(x, 0.0), x)
    assert np.allclose(analysis.ema(x, 0.5), [0.0, 0.5, 0.75, 0.875])
    assert analysis._smoothable("reward/mean") and not analysis._smoothable("curriculum/tier")
    assert not analysis._smoothable("eval/accuracy")


@pytest.fixture
def logged_run(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment, run_name="r").info.run_id
    metrics = [Metric("reward/mean", 0.1 * s, 1000 + s, s) for s in range(1, 6)]
    metrics += [Metric("reward/mean", 9.0, 1, 3)]  # an older value for step 3 (a resumed run re-logs)
    metrics += [Metric("curriculum/tier", float(s > 3), 1000, s) for s in range(1, 6)]
    metrics += [Metric("time/rollout", 2.0, 1000, s) for s in range(1, 6)]
    client.log_batch(run_id, metrics=metrics)
    client.log_dict(run_id, [{"step": 4, "from_tier": 0, "to_tier": 1, "accuracies": {"0": 0.9}}],
                    "curriculum_history.json")
    return uri, run_id


def test_history_dashboard_and_compare(logged_run, tmp_path):
    uri, run_id = logged_run
    history = analysis.load_history(uri, run_id)
    steps, values = history["reward/mean"]
    assert list(steps) == [1, 2, 3, 4, 5] and values[2] == pytest.approx(0.3)  # latest value per step wins
    assert analysis.load_curriculum_history(uri, run_id)[0]["to_tier"] == 1
    figures = analysis.run_dashboard(uri, run_id, tmp_path / "figs")
    for name in analysis.FIGURES:  # metrics not logged give a "not logged" panel, still a figure
        assert (tmp_path / "figs" / f"{name}.png").stat().st_size > 3000
    fig = analysis.compare_runs(uri, [run_id, run_id], ["reward/mean", "policy/kl", "curriculum/tier"], labels=["a", "b"])
    assert len(fig.axes[0].lines) == 2 and not fig.axes[1].lines
    table = analysis.summary_table(uri, [run_id], ["reward/mean"], labels=["a"])
    assert table.loc["a", "reward/mean best step"] == 5
    import matplotlib.pyplot as plt

    plt.close("all")
    assert set(figures) == set(analysis.FIGURES)
