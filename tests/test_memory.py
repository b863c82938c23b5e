"""The trims of glibc's heaps after a burst of large records (stream/memory.py). The live worker's memory after a
burst is checked by tests/test_fuzz.py."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from stream.memory import MAX_BACKOFF_S, SETTLE_TRIMS, TrimPolicy, anonymous_bytes, glibc_trim, trim_after_bursts

MB = 1 << 20


def test_policy_trims_while_memory_is_the_threshold_above_its_lowest():
    policy = TrimPolicy(threshold=64 * MB)
    assert not policy.due(500 * MB, now=0)  # the first reading is the floor
    assert not policy.due(563 * MB, now=1)
    assert policy.due(564 * MB, now=2)
    assert policy.trimmed(580 * MB, 510 * MB, now=2)  # gave back 70 MB, the threshold or more: next in 1 s
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
        assert not policy.trimmed(700 * MB, 680 * MB, now)
        waits.append(policy.backoff_s)
    assert waits == [2.0, 4.0, 4.0, 4.0, 4.0]
    assert policy.trimmed(700 * MB, 520 * MB, now)  # the burst is over: the memory came back
    assert policy.backoff_s == 1.0


def test_policy_takes_memory_that_stays_in_use_as_the_new_lowest():
    policy = TrimPolicy(threshold=64 * MB)
    policy.due(500 * MB, now=0)
    trims = 0
    for step in range(400):  # 200 s of readings at 690 MB, each trim giving back 10 MB
        if policy.due(690 * MB, step / 2):
            policy.trimmed(690 * MB, 680 * MB, step / 2)
            trims += 1
    assert trims == SETTLE_TRIMS  # then the loaded worker's 680 MB is its floor: no more trims at 690 MB
    assert policy.floor == 680 * MB
    assert policy.due(744 * MB, 200 + MAX_BACKOFF_S)  # and growth counts from there


def test_policy_off_never_trims():
    policy = TrimPolicy(threshold=0)
    assert not policy.due(100 * MB, now=0)
    assert not policy.due(10_000 * MB, now=100)


class ReadingsDone(Exception):
    pass


def run_loop(readings: list[int | None], threshold_mb: int = 64) -> list[int]:
    """The loop over scripted readings (MB; None: a failed read) with a clock that advances 1 s a reading; the MB
    at which each trim ran."""
    values = iter(readings)
    now = {"mb": 0, "t": 0.0}
    trims: list[int] = []

    def read() -> int | None:
        try:
            mb = next(values)
        except StopIteration:
            raise ReadingsDone from None
        now["t"] += 1.0
        if mb is None:
            return None
        now["mb"] = mb
        return mb * MB

    async def run() -> None:
        with pytest.raises(ReadingsDone):
            await trim_after_bursts(
                threshold_mb, read=read, trim=lambda: trims.append(now["mb"]), period_s=0, clock=lambda: now["t"]
            )

    asyncio.run(run())
    return trims


def test_the_loop_trims_bursts_and_skips_failed_readings():
    # each trim is followed by the reading after it
    assert run_loop([500, 510, None, 505, 600, 520, 525, None, 530, 700, 540, 540, 540]) == [600, 700]


def test_the_loop_spaces_trims_out_while_memory_stays_high():
    trims = run_loop([500] + [700] * 40)  # a reading a second; every trim gives back nothing
    assert len(trims) == 9  # at seconds 2 and 5, then every MAX_BACKOFF_S (4) after each trim's own reading: 10 ... 40


def test_the_loop_is_off_at_zero_and_stops_after_a_failed_trim():
    calls: list[int] = []

    def failing() -> None:
        calls.append(1)
        raise OSError("no")

    async def run() -> None:
        await asyncio.wait_for(trim_after_bursts(0, read=lambda: 10_000 * MB, trim=failing, period_s=0), 1)
        values = iter([100 * MB, 1_000 * MB])
        await asyncio.wait_for(
            trim_after_bursts(64, read=lambda: next(values, 1_000 * MB), trim=failing, period_s=0), 1
        )

    asyncio.run(run())
    assert calls == [1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc: Linux only")
@pytest.mark.skipif("LD_PRELOAD" in os.environ, reason="another allocator preloaded: glibc's heaps are not in use")
def test_glibc_trim_gives_back_what_a_burst_of_large_records_left_in_the_heap():
    trim = glibc_trim()
    if trim is None:
        pytest.skip("the C library is not glibc")
    trim()
    base = anonymous_bytes()
    assert base is not None
    survivors = []
    burst = []
    for _ in range(3000):  # 64-KB records under the mmap threshold, with small survivors between them
        burst.append(os.urandom(65_000))
        survivors.append(bytearray(2_000))
    grown = (anonymous_bytes() or 0) - base
    assert grown > 150 * MB
    del burst
    held = (anonymous_bytes() or 0) - base
    trim()
    given_back = held - ((anonymous_bytes() or 0) - base)
    assert given_back > held // 2, (grown >> 20, held >> 20, given_back >> 20)
    assert len(survivors) == 3000
