"""PeakPSS sees memory held by a child process (the tree, not only this process) and keeps the peak after
the child frees it."""
from __future__ import annotations

import os
import subprocess
import sys

from sari_ray.resources import PeakPSS, tree_pss_bytes

HOLD = 256 * 2**20


def test_peak_pss_counts_a_childs_memory_and_keeps_the_peak():
    base = tree_pss_bytes()
    # the child writes HOLD bytes (pages touched: they count in PSS), says so, and exits when told
    child = subprocess.Popen(
        [sys.executable, "-c", f"b = bytearray({HOLD}); print('ready', flush=True); input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with PeakPSS(interval_s=0.05) as peak:
            assert child.stdout.readline().strip() == "ready"
            held = peak.sample()
            child.stdin.write("\n")
            child.stdin.flush()
            child.wait(30)
        assert held - base > HOLD * 0.9, (held, base)
        assert peak.peak_bytes >= held and peak.samples >= 3
        assert tree_pss_bytes() < held - HOLD * 0.5  # gone from the tree, still in the peak
    finally:
        child.kill()


def test_several_roots_and_vanished_processes():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert tree_pss_bytes([gone.pid]) == 0  # exited: skipped, not an error
    both, alone = tree_pss_bytes([gone.pid, os.getpid()]), tree_pss_bytes()
    assert alone > 0 and abs(both - alone) < 0.05 * alone
