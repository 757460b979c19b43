"""MLflow tracking for one training run; only the driver uses it.

Default store: a sqlite file under the run directory (so `mlflow ui --backend-store-uri sqlite:///...` shows
it); a server via config or MLFLOW_TRACKING_URI. Resume re-opens the same run id, so one training run is one
MLflow run however often it is restarted.

Outages never stop a run: everything logged (metrics, params, artifacts, the final status) goes through one
ordered queue. When the store is unreachable the entry stays queued, a warning goes to stderr once per
outage, and sending is retried with exponential backoff at later calls (the training loop never waits on it).
Once the server is back the queue is sent in order. An outage longer than `max_outage_s` spills the queue to
`<output_dir>/mlflow_pending.jsonl` (the run goes on; a crash then loses nothing); the file is replayed when
the server answers again, by a resumed run, or by `python -m sari_ray.engines.tracking FILE`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

PENDING_FILE = "mlflow_pending.jsonl"
# MLflow error codes that mean "the store is (briefly) unavailable" rather than "what was sent is wrong".
# Network failures reach us as MlflowException("API request to ... failed ...") with INTERNAL_ERROR.
OUTAGE_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED",
                "ABORTED", "SERVICE_UNDER_MAINTENANCE", "WORKSPACE_TEMPORARILY_UNAVAILABLE"}
METRICS_PER_REQUEST = 500  # MLflow's log_batch limit (1000 entries in all)
PARAMS_PER_REQUEST = 100


def default_tracking_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def is_outage(err: BaseException) -> bool:
    """True for errors that mean the store is unreachable or briefly failing (queue and retry); False for
    errors in what was sent (raised to the caller)."""
    try:
        import requests

        if isinstance(err, requests.exceptions.RequestException):
            return True
    except ImportError:  # pragma: no cover - requests comes with mlflow
        pass
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    code = getattr(err, "error_code", None)
    return code in OUTAGE_CODES if code is not None else False


def backoff_seconds(failures: int, base: float = 1.0, cap: float = 30.0) -> float:
    """Wait before the next attempt after `failures` consecutive failed ones: base, 2 base, 4 base ... <= cap."""
    return min(cap, base * 2 ** max(0, failures - 1))


class Tracker:
    """One MLflow run; every call queues one entry and sends what is queued unless the store is in backoff.

    `client` (an MlflowClient-like object) and `clock` are for tests. `request_timeout_s` bounds one HTTP
    request and MLflow's own retries are switched off for our calls (its default, 7 retries with backoff,
    would block the training loop for minutes per call); a user's MLFLOW_HTTP_REQUEST_* settings win.
    """

    def __init__(self, tracking_uri: str | None, experiment: str, output_dir: str | Path,
                 run_name: str, run_id: str | None = None, *, parent_run_id: str | None = None,
                 max_outage_s: float = 120.0,
                 request_timeout_s: float = 10.0, connect_retry_s: float = 15.0, client: Any = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 stderr=None):
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(output_dir)
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.pending_path = self.output_dir / PENDING_FILE
        self.max_outage_s = max_outage_s
        self.request_timeout_s = request_timeout_s
        self._clock, self._sleep, self._stderr = clock, sleep, stderr
        self._queue: deque[dict[str, Any]] = deque()
        self._outage_since: float | None = None
        self._failures = 0
        self._next_try = 0.0
        self._spilled = False
        if client is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(self.tracking_uri)
        self.client = client
        self.run_id = self._with_retries(lambda: self._open_run(experiment, run_name, run_id, parent_run_id),
                                         connect_retry_s,
                                         f"open the MLflow run at {self.tracking_uri}")
        self._load_pending()

    # ------------------------------------------------------------------ public API (what train.py calls)
    def log_params(self, params: dict[str, Any]) -> None:
        self._submit("params", {k: str(v)[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)  # stamped now: a late flush keeps when the value was measured
        rows = [[k, float(v), now, int(step)] for k, v in metrics.items() if v is not None]
        for i in range(0, len(rows), METRICS_PER_REQUEST):  # one entry per request: a retry resends only it
            self._submit("metrics", rows[i: i + METRICS_PER_REQUEST])

    def log_dict(self, data: Any, name: str) -> None:
        self._submit("dict", data, name)

    def log_text(self, text: str, name: str) -> None:
        self._submit("text", text, name)

    def log_artifact(self, path: str | Path) -> None:
        """A file the run wrote (the report picture), copied into the run's artifacts."""
        self._submit("artifact", str(path))

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        """A table of sample completions (MLflow's table artifact: shows in the UI's evaluation view)."""
        columns = {key: [row.get(key) for row in rows] for key in (rows[0] if rows else {})}
        self._submit("table", columns, name)

    def finish(self, status: str = "FINISHED", wait_s: float | None = None) -> None:
        """Mark the run terminated after sending everything queued; waits up to `wait_s` (default
        min(max_outage_s, 60)) for an unreachable store, then leaves the rest in the pending file and warns."""
        self._submit("terminated", status)
        wait_s = min(self.max_outage_s, 60.0) if wait_s is None else wait_s
        deadline = self._clock() + wait_s
        while self._queue and self._clock() < deadline:
            self._sleep(max(0.0, min(self._next_try, deadline) - self._clock()))
            self._drain(force=True)
        if self._queue:
            self._spill(all_entries=True)
            self._warn(f"MLflow at {self.tracking_uri} still unreachable at the end of the run: {len(self._queue)} "
                       f"entries (metrics, params, artifacts, the run's status) are kept in {self.pending_path}; "
                       f"send them with `python -m sari_ray.engines.tracking {self.pending_path}` once it is back")

    @property
    def queued(self) -> int:
        """Entries not yet accepted by the store."""
        return len(self._queue)

    # ------------------------------------------------------------------ queue
    def _submit(self, kind: str, *args: Any) -> None:
        entry = {"run_id": self.run_id, "kind": kind, "args": list(args)}
        self._queue.append(entry)
        if self._spilled:
            self._append_pending([entry])
        elif self._outage_since is not None and self._clock() - self._outage_since > self.max_outage_s:
            self._spill()
        self._drain()

    def _drain(self, force: bool = False) -> None:
        """Send queued entries in order; stop at the first outage error and back off."""
        if self._outage_since is not None and not force and self._clock() < self._next_try:
            return
        sent = 0
        while self._queue:
            entry = self._queue[0]
            try:
                with request_settings(self.request_timeout_s):
                    send_entry(self.client, entry)
            except Exception as err:  # noqa: BLE001 - sorted by is_outage below
                if is_outage(err):
                    self._on_outage(err, sent)
                    return
                self._queue.popleft()
                if self._outage_since is None:
                    raise  # a bad value in the call just made: the caller's error, as before
                self._warn(f"MLflow rejected a queued {entry['kind']} entry after the outage, dropped: "
                           f"{type(err).__name__}: {err}")
                continue
            self._queue.popleft()
            sent += 1
        if self._outage_since is not None:
            down_s = self._clock() - self._outage_since
            self._warn(f"MLflow at {self.tracking_uri} reachable again after {down_s:.0f} s; "
                       "queued entries sent in order")
            self._outage_since, self._failures = None, 0
        if self._spilled or self.pending_path.exists():
            self.pending_path.unlink(missing_ok=True)
            self._spilled = False

    def _on_outage(self, err: BaseException, sent: int) -> None:
        now = self._clock()
        if self._outage_since is None:
            self._outage_since = now
            self._warn(f"MLflow at {self.tracking_uri} unreachable ({type(err).__name__}: {str(err)[:200]}); the run "
                       f"goes on, metrics, params and artifacts are queued and sent in order when it is back (after "
                       f"{self.max_outage_s:.0f} s, tracking.max_outage_s, they are kept in {self.pending_path})")
        self._failures += 1
        self._next_try = now + backoff_seconds(self._failures)
        if self._spilled and sent:
            self._rewrite_pending()  # what was sent before this failure leaves the file

    # ------------------------------------------------------------------ the pending file
    def _spill(self, all_entries: bool = False) -> None:
        if self._spilled:
            return
        if not all_entries:
            self._warn(f"MLflow at {self.tracking_uri} unreachable for more than {self.max_outage_s:.0f} s "
                       f"(tracking.max_outage_s): {len(self._queue)} queued entries and every later one are kept in "
                       f"{self.pending_path} and sent when it is back (also by a resumed run); the run goes on")
        self._spilled = self._rewrite_pending()

    def _rewrite_pending(self) -> bool:
        try:
            tmp = self.pending_path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(e, default=str) + "\n" for e in self._queue))
            os.replace(tmp, self.pending_path)
            return True
        except OSError as err:  # a full disk: keep them in memory
            self._warn(f"could not write {self.pending_path} ({err}); queued MLflow entries stay in memory only")
            return False

    def _append_pending(self, entries: list[dict[str, Any]]) -> None:
        try:
            with open(self.pending_path, "a") as f:
                f.writelines(json.dumps(e, default=str) + "\n" for e in entries)
        except OSError as err:
            self._warn(f"could not append to {self.pending_path} ({err}); queued MLflow entries stay in memory only")

    def _load_pending(self) -> None:
        """A previous process's unsent entries go first (a resumed run after an outage)."""
        if not self.pending_path.exists():
            return
        entries = read_pending(self.pending_path)
        self._queue.extendleft(reversed(entries))
        self._spilled = True
        self._warn(f"sending {len(entries)} MLflow entries left unsent by an earlier outage ({self.pending_path})")
        self._drain()

    # ------------------------------------------------------------------ MLflow calls
    def _open_run(self, experiment: str, run_name: str, run_id: str | None, parent_run_id: str | None) -> str:
        artifact_root = None
        if self.tracking_uri.startswith("sqlite:"):
            artifact_root = (self.output_dir.resolve() / "mlartifacts").as_uri()
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=artifact_root)
        if run_id is None:
            if parent_run_id:  # nested under it in the MLflow UI (sari-ray ablate's parent run)
                return self.client.create_run(experiment_id, run_name=run_name,
                                              tags={"mlflow.parentRunId": parent_run_id}).info.run_id
            return self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _with_retries(self, call: Callable[[], Any], seconds: float, what: str) -> Any:
        """At start a store that does not answer within `seconds` is a setup error (a wrong URI, most often)."""
        deadline = self._clock() + seconds
        failures = 0
        while True:
            try:
                with request_settings(self.request_timeout_s):
                    return call()
            except Exception as err:  # noqa: BLE001
                failures += 1
                if not is_outage(err) or self._clock() + backoff_seconds(failures) > deadline:
                    if is_outage(err):
                        raise ConnectionError(f"could not {what} within {seconds:.0f} s: {err}. Check "
                                              f"tracking.tracking_uri / MLFLOW_TRACKING_URI") from err
                    raise
                self._sleep(backoff_seconds(failures))

    def _warn(self, message: str) -> None:
        print(f"warning: {message}", file=self._stderr or sys.stderr, flush=True)


def send_entry(client: Any, entry: dict[str, Any]) -> None:
    """One queued entry as MLflow client calls."""
    from mlflow.entities import Metric, Param

    run_id, kind, args = entry["run_id"], entry["kind"], entry["args"]
    if kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in args[0]])
    elif kind == "params":
        existing = client.get_run(run_id).data.params  # resume: params are write-once in MLflow
        fresh = [Param(k, v) for k, v in args[0].items() if k not in existing]
        for i in range(0, len(fresh), PARAMS_PER_REQUEST):
            client.log_batch(run_id, params=fresh[i: i + PARAMS_PER_REQUEST])
    elif kind == "dict":
        client.log_dict(run_id, args[0], args[1])
    elif kind == "text":
        client.log_text(run_id, args[0], args[1])
    elif kind == "table":
        client.log_table(run_id, data=args[0], artifact_file=args[1])
    elif kind == "artifact":
        client.log_artifact(run_id, args[0])
    elif kind == "terminated":
        client.set_terminated(run_id, status=args[0])
    else:
        raise ValueError(f"unknown MLflow entry kind {kind!r}")


@contextmanager
def request_settings(timeout_s: float):
    """MLflow's HTTP retries off (the Tracker's backoff replaces them) and a bounded request time, unless the
    user set MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT."""
    defaults = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(timeout_s)))}
    added = [k for k in defaults if k not in os.environ]
    os.environ.update({k: defaults[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def read_pending(path: str | Path) -> list[dict[str, Any]]:
    """Entries of a pending file; a line cut short by a crash mid-write is the last one and is skipped."""
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: {path}:{number}: unreadable line skipped (cut short by a crash?)", file=sys.stderr)
    return entries


def send_pending(path: str | Path, tracking_uri: str) -> int:
    """Send a pending file's entries in order (each names its run); the file is removed once all are sent."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    entries = read_pending(path)
    for entry in entries:
        with request_settings(10.0):
            send_entry(client, entry)
    Path(path).unlink()
    return len(entries)


if __name__ == "__main__":
    # python -m sari_ray.engines.tracking RUN_DIR/mlflow_pending.jsonl [TRACKING_URI]
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m sari_ray.engines.tracking PENDING_FILE [TRACKING_URI (default: MLFLOW_TRACKING_URI, "
                 "else the run directory's sqlite store)]")
    pending = Path(sys.argv[1])
    uri = (sys.argv[2] if len(sys.argv) == 3
           else os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(pending.parent))
    print(f"sent {send_pending(pending, uri)} entries to {uri}")


def start_run_tracking(cfg, output_dir: Path, run_id: str | None) -> Tracker:
    """A training run's MLflow run (a resumed run passes its `run_id` and continues it), with the config as
    parameters and as a file."""
    from omegaconf import OmegaConf

    from sari_ray.config import to_flat_dict

    t = cfg.tracking
    tracker = Tracker(t.tracking_uri, t.experiment, output_dir, cfg.run.name, run_id, parent_run_id=t.parent_run_id,
                      max_outage_s=t.max_outage_s, request_timeout_s=t.request_timeout_s)
    tracker.log_params(to_flat_dict(cfg))
    tracker.log_text(OmegaConf.to_yaml(cfg), "config.yaml")
    return tracker
