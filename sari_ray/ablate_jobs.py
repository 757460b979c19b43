"""`sari-ray ablate` on a Ray cluster: the runs as concurrent Ray jobs, as many at once as the cluster holds.

Each run is its own driver process, `python -m sari_ray.train CONFIG OVERLAY... key=value...` (what
`sari-ray train` runs) attached to the cluster through RAY_ADDRESS, so each is a Ray job with its own job id,
its console in DIR/runs/ARM/seedS/console.log. Why processes and not Ray's JobSubmissionClient: a process
needs only the address every run already attaches to (the GCS address, RAY_ADDRESS; the job API wants the
dashboard's HTTP address and a working directory the head can reach); its console is a local file; and a stop
reaches it as the one SIGTERM it handles by checkpointing (`sari_ray/stopping.py`), with no
RAY_JOB_STOP_WAIT_TIME_S killing it 3 s later. The token (RAY_AUTH_TOKEN or ~/.ray/auth_token) goes with the
environment.

How many at once: the cluster's total resources, asked once, against what one run's actors ask for (learners
plus the rollout pool at its rollout.max_workers: a pool that grows takes room another run would need); arms
whose runs ask for different amounts are counted at the largest. `--max-concurrent` caps it.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CONSOLE_LOG = "console.log"  # a run's driver output, in its run directory
POLL_S = 1.0  # how often the runs in flight are looked at
KILL_AFTER_S = 60.0  # after a second stop signal: how long the runs get to stop at once before SIGKILL


# ------------------------------------------------------------------------------------------ how many fit
def run_need(cfg) -> dict[str, float]:
    """What one run's actors ask the cluster for, its rollout pool at rollout.max_workers."""
    from sari_ray.config import actor_resources, rollout_pool_bounds

    return actor_resources(cfg, rollout_workers=rollout_pool_bounds(cfg)[1])


def largest_need(needs: list[dict[str, float]]) -> dict[str, float]:
    """Per resource, the most any run asks for."""
    largest: dict[str, float] = {}
    for need in needs:
        for name, amount in need.items():
            largest[name] = max(largest.get(name, 0.0), amount)
    return largest


def runs_at_once(need: dict[str, float], offered: dict[str, float], most: int) -> int:
    """How many runs that each ask for `need` the cluster's totals `offered` hold at once (at most `most`): the
    fewest over the resources a run asks for."""
    fits = [math.floor(offered.get(name, 0.0) / amount + 1e-9) for name, amount in need.items() if amount > 0]
    return min([most, *fits])


def cluster_totals(cfg, address: str, need: dict[str, float], say=print) -> dict[str, float]:
    """The cluster's total resources, once it offers at least `need` (one run): the training driver's own wait
    and error (`wiring.wait_for_resources`: within cluster.resource_wait_s, naming what is lacking)."""
    import ray

    from sari_ray.actors import wiring

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        wiring.wait_for_resources(cfg, say=say, need=need)
        return dict(ray.cluster_resources())
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------------- the runs
def launch_train(run, address: str) -> subprocess.Popen:
    """`python -m sari_ray.train` for `run` in its own session (a terminal's Ctrl-C reaches only ablate, which
    passes one SIGTERM on), attached to the cluster at `address`, its output appended to its console.log."""
    run.dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    with open(run.dir / CONSOLE_LOG, "a") as log:
        return subprocess.Popen([sys.executable, "-m", "sari_ray.train", *run.configs, *run.overrides], env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def failure_reason(run, code: int) -> str:
    """`exit N: <the run's last error line>` (else its last line) from its console.log."""
    try:
        lines = [line.strip() for line in (run.dir / CONSOLE_LOG).read_text(errors="replace").splitlines()]
    except OSError:
        lines = []
    errors = [line for line in lines if line.startswith("error:")] or [line for line in lines if line]
    return f"exit {code}: {errors[-1] if errors else '(no output)'}; see {run.dir / CONSOLE_LOG}"


@dataclass
class InFlight:
    label: str
    run: Any  # ablate_cli.RunSpec
    proc: Any  # subprocess.Popen, or a test's fake: poll(), terminate(), kill()
    t0: float


def run_concurrently(pending: list[tuple[str, Any]], launch: Callable[[Any], Any], at_once: int, stop,
                     poll_s: float | None = None) -> list[dict[str, Any]]:
    """Start the `(label, run)`s in order, at most `at_once` in flight, the next as soon as one ends; a run that
    fails is reported and the others go on (returns the failures, as `train_all` does). A stop (`stop.requested`
    set by StopOnSignal) passes SIGTERM to every run in flight, waits for them to checkpoint and exit (as long as
    that takes), and raises Interrupted; a second stop (KeyboardInterrupt) passes SIGTERM again, which stops them
    at once, and kills what is left after KILL_AFTER_S."""
    from sari_ray.stopping import Interrupted

    poll_s = POLL_S if poll_s is None else poll_s
    todo, running, failed = list(pending), [], []
    try:
        while todo or running:
            if stop.requested:
                print(f"ablate: {stop.requested}: stopping {len(running)} run(s) in flight (each checkpoints the "
                      f"step it is on); again to stop them at once", file=sys.stderr, flush=True)
                _signal_all(running)
                _wait_all(running, failed)
                raise Interrupted(f"ablation stopped ({stop.requested}); {len(todo)} run(s) not started")
            while todo and len(running) < at_once:
                label, run = todo.pop(0)
                verb = "resuming" if "run.resume=true" in run.overrides else "training"
                print(f"{label}: {verb} as a Ray job into {run.dir} (its output: {run.dir / CONSOLE_LOG})", flush=True)
                running.append(InFlight(label, run, launch(run), time.monotonic()))
            _collect_ended(running, failed)
            time.sleep(poll_s)
    except BaseException:  # a second signal (KeyboardInterrupt), or a bug here: no run is left behind
        _signal_all(running)  # a run's second SIGTERM: it stops at once
        _wait_all(running, failed, kill_after_s=KILL_AFTER_S)
        raise
    return failed


def _collect_ended(running: list[InFlight], failed: list[dict], stopping: bool = False) -> None:
    """Each run that has exited: said, and a failure recorded (exit 130 is one only when the ablation is not
    stopping: something else stopped that run)."""
    for job in list(running):
        code = job.proc.poll()
        if code is None:
            continue
        running.remove(job)
        seconds = time.monotonic() - job.t0
        if code == 0:
            print(f"{job.label}: done in {seconds:.0f} s", flush=True)
        elif code == 130 and stopping:
            print(f"{job.label}: stopped after {seconds:.0f} s (checkpointed; a rerun resumes it)", file=sys.stderr)
        else:
            reason = failure_reason(job.run, code)
            print(f"{job.label}: FAILED after {seconds:.0f} s: {reason}", file=sys.stderr, flush=True)
            failed.append({"arm": job.run.arm, "seed": job.run.seed, "dir": str(job.run.dir), "error": reason})


def _signal_all(running: list[InFlight]) -> None:
    for job in running:
        if job.proc.poll() is None:
            job.proc.terminate()


def _wait_all(running: list[InFlight], failed: list[dict], kill_after_s: float | None = None) -> None:
    """Until every run in flight has exited, each reported; those left after `kill_after_s` are SIGKILLed."""
    deadline = None if kill_after_s is None else time.monotonic() + kill_after_s
    while running:
        _collect_ended(running, failed, stopping=True)
        if running and deadline is not None and time.monotonic() >= deadline:
            for job in running:
                print(f"{job.label}: killed", file=sys.stderr)
                job.proc.kill()
            return
        time.sleep(0.2)


def runs_the_cluster_holds(cfgs: list, address: str, max_concurrent: int | None) -> int:
    """How many of the runs to train (`cfgs`: their configs) go at once on the cluster at `address`: as many as its
    totals hold, at most `max_concurrent`. Said in one line."""
    need = largest_need([run_need(cfg) for cfg in cfgs])
    offered = cluster_totals(cfgs[0], address, need)
    fit = runs_at_once(need, offered, len(cfgs))
    at_once = min(fit, max_concurrent or fit)
    shown = ", ".join(f"{k} {offered.get(k, 0.0):g} (a run: {v:g})" for k, v in sorted(need.items()))
    print(f"ablate: the cluster holds {fit} of the {len(cfgs)} run(s) to train at once ({shown}); running {at_once} "
          f"at once" + (" (--max-concurrent)" if at_once < fit else ""), flush=True)
    return at_once


def train_on_cluster(pending: list[tuple[str, Any]], address: str, at_once: int,
                     launch: Callable[[Any, str], Any] | None = None) -> list[dict[str, Any]]:
    """The pending `(label, run)`s as Ray jobs on the cluster at `address`, `at_once` at a time, stopped together
    on SIGINT / SIGTERM. `launch(run, address)`: starts one (default `launch_train`)."""
    from sari_ray.stopping import StopOnSignal

    launch = launch or launch_train
    with StopOnSignal() as stop:
        return run_concurrently(pending, lambda run: launch(run, address), at_once, stop)
