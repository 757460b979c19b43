"""The collective weight-sync path (`learner.sync_backend: collective`): one torch.distributed group spanning
learner rank 0 (rank 0, the sender) and every rollout engine's worker processes (ranks 1..N), broadcasting each
bucket as one flat uint8 tensor. No Ray and no vLLM here; the vLLM worker extension and the learner call it.

Why a standalone group (a `TCPStore` plus `ProcessGroupGloo` / `ProcessGroupNCCL` built directly) and not
`init_process_group`: the default group is taken in both processes (DeepSpeed's on the learner, vLLM's on the
engine workers); a group built from its own store needs no default group and collides with neither. vLLM's
weight-transfer API (`init_weight_transfer_engine`) exists in 0.32, but its backends are CUDA-only (so CI could
not run it) and, for one GPU per engine and DeepSpeed ZeRO-3, its `nccl` backend moves the same bytes as this
broadcast (docs/scaling.md weighs the others), so it is not used.

Setup is two-phase: rank 0 opens the store (`open_store`, returns at once with the port), then every rank
joins (`join_group` blocks until all have).

Two deadlines: forming the group (the rendezvous) may take as long as the slowest member takes to arrive, so it
has the setup deadline; every operation after that (one bucket's broadcast) has a short one of its own
(`op_timeout_s`, the run's `learner.sync_timeout_s`). A member that dies mid-broadcast makes its direct peers
fail at once, but the others wait on a sender that is still alive (gloo: rank 0 gets "connection reset", the
members waiting on rank 0 get nothing) until their operation times out: that timeout is how long a broken
broadcast can hold the survivors. Measured here (3 gloo processes, one killed mid-broadcast): the survivor
returned after exactly the operation timeout, and neither `abort()` nor releasing the group on rank 0 woke it.
A group formed again replaces the old one: `release_group` aborts and drops it first.
"""
from __future__ import annotations

import datetime
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from sari_ray.engines.weight_buckets import LayoutEntry, layout_nbytes, pack_bucket, unpack_bucket

if TYPE_CHECKING:
    import torch

LOOPBACK = ("127.0.0.1", "localhost")
_PREFIX = "sari_weight_sync"


def open_store(host: str, world_size: int, timeout_s: float):
    """Rank 0: the rendezvous store on a free port of `host` (bound to 127.0.0.1 only when host is loopback:
    torch's TCPStore binds every interface unless handed a bound socket). Returns (store, port, socket). The
    store takes the socket's descriptor over and closes it when the store goes (measured: torch 2.13), so the
    socket returned is detached: dropping it closes nothing (before, it closed the same descriptor number a
    second time, which by then may be another file's)."""
    import torch.distributed as dist

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1" if host in LOOPBACK else "", 0))
        listener.listen()
        port = listener.getsockname()[1]
        store = dist.TCPStore(host, port, world_size, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    listener.detach()
    return store, port, listener


def join_group(host: str, port: int, rank: int, world_size: int, *, backend: str, timeout_s: float,
               op_timeout_s: float | None = None, store=None):
    """This process's handle on the sync group (blocks until all `world_size` ranks joined, within `timeout_s`).
    Rank 0 passes the store from `open_store`; the others connect to host:port. backend: gloo (CPU tensors) or
    nccl (CUDA). Each operation on the group then times out after `op_timeout_s` (default: `timeout_s`)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    group = _new_group(host, port, rank, world_size, backend, timeout, store)
    if op_timeout_s is not None:  # gloo builds its connections under the group's timeout: set this one after
        set_timeout = getattr(group, "_set_default_timeout", None) or group.set_timeout
        set_timeout(datetime.timedelta(seconds=op_timeout_s))
    return group


def release_group(group) -> None:
    """Drop a sync group this process holds: abort it where the backend offers `abort()` (NCCL frees its
    communicator; gloo stops its work), then let it go. Never raises: the group may be broken already."""
    abort = getattr(group, "abort", None)
    if abort is not None:
        try:
            abort()
        except Exception:  # noqa: BLE001 - a half-dead group may refuse; it is dropped either way
            pass


def _new_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout: datetime.timedelta, store):
    import torch.distributed as dist

    if store is None:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    prefixed = dist.PrefixStore(f"{_PREFIX}/{port}", store)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        device = (dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if host in LOOPBACK
                  else dist.ProcessGroupGloo.create_default_device())
        options._devices = [device]
        return dist.ProcessGroupGloo(prefixed, rank, world_size, options)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    raise ValueError(f"weight-sync backend must be gloo or nccl, got {backend!r}")


def backend_for(device: "str | torch.device") -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def broadcast_from_rank0(group, buffer: "torch.Tensor") -> None:
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([buffer], options).wait()


def send_buckets(group, buckets: Iterable[Mapping[str, "torch.Tensor"]], plan: list[list[LayoutEntry]],
                 device: "str | torch.device" = "cpu") -> int:
    """Rank 0: broadcast each bucket as laid out in `plan` (what the receivers were told). Returns bytes sent."""
    sent = 0
    for layout, bucket in zip(plan, buckets, strict=True):
        buffer = pack_bucket(bucket, layout, device)
        broadcast_from_rank0(group, buffer)
        sent += buffer.numel()
    return sent


def receive_buckets(group, plan: list[list[LayoutEntry]], device: "str | torch.device" = "cpu",
                    on_bucket: "Callable[[int], None] | None" = None) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Ranks 1..N: (name, tensor) per tensor, one bucket at a time (a fresh buffer per bucket: a loader may keep
    views until its layer is complete, and peak memory stays about one bucket). `on_bucket(i)` runs as bucket i
    has arrived, before its tensors are handed on."""
    import torch

    for index, layout in enumerate(plan):
        buffer = torch.empty(layout_nbytes(layout), dtype=torch.uint8, device=device)
        broadcast_from_rank0(group, buffer)
        if on_bucket is not None:
            on_bucket(index)
        yield from unpack_bucket(buffer, layout).items()
        del buffer
