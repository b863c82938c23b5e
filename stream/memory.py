"""Giving freed memory back to the system after a burst of large records.

A batch of records near the size limit (and their DLQ records, which carry the original in base64) is allocated by
glibc's malloc from its heaps; once freed, most of that memory stays in the heaps' free lists, and the worker's
resident memory stays where the burst took it. In the 100,000-record fuzz that was +74 to +324 MB after the burst
(docs/reliability.md); ``malloc_trim(0)`` after it brought it back to +21 to +29 MB. Nothing in Python holds it:
only the allocator does.

A trim walks every heap (about 5 ms on a worker's with nothing to give back, 40 ms when it returns hundreds of MB)
and holds each heap's lock while it walks it: the scoring loop goes on meanwhile (ctypes releases the GIL), but an
allocation it makes from the heap being trimmed waits. So a trim runs only while the worker's anonymous memory is
``memory_trim_mb`` or more above the lowest it has been (``TrimPolicy``): at most once a second, every
``MAX_BACKOFF_S`` while trims give back less than that, and after ``SETTLE_TRIMS`` such trims in a row the memory
in use is taken as the new lowest (a loaded worker's batches, queues and buffers keep it 70-110 MB above its idle
start; more users' states grow it for good). After a burst the memory comes back within ``MAX_BACKOFF_S`` of its end.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("intentstream.worker")

CHECK_S = 1.0  # how often the memory is read (a read of /proc/self/statm, microseconds)
MAX_BACKOFF_S = 4.0  # the longest wait between trims while the memory stays high
SETTLE_TRIMS = 15  # trims in a row that give back less than the threshold (a minute at most): the memory is in use
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def anonymous_bytes() -> int | None:
    """This process's resident memory less its file-backed pages (the model's and the libraries' mapped files, which
    a trim cannot give back), from /proc/self/statm; None where it cannot be read (not Linux, a failed read)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def glibc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)`` (free memory at the top of every heap given back, and free pages within them
    released), or None where the C library is not glibc (musl, macOS): their allocators give memory back themselves
    or not at all, and there is nothing to call. Looked up in the process itself: no ``ldconfig`` run."""
    if not hasattr(os, "confstr"):
        return None
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, ValueError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


@dataclass
class TrimPolicy:
    """When to trim: the memory is ``threshold`` bytes or more above the lowest it has been, and the last trim is at
    least ``backoff_s`` ago. A trim that gave back less than the threshold (the memory is live: a burst still being
    scored, a loaded worker's batches, more users' states) doubles the wait up to ``MAX_BACKOFF_S``, and after
    ``SETTLE_TRIMS`` of them in a row its memory becomes the lowest; one that gave back the threshold or more (a
    burst's leftovers) makes the wait ``CHECK_S`` again."""

    threshold: int
    floor: int | None = None
    backoff_s: float = CHECK_S
    next_at: float = 0.0
    little_in_a_row: int = 0

    def due(self, memory: int, now: float) -> bool:
        if self.floor is None or memory < self.floor:
            self.floor = memory
        return self.threshold > 0 and memory - self.floor >= self.threshold and now >= self.next_at

    def trimmed(self, before: int, after: int, now: float) -> bool:
        """Record a trim; True when it gave back the threshold or more."""
        self.floor = after if self.floor is None else min(self.floor, after)
        gave_back = before - after >= self.threshold
        self.little_in_a_row = 0 if gave_back else self.little_in_a_row + 1
        if self.little_in_a_row >= SETTLE_TRIMS:
            self.floor, self.little_in_a_row = after, 0
        self.backoff_s = CHECK_S if gave_back else min(2 * self.backoff_s, MAX_BACKOFF_S)
        self.next_at = now + self.backoff_s
        return gave_back


async def trim_after_bursts(
    threshold_mb: int,
    *,
    read: Callable[[], int | None] = anonymous_bytes,
    trim: Callable[[], object] | None = None,
    period_s: float = CHECK_S,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run for the worker's life: read the memory every ``period_s`` and trim the heaps when the policy says so.
    Returns at once when trims are off (0) or impossible (not glibc), and after a trim that failed (logged: the worker
    goes on without them, as it would without glibc). A reading that fails is skipped."""
    if threshold_mb <= 0:
        return
    trim = trim if trim is not None else glibc_trim()
    if trim is None:
        log.info("event=memory_trims_off reason=not_glibc")
        return
    policy = TrimPolicy(threshold_mb << 20)
    while True:
        await asyncio.sleep(period_s)
        before = read()
        if before is None or not policy.due(before, clock()):
            continue
        started = time.perf_counter()
        try:
            await asyncio.to_thread(trim)
        except Exception:
            log.exception("event=memory_trim_failed; no more trims")
            return
        after = read()
        if after is None:
            continue
        gave_back = policy.trimmed(before, after, clock())
        log.log(
            logging.INFO if gave_back else logging.DEBUG,
            "event=memory_trimmed mb_before=%d mb_after=%d ms=%.1f next_in_s=%.0f",
            before >> 20,
            after >> 20,
            (time.perf_counter() - started) * 1000,
            policy.backoff_s,
        )


__all__ = ["TrimPolicy", "anonymous_bytes", "glibc_trim", "trim_after_bursts"]
