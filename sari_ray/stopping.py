"""How a run stops when asked: a signal (Ctrl-C, `ray job stop`, a pod's SIGTERM) lets the step in flight finish,
the driver checkpoints and exits; the MLflow run is marked KILLED (FAILED on an error).

`ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s unless the job's runtime
environment sets it): a window shorter than a step and a checkpoint loses every step since the last checkpoint.
The rendered manifests and the documented submit command set it (cluster.stop_grace_s); a run under a job whose
window is too short says so once (`StopWindow`).
"""
from __future__ import annotations

import os
import sys
from typing import Any

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in a submitted job's driver
STOP_WAIT_ENV, RAY_DEFAULT_STOP_WAIT_S = "RAY_JOB_STOP_WAIT_TIME_S", 3.0
SHUTDOWN_S = 15.0  # marking the MLflow run and stopping the engines after the checkpoint


class Interrupted(Exception):
    """The run stopped on SIGINT / SIGTERM after checkpointing; the message says how to resume."""


class StopOnSignal:
    """First SIGINT / SIGTERM (Ctrl-C, `ray job stop`, a pod eviction): ask the loop to stop after the step in
    flight (it checkpoints, shuts the actors down and exits 130). A second one: stop at once."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, _frame) -> None:
        import signal

        if self.requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now")
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing the step in flight, then checkpoint and stop "
              f"(again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnSignal":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def reclaim(self) -> None:
        """Take the signals back after `ray.init`: Ray's core worker installs a fatal-signal handler for SIGTERM in
        the driver that prints a stack and kills the process (what `ray job stop` sends), so without this a stop
        dies mid-step instead of checkpointing."""
        import signal

        for sig in self._previous:
            signal.signal(sig, self._handle)


def mark_failed(tracker, err: BaseException | None, status: str = "FAILED") -> None:
    """Mark the MLflow run FAILED (KILLED when interrupted) if the store lets us; a store that fails too (e.g.
    the same full disk) gets a warning, never the place of the error that stopped the run."""
    try:
        tracker.finish(status)
    except Exception as store_err:  # noqa: BLE001 - the run's own error is the one to report
        print(f"warning: could not mark MLflow run {tracker.run_id} {status} ({type(store_err).__name__}: "
              f"{store_err}); the run stopped because of: {type(err).__name__}: {err}", file=sys.stderr)


def stop_if_asked(trainer) -> None:
    """After a finished step: on SIGINT / SIGTERM, checkpoint it (unless just done) and stop."""
    from sari_ray import checkpoints

    if not trainer.stop.requested:
        return
    s = trainer.state
    where = f"SFT step {s['sft_step']}" if s["phase"] == "sft" else f"GRPO step {s['step']}"
    if checkpoints.latest_checkpoint(trainer.out) != checkpoints.checkpoint_dir(trainer.out, s):
        trainer.save_checkpoint()
    raise Interrupted(f"interrupted ({trainer.stop.requested}) at {where}; checkpoint written. "
                      f"Resume with run.resume=true")


def job_stop_window_s(environ=os.environ) -> float | None:
    """Seconds `ray job stop` leaves this driver between SIGTERM and SIGKILL; None when it is not a submitted job."""
    if RAY_JOB_ENV not in environ:
        return None
    return float(environ.get(STOP_WAIT_ENV, RAY_DEFAULT_STOP_WAIT_S))


class StopWindow:
    """Warns once when a stop of this job would SIGKILL the driver before it finishes a step and a checkpoint:
    at start against the checkpoint's estimated write time, then against the measured step and checkpoint."""

    def __init__(self, console, grace_s: float, environ=os.environ):
        self.console, self.grace_s, self.window = console, grace_s, job_stop_window_s(environ)
        self.warned = False

    def announce(self) -> None:
        if self.window is not None:
            self.console.print(f"a Ray job: `ray job stop` leaves {self.window:.0f} s ({STOP_WAIT_ENV}) to finish the "
                               f"step and checkpoint", soft_wrap=True)

    def check(self, step_s: float, checkpoint_s: float) -> None:
        need = step_s + checkpoint_s + SHUTDOWN_S
        if self.window is None or self.warned or self.window >= need:
            return
        self.warned = True
        self.console.print(
            f"[yellow]warning: `ray job stop` gives this job {self.window:.0f} s ({STOP_WAIT_ENV}) between SIGTERM and "
            f"SIGKILL, but finishing a step and writing a checkpoint take about {need:.0f} s here: a stop would lose "
            f"every step since the last checkpoint. Submit with --runtime-env-json "
            f"'{{\"env_vars\": {{\"{STOP_WAIT_ENV}\": \"{max(self.grace_s, need * 2):.0f}\"}}}}' (the manifests from "
            f"`sari-ray deploy kuberay` set it from cluster.stop_grace_s), or set checkpoint.every_minutes", soft_wrap=True)
