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
"""
from __future__ import annotations

import math
from typing import Any

LOOPBACK = "127.0.0.1"


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
