"""A local Ray cluster as `sari-ray train` starts it (`ray_init_kwargs`) listens on loopback only.

A child process loads the demo config, calls `ray.init(**ray_init_kwargs(cfg))` and starts one actor (so a
core worker's server exists too); the test then lists the TCP listening sockets of that process and all of
its descendants (GCS, raylet, workers, dashboard / runtime-env agents, the metrics servers) and of any process
that runs from the cluster's session directory. None may listen on a non-loopback address (0.0.0.0, [::], the
machine's IP). About 15 s.
"""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, os, sys
import ray
from sari_ray.config import load_config
from sari_ray.actors.wiring import ray_init_kwargs

cfg = load_config(sys.argv[1], ["cluster.num_cpus=4"])
kwargs = ray_init_kwargs(cfg)
assert kwargs["address"] == "local", kwargs
ray.init(**kwargs, _temp_dir=sys.argv[2])

@ray.remote(num_cpus=0)
class Probe:
    def pid(self):
        return os.getpid()

actor_pid = ray.get(Probe.remote().pid.remote())
session = ray._private.worker.global_worker.node.get_session_dir_path()
print(json.dumps({"actor_pid": actor_pid, "session": session, "kwargs": {k: str(v) for k, v in kwargs.items()}}),
      flush=True)
sys.stdin.read()  # until the test has looked
ray.shutdown()
"""


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _cluster_pids(root_pid: int, session: str) -> set[int]:
    import psutil

    pids = {root_pid} | {p.pid for p in psutil.Process(root_pid).children(recursive=True)}
    for proc in psutil.process_iter(["pid", "cmdline"]):  # anything reparented away from the driver
        try:
            if any(session in arg for arg in proc.info["cmdline"] or []):
                pids.add(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


def test_local_cluster_listens_on_loopback_only():
    import psutil

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    with tempfile.TemporaryDirectory(prefix="rb-", dir="/tmp") as temp_dir:  # short: Ray's socket paths
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(REPO / "configs" / "demo_cpu.yaml"), temp_dir],
                                cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            assert line, f"the child exited with {proc.wait(timeout=30)} before the cluster was up"
            info = json.loads(line)
            pids = _cluster_pids(proc.pid, info["session"])
            assert info["actor_pid"] in pids
            listening = []
            for conn in psutil.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
                    try:
                        name = psutil.Process(conn.pid).name()
                    except psutil.NoSuchProcess:
                        name = "?"
                    listening.append((conn.laddr.ip, conn.laddr.port, conn.pid, name))
        finally:
            proc.communicate(input="", timeout=60)
    names = {name for *_, name in listening}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), listening  # saw Ray
    exposed = [entry for entry in listening if not _loopback(entry[0])]
    assert exposed == [], f"Ray processes listening beyond loopback (ip, port, pid, name): {exposed}"
