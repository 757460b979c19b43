"""A real multi-node Ray cluster on one machine, for tests that lose or add nodes.

`ray.cluster_utils.Cluster` runs each node as its own raylet and object store. Outside a network namespace its
nodes bind the machine's routable address, which tests must never use; inside a fresh one (`unshare -n` as
root, then `ip link set lo up`) loopback is the only interface and every node binds 127.0.0.1. So there are two
sides:

- the test (pytest, in the host's namespace) runs a script in a fresh network namespace (`NamespacedScript`),
  and afterwards checks that no process is left in that namespace: every process of the cluster and of the run
  started in it, so "nothing left" needs no list of names or pids;
- the script, inside, refuses to start unless loopback is its only interface (`assert_loopback_only`), starts
  the cluster (`start_cluster`, `add_node`) and the training driver attached to it through RAY_ADDRESS
  (`start_driver`), and shuts every node down at the end (`shutdown`).

Ray's files go to a private directory (RAY_TMPDIR, short: socket paths must stay under 108 bytes), not to the
machine's shared /tmp/ray. The filesystem is shared with the host; only the network is private.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NODE_OBJECT_STORE_BYTES = 256 * 2**20  # per node; the tiny model's weight buckets are a few MB


# ---------------------------------------------------------------- the test's side (host namespace)
def why_no_namespace() -> str | None:
    """Why a fresh network namespace cannot be made here (not root, no unshare / ip), or None."""
    if os.geteuid() != 0:
        return "making a network namespace (unshare -n) needs root"
    missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (util-linux / iproute2)"
    tried = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    return f"unshare -n fails here: {tried.stderr.strip()[:200]}" if tried.returncode else None


def netns_of(pid: int | str) -> str | None:
    """The network namespace of a process (`net:[4026531840]`), None if it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def namespace_processes(netns: str) -> list[int]:
    """Pids of every live process in the network namespace `netns`."""
    return [int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and netns_of(e.name) == netns and not _zombie(e.name)]


def _zombie(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


class NamespacedScript:
    """`python -m MODULE ARGS` in a fresh network namespace with only loopback up, from the repository root,
    its output in `log`. The namespace is known once unshare has run; `kill_all` ends whatever is left in it."""

    def __init__(self, module: str, args: list[str], log: Path):
        self.log = log
        self.ray_tmp = tempfile.mkdtemp(prefix="ray-ns-", dir="/tmp")  # removed by `left_after`
        self.proc = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, "-m", module, *args],
            cwd=REPO, env={**os.environ, "RAY_TMPDIR": self.ray_tmp}, stdout=open(log, "w"),
            stderr=subprocess.STDOUT, start_new_session=True)
        host = netns_of("self")
        deadline = time.monotonic() + 30
        while (ns := netns_of(self.proc.pid)) == host and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ns and ns != host, f"no fresh network namespace for {module}: {log.read_text()[-2000:]}"
        self.netns = ns

    def wait(self, seconds: float) -> int:
        """Exit code within `seconds`; past them, everything in the namespace is killed and the test fails."""
        try:
            return self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            self.kill_all()
            shutil.rmtree(self.ray_tmp, ignore_errors=True)
            raise AssertionError(f"still running after {seconds:.0f} s; its log ends:\n{self.log.read_text()[-3000:]}")

    def left_after(self, seconds: float = 30.0) -> list[str]:
        """Processes still in the namespace `seconds` after the script exited (name per pid), [] once none is."""
        deadline = time.monotonic() + seconds
        while (pids := namespace_processes(self.netns)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [f"{pid} {_name(pid)}" for pid in pids]
        self.kill_all()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return left

    def kill_all(self) -> None:
        for pid in namespace_processes(self.netns):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_scenario(module: str, tmp_path: Path, model: Path, data: Path, *flags: str) -> dict:
    """`python -m MODULE` (a scenario script) in a fresh network namespace, with the run under tmp_path/run; its
    JSON report, with the seconds it took and what was left in the namespace 30 s after it."""
    import json

    t0 = time.monotonic()
    script = NamespacedScript(module, ["--model", str(model), "--data", str(data), "--out", str(tmp_path / "run"),
                                       "--report", str(tmp_path / "report.json"), *flags], tmp_path / "script.log")
    rc = script.wait(1200)
    left = script.left_after(30)
    driver_log = tmp_path / "run-driver.log"
    assert rc == 0, ((tmp_path / "script.log").read_text()[-3000:] + "\n--- driver:\n"
                     + (driver_log.read_text()[-3000:] if driver_log.exists() else "(not started)"))
    report = json.loads((tmp_path / "report.json").read_text())
    report["left"], report["seconds"] = left, time.monotonic() - t0
    print({k: v for k, v in report.items() if k != "log_tail"})
    return report


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()[:80]
    except OSError:
        return "?"


# ---------------------------------------------------------------- the script's side (inside the namespace)
def assert_loopback_only() -> None:
    """Refuse to start Ray anywhere but in a namespace whose only interface is loopback (then every node binds
    127.0.0.1, and nothing is reachable from outside)."""
    names = [name for _, name in socket.if_nameindex()]
    if names != ["lo"]:
        raise SystemExit(f"not in a fresh network namespace (interfaces {names}): run this through "
                         f"tests.integration.multinode.NamespacedScript")


def start_cluster():
    """A head node with no resources for actors (no CPU, no custom resources) and no dashboard; add nodes with
    `add_node`. Ray's files under $RAY_TMPDIR/ray (NamespacedScript's private directory)."""
    from ray.cluster_utils import Cluster

    temp_dir = Path(os.environ["RAY_TMPDIR"]) / "ray"
    temp_dir.mkdir(exist_ok=True)
    return Cluster(initialize_head=True, shutdown_at_exit=True,
                   head_node_args={"num_cpus": 0, "temp_dir": str(temp_dir), "include_dashboard": False})


def add_node(cluster, num_cpus: int, resources: dict[str, float]):
    """A worker node (its own raylet and object store) offering `num_cpus` logical CPUs and `resources`."""
    return cluster.add_node(num_cpus=num_cpus, resources=resources, object_store_memory=NODE_OBJECT_STORE_BYTES)


def _raylet_children(node):
    """(process title, pid) of every process the node's raylet started."""
    import psutil

    for info in node.all_processes.get("raylet", []):
        try:
            children = psutil.Process(info.process.pid).children(recursive=True)
        except psutil.Error:
            continue
        for child in children:
            try:
                yield (child.cmdline() or [""])[0], child.pid
            except psutil.Error:
                continue


def node_processes(node) -> dict[str, list[int]]:
    """Actor processes running on a node (`ray::ClassName` -> pids): what its raylet started."""
    found: dict[str, list[int]] = {}
    for name, pid in _raylet_children(node):
        if name.startswith("ray::") and not name.startswith(("ray::IDLE", "ray::DashboardAgent",
                                                              "ray::RuntimeEnvAgent")):
            found.setdefault(name.split()[0].split(".")[0], []).append(pid)
    return found


def constructed(node, class_name: str) -> bool:
    """Whether an actor of `class_name` on the node has finished its constructor: Ray titles its process
    `ray::Class.__init__` while the constructor runs, `ray::Class` (or `ray::Class.method`) after."""
    return any(title.startswith(f"ray::{class_name}") and not title.startswith(f"ray::{class_name}.__init__")
               for title, _ in _raylet_children(node))


def start_driver(address: str, args: list[str], log: Path) -> subprocess.Popen:
    """`python -m sari_ray.train ARGS` attached to the cluster through RAY_ADDRESS, in its own process group.
    MLFLOW_TRACKING_URI is unset: with no tracking.tracking_uri the run logs to sqlite in its output directory
    (a host's MLflow server is not reachable from the namespace)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.Popen([sys.executable, "-m", "sari_ray.train", *args], cwd=REPO,
                            env={**env, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_until(predicate, seconds: float, what: str, driver: subprocess.Popen | None = None) -> float:
    """Poll `predicate` until true; returns when (time.monotonic()). Fails if `seconds` pass or the driver
    exits first."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if driver is not None and driver.poll() is not None:
            raise RuntimeError(f"the driver exited ({driver.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {seconds:.0f} s")
        time.sleep(0.2)
    return time.monotonic()


def stop_driver(driver: subprocess.Popen) -> None:
    if driver.poll() is None:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)


def shutdown(cluster) -> None:
    """Every node, the head last (`Cluster.shutdown` leaves the head to an exit hook)."""
    cluster.shutdown()
    if cluster.head_node is not None:
        cluster.remove_node(cluster.head_node, allow_graceful=False)


def write_report(path: Path, report: dict, log: Path, out: Path, histories: dict[str, str]) -> None:
    """The scenario's report as JSON: what it measured, the driver log's tail, and what the run's own MLflow
    store holds (sqlite in its output directory): run ids and statuses, the GRPO steps with a reward/mean, and
    for each name in `histories` that metric's (step, value) history."""
    import json

    from mlflow.tracking import MlflowClient

    from sari_ray.engines.tracking import default_tracking_uri

    report["log_tail"] = log.read_text()[-6000:]
    client = MlflowClient(default_tracking_uri(out))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    report["mlflow_run_ids"] = [r.info.run_id for r in runs]
    report["mlflow_status"] = [r.info.status for r in runs]
    if len(runs) == 1:
        run_id = runs[0].info.run_id

        def history(key: str) -> list[tuple[int, float]]:
            return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

        report["reward_steps"] = [step for step, _ in history("reward/mean")]
        report.update({name: history(key) for name, key in histories.items()})
    path.write_text(json.dumps(report, indent=1))
