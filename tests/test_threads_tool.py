"""load_tests/threads.py: it finds the worker processes' busy threads in the kernel's scheduler statistics, and its
medians keep only the intervals in which a process had work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from load_tests.threads import ThreadShare, medians, sample

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")


def test_a_busy_worker_thread_is_found_and_an_idle_one_is_not():
    # A stand-in whose command line matches the workers' ("stream.cli worker"): one thread spins, one sleeps.
    code = (
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\nwhile True: pass"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, "stream.cli", "worker"])
    try:
        intervals = sample(seconds=2.5, interval=0.5)
    finally:
        proc.kill()
        proc.wait()
    ours = [r for rows in intervals for r in rows if r.pid == proc.pid]
    assert ours, "the spinning thread was not seen on a CPU"
    assert {r.tid for r in ours} == {proc.pid}  # the main thread spins; the sleeping thread never counts as busy
    assert all(0.02 <= r.on_cpu <= 1.05 and r.waiting_for_cpu >= 0 for r in ours)


def test_medians_keep_the_intervals_in_which_the_process_was_busy():
    def share(tid: int, cpu: float) -> ThreadShare:
        return ThreadShare(7, tid, "t", cpu, 0.1, 10.0, 1.0)

    intervals = [[share(7, 0.9), share(8, 0.1)], [share(7, 0.8), share(8, 0.3)], [share(7, 0.04), share(8, 0.03)]]
    got = {row["tid"]: row for row in medians(intervals)}
    assert got[7]["intervals"] == 2 and got[7]["on_cpu"] == pytest.approx(0.85)
    assert got[8]["intervals"] == 2 and got[8]["on_cpu"] == pytest.approx(0.2)
