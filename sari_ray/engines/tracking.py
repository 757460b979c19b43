"""MLflow tracking for one training run; only the driver uses it.

Default store: a sqlite file under the run directory (so `mlflow ui --backend-store-uri sqlite:///...` shows
it); a server via config or MLFLOW_TRACKING_URI. Resume re-opens the same run id, so one training run is one
MLflow run however often it is restarted.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def default_tracking_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class Tracker:
    def __init__(self, tracking_uri: str | None, experiment: str, output_dir: str | Path,
                 run_name: str, run_id: str | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(output_dir)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        artifact_root = None
        if self.tracking_uri.startswith("sqlite:"):
            artifact_root = (Path(output_dir).resolve() / "mlartifacts").as_uri()
        self.client = MlflowClient(self.tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=artifact_root)
        if run_id is None:
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self._mlflow = mlflow

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i: i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i: i + 500])

    def log_dict(self, data: Any, name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        """A table of sample completions (MLflow's table artifact: shows in the UI's evaluation view)."""
        columns = {key: [row.get(key) for row in rows] for key in (rows[0] if rows else {})}
        self.client.log_table(self.run_id, data=columns, artifact_file=name)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

