"""load_tests/threads.py: it finds the worker processes' busy threads in the kernel's scheduler statistics, and its
medians keep only the intervals in which a process had work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from load_tests.threads import ThreadShare, medians, sample, worker_pids

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir() or not Path("/proc/self/schedstat").exists(),
    reason="needs Linux's /proc with scheduler statistics",
)

# A stand-in worker: its arguments are a worker's (-m stream.cli worker); its main thread spins, another sleeps.
SPIN = """
import sys, threading, time
threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
print("ready", flush=True)
while True:
    pass
"""


def test_a_busy_worker_thread_is_found_and_an_idle_one_is_not():
    proc = subprocess.Popen(
        [sys.executable, "-c", SPIN, "-m", "stream.cli", "worker"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert proc.pid in worker_pids()
        seen: list[ThreadShare] = []
        for _ in range(20):  # a loaded machine may keep it off the CPU for a while: sample until it has been seen
            seen += [r for rows in sample(seconds=1.2, interval=0.5) for r in rows if r.pid == proc.pid]
            if seen:
                break
    finally:
        proc.kill()
        proc.wait()
    assert seen, "the spinning thread was never seen on a CPU"
    assert {r.tid for r in seen} == {proc.pid}  # the main thread spins; the sleeping thread never counts as busy
    assert {r.name for r in seen} == {"main"}


def test_an_editor_of_the_workers_files_is_not_a_worker():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "load_tests/variants.py", "worker"])
    try:
        assert proc.pid not in worker_pids()
    finally:
        proc.kill()
        proc.wait()


def test_medians_keep_the_intervals_in_which_the_process_was_busy():
    def share(tid: int, cpu: float) -> ThreadShare:
        return ThreadShare(7, tid, "t", cpu, 0.1, 10.0, 1.0)

    intervals = [[share(7, 0.9), share(8, 0.1)], [share(7, 0.8), share(8, 0.3)], [share(7, 0.04), share(8, 0.03)]]
    got = {row["tid"]: row for row in medians(intervals)}
    assert got[7]["intervals"] == 2 and got[7]["on_cpu"] == pytest.approx(0.85)
    assert got[8]["intervals"] == 2 and got[8]["on_cpu"] == pytest.approx(0.2)
