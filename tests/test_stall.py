"""The stall watch (stream/app.py StallWatch) on a real frozen process: a child that is SIGSTOPped for longer than
the watch's limit exits with code 70 as soon as it is resumed, from the watchdog thread, while its main thread
does nothing; a child left alone keeps running. (The whole scenario, a paused worker on a real broker, is the
pause segment of tests/test_chaos.py.)"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import os, sys, time
from stream.app import StallWatch
watch = StallWatch(float(sys.argv[1]), lambda seconds: os._exit(70), period_s=0.05)
assert not watch.check()  # not started: no watchdog, never stalled
watch.start()
print("ready", flush=True)
time.sleep(120)  # the main thread never checks: only the watchdog can end the process
"""


def _child(limit_s: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(limit_s)], stdout=subprocess.PIPE, env=env)
    assert child.stdout is not None
    if not select.select([child.stdout], [], [], 120)[0]:  # importing stream.app (torch, Faust) takes seconds
        child.kill()
        raise AssertionError("the child did not start within 120 s")
    assert child.stdout.readline().strip() == b"ready"
    return child


def test_a_frozen_process_exits_when_resumed():
    child = _child(limit_s=0.5)
    try:
        child.send_signal(signal.SIGSTOP)
        time.sleep(2.0)  # four times the limit: the group would have expired the member by now
        child.send_signal(signal.SIGCONT)
        assert child.wait(timeout=60) == 70
    finally:
        child.kill()
        child.wait()


def test_a_process_that_is_not_frozen_keeps_running():
    child = _child(limit_s=1.0)
    try:
        time.sleep(4.0)  # four times the limit: a watchdog that stopped marking its ticks would have fired
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()
