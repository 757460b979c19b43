"""A real MLflow server goes away in the middle of a run and comes back on the same port with the same store:
the Tracker keeps accepting metrics, warns once, and every metric, param and artifact arrives in order."""
from __future__ import annotations

import io
import subprocess
import time

import pytest

from tests.integration.conftest import BIN, free_port, stop, wait_for_port

pytestmark = pytest.mark.integration


def start_server(root, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_port(port, proc)
    return proc


def test_metrics_logged_during_an_outage_arrive_in_order(tmp_path):
    from mlflow.tracking import MlflowClient

    from sari_ray.engines.tracking import PENDING_FILE, Tracker

    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(root, port)
    err = io.StringIO()
    try:
        tracker = Tracker(uri, "outage", tmp_path / "run", "outage", request_timeout_s=2, stderr=err)
        tracker.log_params({"lr": 0.1})
        step = 0
        for step in range(3):
            tracker.log_metrics({"loss": 10.0 - step}, step)
        stop(server)
        t_down = time.monotonic()
        for step in range(3, 8):  # the server is down: queued, never raised, never waits on the store
            tracker.log_metrics({"loss": 10.0 - step}, step)
        tracker.log_dict({"during": "outage"}, "outage.json")
        assert time.monotonic() - t_down < 10, "logging during an outage must not block the loop"
        assert tracker.queued >= 6 and err.getvalue().count("unreachable (") == 1, err.getvalue()
        server = start_server(root, port)
        step += 1
        tracker.log_metrics({"loss": 10.0 - step}, step)  # still inside the backoff window, or the first flush
        tracker.finish()  # waits out the backoff (no longer than 60 s) and sends the queue in order
        assert tracker.queued == 0, err.getvalue()
        assert "reachable again" in err.getvalue()
        assert not (tmp_path / "run" / PENDING_FILE).exists()

        client = MlflowClient(uri)
        run = client.get_run(tracker.run_id)
        history = client.get_metric_history(tracker.run_id, "loss")
        assert [m.step for m in history] == list(range(step + 1))
        assert [m.value for m in history] == [10.0 - s for s in range(step + 1)]
        assert [m.timestamp for m in history] == sorted(m.timestamp for m in history)
        assert run.data.params == {"lr": "0.1"} and run.info.status == "FINISHED"
        assert "outage.json" in [a.path for a in client.list_artifacts(tracker.run_id)]
    finally:
        stop(server)
