"""The local cluster `sari-ray train` starts: ray.init arguments that keep every Ray process on 127.0.0.1 and
give the node whole resource amounts. (What the processes really bind: tests/integration/test_bind_addresses.py.)"""
from pathlib import Path

import pytest

from sari_ray.config import load_config
from sari_ray.actors.wiring import ray_init_kwargs

pytestmark = pytest.mark.unit
DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml"


@pytest.fixture
def ray_constants(monkeypatch):
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # restored after the test
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return ray_constants


def test_local_cluster_binds_loopback(ray_constants):
    kwargs = ray_init_kwargs(load_config(DEMO))
    assert kwargs["address"] == "local" and kwargs["include_dashboard"] is False
    assert kwargs["_node_ip_address"] == kwargs["dashboard_host"] == "127.0.0.1"
    assert ray_constants.ENABLE_RAY_CLUSTER is False  # else ray.init swaps 127.0.0.1 for the routable address
    from ray._private.services import resolve_ip_for_localhost

    assert resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"


def test_local_node_gets_whole_amounts_covering_fractional_actors(ray_constants):
    cfg = load_config(DEMO, ["cluster.num_cpus=null", "rollout.num_cpus_per_worker=0.5",
                             "learner.num_cpus_per_worker=0.6", "rollout.resources.rollout_slot=0.5"])
    kwargs = ray_init_kwargs(cfg)
    assert kwargs["num_cpus"] == 2  # 0.5 + 2 x 0.6 = 1.7 (Ray refuses a node with 1.7 CPUs)
    assert kwargs["resources"] == {"rollout_slot": 1.0, "learner_slot": 2.0}


def test_a_named_cluster_is_attached_to_unchanged(ray_constants, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert ray_init_kwargs(load_config(DEMO)) == {"address": "http://127.0.0.1:8265", "log_to_driver": True}
    assert ray_constants.ENABLE_RAY_CLUSTER is True  # attaching changes nothing in Ray


def test_the_reaper_kills_the_clusters_processes_once_the_driver_is_gone(tmp_path):
    """A stand-in driver marks a child as its cluster's, starts the reaper and exits (as SIGKILL would leave
    it: nothing cleaned up); the reaper kills the marked child, and an unmarked one lives on."""
    import os
    import subprocess
    import sys
    import time

    from sari_ray.deploy import local_ray

    driver = f"""
import os, subprocess, sys
from sari_ray.deploy.local_ray import CLUSTER_MARK
quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
marked = subprocess.Popen(["sleep", "300"], env={{**os.environ, CLUSTER_MARK: str(os.getpid())}}, **quiet)
plain = subprocess.Popen(["sleep", "300"], **quiet)
reaper = subprocess.Popen([sys.executable, "-m", "sari_ray.deploy.local_ray", "reap", str(os.getpid())],
                          start_new_session=True, **quiet)
print(marked.pid, plain.pid, reaper.pid, os.getpid(), flush=True)
"""
    out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=60, check=True)
    marked, plain, reaper, driver_pid = map(int, out.stdout.split())
    try:
        deadline = time.monotonic() + 30
        while local_ray.marked_processes(driver_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert local_ray.marked_processes(driver_pid) == []
        assert os.path.exists(f"/proc/{plain}")  # not the cluster's: left alone
    finally:
        for pid in (marked, plain, reaper):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
