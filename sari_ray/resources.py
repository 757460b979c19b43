"""Memory of a process tree, for benchmarks: the proportional set size (PSS) of a process and all its
descendants, and its peak over a stretch of work, sampled by a background thread.

PSS, not RSS: the tree's processes share torch's and vLLM's libraries (and Ray's object store pages); RSS counts
a shared page once per process, PSS splits it between them, so the sum over the tree is what the tree costs.

    with PeakPSS() as peak:          # this process and its descendants (a local Ray cluster's too)
        run_the_thing()
    print(peak.peak_bytes / 2**30, "GiB")
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterable


def tree_pss_bytes(root_pids: int | Iterable[int] | None = None) -> int:
    """PSS summed over the processes `root_pids` (default: this one) and all their descendants, each counted
    once. Processes that exit or deny access while being read are skipped (a tree changes as it is read)."""
    import psutil

    roots = [os.getpid()] if root_pids is None else [root_pids] if isinstance(root_pids, int) else list(root_pids)
    seen: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            proc = psutil.Process(pid)
            seen[proc.pid] = proc
            seen.update({child.pid: child for child in proc.children(recursive=True)})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    total = 0
    for proc in seen.values():
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


class PeakPSS:
    """Peak PSS of a process tree while it runs: `start()` ... `stop()` (returns the peak in bytes), or a `with`
    block. One sample every `interval_s` seconds (reading a process's smaps costs ~1 ms per 100 MB mapped),
    plus one at start and one at stop; a spike shorter than the interval can be missed."""

    def __init__(self, root_pids: int | Iterable[int] | None = None, interval_s: float = 0.25):
        self.root_pids = root_pids
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        pss = tree_pss_bytes(self.root_pids)
        self.peak_bytes = max(self.peak_bytes, pss)
        self.samples += 1
        return pss

    def start(self) -> PeakPSS:
        if self._thread is not None:
            raise RuntimeError("PeakPSS already started")
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="peak-pss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()
        return self.peak_bytes

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakPSS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
