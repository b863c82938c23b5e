"""Giving freed memory back to the system after a burst of large records.

A batch of records near the size limit (and their DLQ records, which carry the original in base64) is allocated by
glibc's malloc from its heaps; once freed, most of that memory stays in the heaps' free lists, and the worker's
resident memory stays where the burst took it. In the 100,000-record fuzz that was +74 to +324 MB after the burst
(docs/reliability.md); ``malloc_trim(0)`` after it brought it back to +21 to +29 MB. Nothing in Python holds it:
only the allocator does.

A trim walks every heap (about 5 ms on a worker's with nothing to give back, 40 ms when it returns hundreds of MB),
so it runs only while the resident memory is ``memory_trim_mb`` or more above the lowest it has been, at most once a
second and every ``MAX_BACKOFF_S`` while trims give back less than that (``TrimPolicy``), and on a thread of its
own: ctypes releases the GIL, so the scoring loop goes on meanwhile. A loaded worker's memory (its batches, queues
and buffers in use) sits 70-110 MB above its idle start: trims every 4 s then give back 10-20 MB each; after a
burst the memory comes back within ``MAX_BACKOFF_S`` of its end.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("intentstream.worker")

CHECK_S = 1.0  # how often the resident memory is read (a read of /proc/self/statm, microseconds)
MAX_BACKOFF_S = 4.0  # the longest wait between trims while the memory stays high
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory (Linux; 0 where /proc is absent, which disables the trims)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def glibc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)`` (free memory at the top of every heap given back, and free pages within them
    released), or None where the C library is not glibc (musl, macOS): their allocators give memory back themselves
    or not at all, and there is nothing to call."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


@dataclass
class TrimPolicy:
    """When to trim: the resident memory is ``threshold`` bytes or more above the lowest it has been, and the last
    trim is at least ``backoff_s`` ago. A trim that gave back less than the threshold (the memory is live: a burst
    still being scored, a loaded worker's batches and queues, more users' states) doubles the wait up to
    ``MAX_BACKOFF_S``; one that gave back the threshold or more (a burst's leftovers) makes it ``CHECK_S`` again."""

    threshold: int
    floor: int | None = None
    backoff_s: float = CHECK_S
    next_at: float = 0.0

    def due(self, resident: int, now: float) -> bool:
        if self.floor is None or resident < self.floor:
            self.floor = resident
        return self.threshold > 0 and resident - self.floor >= self.threshold and now >= self.next_at

    def trimmed(self, before: int, after: int, now: float) -> None:
        self.floor = after if self.floor is None else min(self.floor, after)
        gave_back = before - after >= self.threshold
        self.backoff_s = CHECK_S if gave_back else min(2 * self.backoff_s, MAX_BACKOFF_S)
        self.next_at = now + self.backoff_s


async def trim_after_bursts(
    threshold_mb: int,
    *,
    read: Callable[[], int] = resident_bytes,
    trim: Callable[[], object] | None = None,
    period_s: float = CHECK_S,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run for the worker's life: read the resident memory every ``period_s`` and trim the heaps when the policy
    says so. Returns at once when trims are off (0) or impossible (not glibc), and after a trim that failed (logged:
    the worker goes on without them, as it would without glibc)."""
    trim = trim if trim is not None else glibc_trim()
    if threshold_mb <= 0 or trim is None:
        return
    policy = TrimPolicy(threshold_mb << 20)
    while True:
        await asyncio.sleep(period_s)
        before = read()
        if not policy.due(before, clock()):
            continue
        started = time.perf_counter()
        try:
            await asyncio.to_thread(trim)
        except Exception:
            log.exception("event=memory_trim_failed; no more trims")
            return
        after = read()
        policy.trimmed(before, after, clock())
        log.info(
            "event=memory_trimmed rss_mb_before=%d rss_mb_after=%d ms=%.1f next_in_s=%.0f",
            before >> 20,
            after >> 20,
            (time.perf_counter() - started) * 1000,
            policy.backoff_s,
        )


__all__ = ["TrimPolicy", "glibc_trim", "resident_bytes", "trim_after_bursts"]
