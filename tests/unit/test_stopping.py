"""Stopping: the job stop window a run sees, its one warning, and when a checkpoint is due (by steps and by
wall time)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from sari_ray import trainer_state
from sari_ray.config import load_config
from sari_ray.stopping import StopWindow, job_stop_window_s

pytestmark = pytest.mark.unit
DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml"
JOB = {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}


def test_the_stop_window_is_rays_default_in_a_job_unless_the_runtime_env_sets_it():
    assert job_stop_window_s({}) is None  # not a submitted job: Ctrl-C, nothing kills us on a clock
    assert job_stop_window_s(JOB) == 3.0
    assert job_stop_window_s({**JOB, "RAY_JOB_STOP_WAIT_TIME_S": "600"}) == 600.0


def _window(environ):
    out = io.StringIO()
    return StopWindow(Console(file=out, width=400), 600, environ), out


def test_a_too_short_stop_window_warns_once_with_the_fix():
    window, out = _window(JOB)
    window.check(0.0, 2.0)  # 2 s checkpoint + shutdown > Ray's 3 s
    window.check(5.0, 2.0)
    text = out.getvalue()
    assert text.count("warning") == 1 and "RAY_JOB_STOP_WAIT_TIME_S" in text and "--runtime-env-json" in text
    assert '"RAY_JOB_STOP_WAIT_TIME_S": "600"' in text and "checkpoint.every_minutes" in text


@pytest.mark.parametrize("environ", [{}, {**JOB, "RAY_JOB_STOP_WAIT_TIME_S": "600"}])
def test_no_warning_outside_a_job_or_with_a_window_that_fits(environ):
    window, out = _window(environ)
    window.check(30.0, 60.0)
    assert out.getvalue() == ""


def test_a_window_that_fits_at_start_can_still_warn_once_a_step_is_measured():
    window, out = _window({**JOB, "RAY_JOB_STOP_WAIT_TIME_S": "60"})
    window.check(0.0, 1.0)
    assert out.getvalue() == ""
    window.check(50.0, 10.0)  # a 50 s step: 75 s needed
    assert "about 75 s" in out.getvalue()


def test_a_checkpoint_is_due_by_steps_at_the_end_and_by_wall_time(monkeypatch):
    import time

    cfg = load_config(DEMO, ["checkpoint.every=10", "grpo.steps=25", "checkpoint.every_minutes=2"])
    now = time.monotonic()
    assert trainer_state.checkpoint_due(cfg, 10, now) and trainer_state.checkpoint_due(cfg, 25, now)
    assert not trainer_state.checkpoint_due(cfg, 11, now)
    assert trainer_state.checkpoint_due(cfg, 11, now - 121)  # two minutes since the last one
    off = load_config(DEMO, ["checkpoint.every=10", "grpo.steps=25"])
    assert not trainer_state.checkpoint_due(off, 11, now - 10**6)


def test_the_stop_handler_takes_sigterm_back_from_whoever_took_it_after_it():
    """Ray's core worker installs its own SIGTERM handler at ray.init (after ours): reclaim() puts ours back."""
    import signal

    from sari_ray.stopping import StopOnSignal

    with StopOnSignal() as stop:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what a later handler install does
        stop.reclaim()
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested == "SIGTERM"
