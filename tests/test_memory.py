"""The trims of glibc's heaps after a burst of large records (stream/memory.py). The live worker's memory after a
burst is checked by tests/test_fuzz.py."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from stream.memory import TrimPolicy, glibc_trim, resident_bytes, trim_after_bursts

MB = 1 << 20


def test_policy_trims_while_memory_is_the_threshold_above_its_lowest():
    policy = TrimPolicy(threshold=64 * MB)
    assert not policy.due(500 * MB, now=0)  # the first reading is the floor
    assert not policy.due(563 * MB, now=1)
    assert policy.due(564 * MB, now=2)
    policy.trimmed(580 * MB, 510 * MB, now=2)  # gave back 70 MB, the threshold or more: next in 1 s
    assert not policy.due(600 * MB, now=2.5)
    assert policy.due(600 * MB, now=3)
    assert not policy.due(563 * MB, now=10)
    assert not policy.due(400 * MB, now=11)  # memory given back by itself lowers the floor ...
    assert policy.due(464 * MB, now=12)  # ... and the threshold counts from there


def test_policy_backs_off_while_trims_give_back_little_and_resets_after_one_that_does():
    policy = TrimPolicy(threshold=64 * MB)
    policy.due(500 * MB, now=0)
    waits = []
    now = 0.0
    for _ in range(5):  # live memory: each trim gives back 20 MB
        while not policy.due(700 * MB, now):
            now += 0.5
        policy.trimmed(700 * MB, 680 * MB, now)
        waits.append(policy.backoff_s)
    assert waits == [2.0, 4.0, 4.0, 4.0, 4.0]
    policy.trimmed(700 * MB, 520 * MB, now)  # the burst is over: the memory came back
    assert policy.backoff_s == 1.0


def test_policy_off_never_trims():
    policy = TrimPolicy(threshold=0)
    assert not policy.due(100 * MB, now=0)
    assert not policy.due(10_000 * MB, now=100)


def test_the_loop_trims_bursts_and_not_steady_memory():
    readings = iter([500, 510, 505, 600, 520, 525, 530, 700, 540] + [540] * 20)
    resident = {"now": 0}
    trims: list[int] = []
    ticks = iter(range(1000))

    def read() -> int:
        resident["now"] = next(readings) * MB
        return resident["now"]

    def trim() -> None:
        trims.append(resident["now"] >> 20)

    async def run() -> None:
        task = asyncio.ensure_future(
            trim_after_bursts(64, read=read, trim=trim, period_s=0.001, clock=lambda: float(next(ticks)))
        )
        await asyncio.sleep(0.2)
        task.cancel()

    asyncio.run(run())
    assert trims == [600, 700]  # each burst's reading, trimmed once; steady memory never


def test_the_loop_is_off_at_zero_and_stops_after_a_failed_trim():
    calls: list[int] = []

    def failing() -> None:
        calls.append(1)
        raise OSError("no")

    async def run() -> None:
        await asyncio.wait_for(trim_after_bursts(0, read=lambda: 10_000 * MB, trim=failing, period_s=0.001), 1)
        values = iter([100 * MB, 1_000 * MB])
        await asyncio.wait_for(
            trim_after_bursts(64, read=lambda: next(values, 1_000 * MB), trim=failing, period_s=0.001), 1
        )

    asyncio.run(run())
    assert calls == [1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc: Linux only")
def test_glibc_trim_gives_back_what_a_burst_of_large_records_left_in_the_heap():
    trim = glibc_trim()
    if trim is None:
        pytest.skip("the C library is not glibc")
    trim()
    base = resident_bytes()
    survivors = []
    burst = []
    for _ in range(3000):  # 64-KB records under the mmap threshold, with small survivors between them
        burst.append(os.urandom(65_000))
        survivors.append(bytearray(2_000))
    grown = resident_bytes() - base
    assert grown > 150 * MB
    del burst
    held = resident_bytes() - base
    trim()
    given_back = held - (resident_bytes() - base)
    assert given_back > held // 2, (grown >> 20, held >> 20, given_back >> 20)
    assert len(survivors) == 3000
