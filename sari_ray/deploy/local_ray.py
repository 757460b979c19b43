"""A local Ray cluster on the loopback interface: what `sari-ray train` starts when no cluster is named.

"Services bind to 127.0.0.1 unless configured" holds for a local cluster only if Ray's node address is
127.0.0.1: GCS, raylet, core workers (actors), the dashboard agent, the runtime-env agent and the metrics
servers listen on loopback exactly when it is, and on every interface (0.0.0.0 / [::]) otherwise.

Ray 2.60 on Linux does not keep a loopback node address. `ray.init(_node_ip_address="127.0.0.1")` (and
`ray start --node-ip-address=127.0.0.1`) go through `services.resolve_ip_for_localhost`, which swaps a loopback
address for the machine's routable one unless Ray believes it runs single-node: the module constant
`ray._private.ray_constants.ENABLE_RAY_CLUSTER`, read from `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` when ray is
imported and False by default only on macOS and Windows. A local cluster *is* single-node, so
`keep_loopback_node_address` says so to Ray in the driver (where ray is already imported, so the environment
variable would come too late). Only the driver needs it: every process the cluster starts gets the node
address on its command line. Checked by tests/integration/test_bind_addresses.py, which lists every listening
socket of a local cluster's processes (and fails without this).

No orphans (`start_local_cluster`). What Ray 2.60 does when the driver that started a local cluster is
SIGKILLed (measured here, tiny model, 2 cores): GCS, raylet, log monitor and autoscaler monitor share the
driver's fate at once (Ray starts them with PR_SET_PDEATHSIG); the actors notice their raylet is gone and exit
within ~5 s, their vLLM EngineCore / Worker processes follow within ~10 s; but the raylet's dashboard agent and
runtime-env agent see it die and then block in a last report to the dead GCS, alive 40 s later. So every
process of a local cluster carries `SARI_RAY_LOCAL_CLUSTER_OF=<driver pid>` in its environment (inherited from
the driver during `ray.init`, passed on by the raylet to workers and by workers to engine processes), and a
small reaper process (`python -m sari_ray.deploy.local_ray reap PID`) waits for the driver to go, however it
goes, then SIGKILLs every process carrying its mark, and the driver's descendants it saw. Tested by tests/integration/test_interrupts.py (SIGKILL of
the driver during GRPO) and test_faults.py (a normal exit).

Run: `python -m sari_ray.deploy.local_ray reap DRIVER_PID` (the driver starts it; not meant to be typed).
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
CLUSTER_MARK = "SARI_RAY_LOCAL_CLUSTER_OF"  # env var: the pid of the driver whose local cluster a process is part of


def keep_loopback_node_address() -> None:
    """Make this process's next `ray.init(_node_ip_address="127.0.0.1")` keep that address (see the module
    docstring). Afterwards this process treats Ray as single-node: it must not go on to attach to a multi-node
    cluster (a training run either attaches or starts a local cluster, never both)."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read by services.get_node_ip_address at each call


def whole(amount: float) -> float:
    """A node's resource amount as Ray wants it (whole numbers; actors may ask for fractions): rounded up."""
    return float(math.ceil(amount - 1e-9))


def local_cluster_kwargs(num_cpus: float, resources: dict[str, float]) -> dict[str, Any]:
    """`ray.init` arguments for a fresh single-node cluster bound to 127.0.0.1, with `num_cpus` logical CPUs and
    the custom `resources` (both rounded up to whole numbers, which Ray requires of a node)."""
    keep_loopback_node_address()
    # "local": always a fresh cluster; None would attach to any cluster recorded on this machine
    return {"address": "local", "num_cpus": int(whole(num_cpus)),
            "resources": {name: whole(amount) for name, amount in resources.items()},
            "_node_ip_address": LOOPBACK, "include_dashboard": False, "dashboard_host": LOOPBACK}


def start_local_cluster(init_kwargs: dict[str, Any]) -> subprocess.Popen:
    """`ray.init(**init_kwargs)` (a local cluster) with every process of the cluster marked as this driver's, and
    the reaper that kills them once this process is gone (SIGKILL included). Returns the reaper."""
    import ray

    os.environ[CLUSTER_MARK] = str(os.getpid())
    try:
        ray.init(**init_kwargs)  # GCS, raylet and agents start now; later workers inherit the raylet's environment
    finally:
        del os.environ[CLUSTER_MARK]  # processes this driver starts itself later are not the cluster's
    return subprocess.Popen([sys.executable, "-m", "sari_ray.deploy.local_ray", "reap", str(os.getpid())],
                            stdin=subprocess.DEVNULL, start_new_session=True)  # Ctrl-C to the driver's group spares it


def marked_processes(driver_pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Pids of live processes whose environment marks them as part of `driver_pid`'s local cluster."""
    mark = f"{CLUSTER_MARK}={driver_pid}".encode()
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return pids


def reap(driver_pid: int, poll_s: float = 0.5, settle_s: float = 2.0, limit_s: float = 25.0) -> int:
    """Wait until `driver_pid` is gone (this process is its child: its parent changes), then SIGKILL every
    process of its local cluster until none has shown up for `settle_s` (or `limit_s` passed). Returns how many
    were killed. Besides the environment mark, the driver's descendants seen while it lived are killed too (a
    second net should a process not carry the mark); psutil tells a pid reused since from the one seen."""
    import psutil

    seen: dict[int, psutil.Process] = {}
    while os.getppid() == driver_pid:
        try:
            seen.update({p.pid: p for p in psutil.Process(driver_pid).children(recursive=True) if p.pid != os.getpid()})
        except psutil.Error:
            pass
        time.sleep(poll_s)
    killed, quiet_since, t0 = 0, time.monotonic(), time.monotonic()
    while time.monotonic() - quiet_since < settle_s and time.monotonic() - t0 < limit_s:
        for proc in list(seen.values()) + [pid for pid in marked_processes(driver_pid) if pid not in seen]:
            try:
                if isinstance(proc, int):
                    os.kill(proc, signal.SIGKILL)
                elif proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    proc.kill()
                else:
                    continue
                killed += 1
                quiet_since = time.monotonic()
            except (ProcessLookupError, psutil.Error):
                pass
        time.sleep(0.2)
    return killed


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "reap":
        sys.exit(__doc__)
    reap(int(sys.argv[2]))
