"""Ingest: the input topic's records from the consumer's fetcher to the scoring loop, a fetched batch at a time.

The consumer hands over every fetch of the input topic whole (``stream.compat.divert_input_topic``) into
a bounded queue; the scoring loop takes whole fetches until a batch holds ``batch_max_events`` records or its
first fetch has waited ``batch_max_ms``, then, without waiting, whatever more is queued already, up to
``batch_backlog_events`` records: a worker that is behind scores bigger batches, which cost less per event, while
one that keeps up never waits for them. A queue holding ``queue_max_events`` records holds the fetcher back
(back-pressure, bounded memory).
Admission (``admit``) keeps, per partition, the next records in offset order, once (``stream.offsets``); the
records stay as the fetcher unpacked them (``stream.compat.InputRecord``), bytes, until the engine decodes them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from stream.compat import FetchedBatch
from stream.engine import Record
from stream.offsets import InputOffsets, Verdict

log = logging.getLogger("intentstream.worker")


@dataclass
class InputQueue:
    """Fetched batches between the fetcher and the scoring loop. The fetcher waits while ``max_events`` records or more
    are queued; a fetch is never split, so the queue holds at most ``max_events`` records plus one fetch."""

    max_events: int
    queue: asyncio.Queue = field(init=False)
    queued_events: int = field(init=False, default=0)
    _room: asyncio.Event = field(init=False)

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue()  # bounded in records, by ``put``
        self._room = asyncio.Event()
        self._room.set()

    async def put(self, batch: FetchedBatch) -> None:
        while self.queued_events >= self.max_events:
            self._room.clear()
            await self._room.wait()
        n = size(batch)
        self.queued_events += n
        # stamped when handed over: a batch's wait counts from when its first records were here, not from when the
        # scoring loop, busy with the batch before, came to take them
        self.queue.put_nowait((asyncio.get_running_loop().time(), n, batch))

    def _taken(self, item: tuple[float, int, FetchedBatch]) -> tuple[float, int, FetchedBatch]:
        self.queued_events -= item[1]
        if self.queued_events < self.max_events:
            self._room.set()
        return item

    def clear(self) -> int:
        """Drop what is queued (a revocation: those records are replayed by their partitions' next owners)."""
        n = 0
        while True:
            try:
                self._taken(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                return n
            n += 1

    async def take(self, max_events: int, within_s: float, backlog_events: int = 0) -> list[FetchedBatch]:
        """Whole fetches, the first awaited, until they hold ``max_events`` records or ``within_s`` has passed
        since the first was handed over (fetches queued while the loop scored the batch before have waited already:
        they do not wait ``within_s`` more); then the fetches queued already, with no wait, until they hold
        ``backlog_events`` records. Fetches are whole: a batch passes either size by less than one fetch."""
        arrived, n, first = self._taken(await self.queue.get())
        fetches = [first]
        loop = asyncio.get_running_loop()
        deadline = arrived + within_s
        while n < max(max_events, backlog_events):
            try:
                _, n_more, more = self._taken(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if n >= max_events or remaining <= 0:  # past max_events a batch takes only what is queued
                    break
                try:
                    _, n_more, more = self._taken(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            fetches.append(more)
            n += n_more
        return fetches


@dataclass
class Admission:
    """What a batch's records came to: the records to process, and the partitions to seek back."""

    records: list[Record] = field(default_factory=list)  # as fetched (stream.compat.InputRecord)
    last_offsets: dict[int, int] = field(default_factory=dict)  # partition -> offset of its last admitted record
    seeks: dict[int, int] = field(default_factory=dict)  # partition -> offset
    skipped: dict[str, int] = field(default_factory=lambda: {"stale": 0, "repeat": 0, "refetch": 0})


async def admit(fetches: list[FetchedBatch], offsets: InputOffsets, stale_upto_generation: int) -> Admission:
    """The records of a batch to process, in order: the next record of each partition, once. Records fetched in
    a generation a revocation has ended are stale (their partitions' owners replay them from the committed
    offset); repeats and records after a made-up gap are left out, and after a made-up gap the consumer must
    seek back to the first record it never handed over (``Admission.seeks``)."""
    out = Admission()
    append = out.records.append
    for fetch in fetches:
        if fetch.generation_id <= stale_upto_generation:
            out.skipped["stale"] += size(fetch)
            continue
        for partition, records in fetch.records.items():
            if partition in out.seeks:  # sent back already: what follows is fetched again
                out.skipped["refetch"] += len(records)
                continue
            if await offsets.admit_run(partition, records[0].offset, records[-1].offset, len(records)):
                out.records += records  # the usual case: the partition's next records, contiguous
                out.last_offsets[partition] = records[-1].offset
                continue
            for i, r in enumerate(records):
                verdict, back = await offsets.judge(partition, r.offset)
                if verdict is Verdict.PROCESS:
                    append(r)
                    out.last_offsets[partition] = r.offset
                    continue
                out.skipped[verdict.value] += 1
                if verdict is Verdict.REFETCH:
                    if back is not None:
                        log.info("event=offset_gap partition=%d offset=%d seek_to=%d", partition, r.offset, back)
                        out.seeks[partition] = back
                    out.skipped["refetch"] += len(records) - i - 1
                    break
    return out


def size(fetch: FetchedBatch) -> int:
    """Records in a fetch."""
    return sum(len(r) for r in fetch.records.values())


__all__ = ["Admission", "InputQueue", "admit", "size"]
