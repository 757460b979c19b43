"""How a run stops when asked: a signal (Ctrl-C, `ray job stop`, a pod's SIGTERM) lets the step in flight finish,
the driver checkpoints and exits; the MLflow run is marked KILLED (FAILED on an error)."""
from __future__ import annotations

import sys
from typing import Any


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
