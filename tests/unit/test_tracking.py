"""Tracker's outage handling against a fake MLflow client: queue in order, warn once per outage, back off,
flush when the store is back, spill to the pending file past the bound, replay it on the next start.
(The real server is stopped and restarted in tests/integration/test_tracking_outage.py.)"""
from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from sari_ray.engines.tracking import PENDING_FILE, Tracker, backoff_seconds, is_outage


class FakeClient:
    """Records what reached the 'store'; `down` makes every call fail like an unreachable server."""

    def __init__(self):
        self.down = False
        self.calls: list[tuple] = []
        self.metrics: list[tuple[str, float, int]] = []
        self.params: dict[str, str] = {}
        self.attempts = 0

    def _call(self, *record):
        self.attempts += 1
        if self.down:
            raise MlflowException("API request to http://127.0.0.1:1/api failed with exception "
                                  "ConnectionError(Max retries exceeded)")
        self.calls.append(record)

    def get_experiment_by_name(self, name):
        self._call("get_experiment", name)
        return SimpleNamespace(experiment_id="1")

    def create_run(self, experiment_id, run_name):
        self._call("create_run", run_name)
        return SimpleNamespace(info=SimpleNamespace(run_id="run-1"))

    def update_run(self, run_id, status):
        self._call("update_run", status)

    def get_run(self, run_id):
        self._call("get_run")
        return SimpleNamespace(data=SimpleNamespace(params=dict(self.params)))

    def log_batch(self, run_id, metrics=(), params=()):
        for m in metrics:
            if m.key == "bad":
                raise MlflowException("bad metric", error_code=INVALID_PARAMETER_VALUE)
        self._call("log_batch")
        self.metrics += [(m.key, m.value, m.step) for m in metrics]
        self.params.update({p.key: p.value for p in params})

    def log_dict(self, run_id, data, name):
        self._call("log_dict", name)

    def log_text(self, run_id, text, name):
        self._call("log_text", name)

    def log_table(self, run_id, data, artifact_file):
        self._call("log_table", artifact_file)

    def log_artifact(self, run_id, local_path):
        self._call("log_artifact", local_path)

    def set_terminated(self, run_id, status):
        self._call("set_terminated", status)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def make(tmp_path, client=None, **kwargs):
    client = client or FakeClient()
    clock, err = Clock(), io.StringIO()
    tracker = Tracker("http://fake", "exp", tmp_path, "run", client=client, clock=clock, sleep=clock.sleep,
                      stderr=err, **kwargs)
    return tracker, client, clock, err


def test_outage_errors_are_told_from_bad_requests():
    import requests

    assert is_outage(MlflowException("API request failed with exception ConnectionError"))  # INTERNAL_ERROR
    assert is_outage(requests.exceptions.ConnectionError("refused"))
    assert is_outage(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "503"}))
    assert not is_outage(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
    assert not is_outage(ValueError("x"))
    assert [backoff_seconds(n) for n in (1, 2, 3, 6, 10)] == [1, 2, 4, 30, 30]


def test_outage_queues_in_order_warns_once_backs_off_and_flushes(tmp_path):
    tracker, client, clock, err = make(tmp_path)
    tracker.log_metrics({"a": 0.0}, 0)
    client.down = True
    tracker.log_metrics({"a": 1.0}, 1)  # fails: outage starts, next try in 1 s
    attempts = client.attempts
    tracker.log_params({"p": 1})
    tracker.log_dict({"x": 1}, "d.json")
    assert client.attempts == attempts, "no request while backing off: the loop never waits on the store"
    clock.now = 1.5
    tracker.log_metrics({"a": 2.0}, 2)  # retried, fails again: next wait 2 s
    assert client.attempts == attempts + 1
    clock.now = 2.0
    tracker.log_metrics({"a": 3.0}, 3)
    assert client.attempts == attempts + 1
    assert err.getvalue().count("unreachable") == 1, err.getvalue()
    client.down = False
    clock.now = 4.0
    tracker.log_metrics({"a": 4.0}, 4)
    assert tracker.queued == 0
    assert client.metrics == [("a", float(i), i) for i in range(5)]
    assert client.params == {"p": "1"}
    kinds = [c[0] for c in client.calls if c[0] != "get_run"]
    assert kinds.index("log_dict") < len(kinds) - 2, "artifact sent in its place between step 1 and step 2"
    assert "reachable again" in err.getvalue()
    # a second outage warns again
    client.down = True
    tracker.log_metrics({"a": 5.0}, 5)
    assert err.getvalue().count("unreachable (") == 2


def test_bad_value_still_raises_when_the_store_is_up(tmp_path):
    tracker, client, _, _ = make(tmp_path)
    with pytest.raises(MlflowException, match="bad metric"):
        tracker.log_metrics({"bad": 1.0}, 0)
    assert tracker.queued == 0


def test_long_outage_spills_to_the_pending_file_and_a_new_tracker_replays_it(tmp_path):
    tracker, client, clock, err = make(tmp_path, max_outage_s=10)
    client.down = True
    for step in range(3):
        clock.now = step * 6.0  # 0, 6, 12 s: the third call is past the bound
        tracker.log_metrics({"a": float(step)}, step)
    pending = tmp_path / PENDING_FILE
    assert pending.exists() and "tracking.max_outage_s" in err.getvalue() and str(pending) in err.getvalue()
    assert [json.loads(line)["args"][0][0][3] for line in pending.read_text().splitlines()] == [0, 1, 2]
    tracker.log_metrics({"a": 3.0}, 3)  # appended while spilled
    assert len(pending.read_text().splitlines()) == 4
    # the process dies here; a resumed run (same run id) sends the file first
    client.down = False
    again = Tracker("http://fake", "exp", tmp_path, "run", run_id="run-1", client=client, clock=clock,
                    sleep=clock.sleep, stderr=io.StringIO())
    again.log_metrics({"a": 4.0}, 4)
    assert client.metrics == [("a", float(i), i) for i in range(5)]
    assert not pending.exists()


def test_finish_waits_then_keeps_what_it_could_not_send(tmp_path):
    tracker, client, clock, err = make(tmp_path, max_outage_s=100)
    client.down = True
    tracker.log_metrics({"a": 1.0}, 1)
    tracker.finish("FINISHED", wait_s=20)
    assert clock.now >= 20 and tracker.queued == 2
    lines = (tmp_path / PENDING_FILE).read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["metrics", "terminated"]
    assert "python -m sari_ray.engines.tracking" in err.getvalue()


def test_finish_flushes_when_the_store_comes_back_during_the_wait(tmp_path):
    tracker, client, clock, _ = make(tmp_path)
    client.down = True
    tracker.log_metrics({"a": 1.0}, 1)
    real_sleep = clock.sleep

    def sleep_then_recover(seconds):
        real_sleep(seconds)
        client.down = clock.now < 3

    tracker._sleep = sleep_then_recover
    tracker.finish("FINISHED", wait_s=30)
    assert tracker.queued == 0 and client.calls[-1] == ("set_terminated", "FINISHED")
    assert client.metrics == [("a", 1.0, 1)] and not (tmp_path / PENDING_FILE).exists()


def test_unreachable_at_start_is_a_clear_error_after_retries(tmp_path):
    client = FakeClient()
    client.down = True
    with pytest.raises(ConnectionError, match="tracking.tracking_uri"):
        make(tmp_path, client=client, connect_retry_s=5)
    assert client.attempts >= 2


def test_an_artifact_queued_through_an_outage_is_sent_once_the_store_is_back(tmp_path):
    tracker, client, clock, _ = make(tmp_path)
    client.down = True
    tracker.log_artifact(tmp_path / "report.png")
    assert ("log_artifact", str(tmp_path / "report.png")) not in client.calls and tracker.queued == 1
    client.down, clock.now = False, 5.0
    tracker.finish()
    assert client.calls[-2:] == [("log_artifact", str(tmp_path / "report.png")), ("set_terminated", "FINISHED")]
