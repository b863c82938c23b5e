"""Input offsets: which record of an input partition comes next, and what may be committed.

Faust infers committable offsets from the order in which its fetch loop hands records over: an offset jump is
recorded as a "gap" (offsets it believes hold no record) and treated as acked. Around a seek (after table
recovery, after a rebalance) it hands records over out of order or twice, and the gaps it then records are
made up: one that covered records never processed was committed past them (at-least-once lost them), one that
overlapped processed records made the commit creep forward one offset per commit while the partition's
transaction committed their outputs (exactly-once wrote them again after the next rebalance). Both seen in the
chaos scenario, and in ``__consumer_offsets``.

So the worker keeps its own: per input partition, the next offset to process. It starts, in every consumer
generation, at the group's committed offset as the broker reports it; a record below it is a repeat, a record
at it is admitted, and a record above it is a gap that is checked against the broker: a real gap (a
transaction marker, aborted records under read_committed, records removed by retention) is stepped over; a
made-up one makes the consumer seek back. The committable offset of a partition is the offset after its last
record whose batch was written (``done``), never after a record only admitted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from stream.settings import Settings
from stream.topics import kafka_client_kwargs

# After a seek back, records fetched before it can still be queued in Faust's buffers: within this window a gap
# at the same next offset is taken for one of those and dropped without asking the broker again.
SEEK_SETTLE_S = 1.0
CHECK_TIMEOUT_S = 10.0


class Verdict(Enum):
    PROCESS = "process"  # the next record of its partition
    REPEAT = "repeat"  # below the next offset: processed (or committed) already
    REFETCH = "refetch"  # records before it were never handed over: dropped, the consumer seeks back


@dataclass
class InputOffsets:
    settings: Settings
    read_committed: bool
    next: dict[int, int] = field(default_factory=dict)  # partition -> next offset to admit
    done: dict[int, int] = field(default_factory=dict)  # partition -> offset after the last record written
    # At-least-once: while a commit is under way, what it may cover (``done`` when its changelog was sent)
    pinned: dict[int, int] | None = None
    _sought: dict[int, tuple[int, float]] = field(default_factory=dict)  # partition -> (offset, monotonic time)
    _client: Any = None

    async def _consumer(self) -> AIOKafkaConsumer:
        if self._client is None:
            # Never subscribes, so it never joins the group: it only reads the group's committed offsets and
            # peeks at a partition to check a gap.
            self._client = AIOKafkaConsumer(
                **kafka_client_kwargs(self.settings),
                group_id=self.settings.app_id,
                enable_auto_commit=False,
                isolation_level="read_committed" if self.read_committed else "read_uncommitted",
                auto_offset_reset="earliest",  # a check below the log start (retention) reads from the start
                max_partition_fetch_bytes=65_536,
            )
            await self._client.start()
        return self._client

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.stop()
            self._client = None

    def reset(self) -> None:
        """A revocation: the next generation starts again from what the group has committed."""
        self.next.clear()
        self.done.clear()
        self._sought.clear()

    async def start_partition(self, partition: int) -> int:
        """The group's committed offset (the log start when the group has none): where processing resumes."""
        consumer = await self._consumer()
        tp = TopicPartition(self.settings.topic_clickstream, partition)
        committed = await consumer.committed(tp)
        if committed is None or committed < 0:
            committed = (await consumer.beginning_offsets([tp]))[tp]
        self.next[partition] = self.done[partition] = committed
        return committed

    async def judge(self, partition: int, offset: int) -> tuple[Verdict, int | None]:
        """What to do with the record at ``offset``; for REFETCH, the offset to seek the consumer back to (None
        when the seek was just made)."""
        nxt = self.next.get(partition)
        if nxt is None:
            nxt = await self.start_partition(partition)
        if offset < nxt:
            return Verdict.REPEAT, None
        if offset > nxt:
            sought = self._sought.get(partition)
            if sought is not None and sought[0] == nxt and time.monotonic() - sought[1] < SEEK_SETTLE_S:
                return Verdict.REFETCH, None
            first = await self.first_visible(partition, nxt)
            if first is None or first < offset:
                back = nxt if first is None else first
                self.next[partition] = back
                self._sought[partition] = (back, time.monotonic())
                return Verdict.REFETCH, back
            # first == offset: nothing readable between nxt and this record
        self.next[partition] = offset + 1
        self._sought.pop(partition, None)
        return Verdict.PROCESS, None

    async def admit_run(self, partition: int, first: int, last: int, n: int) -> bool:
        """Admit the records ``first`` to ``last`` (``n`` of them) of a partition at once when they are its next
        records with no offset between them (one check per fetched batch instead of one per record); False
        leaves them to ``judge``, record by record."""
        nxt = self.next.get(partition)
        if nxt is None:
            nxt = await self.start_partition(partition)
        if first != nxt or last - first != n - 1:
            return False
        self.next[partition] = last + 1
        self._sought.pop(partition, None)
        return True

    async def first_visible(self, partition: int, offset: int) -> int | None:
        """The offset of the first record at or after ``offset`` that a consumer of our isolation level reads
        (None when the broker did not answer in time)."""
        consumer = await self._consumer()
        tp = TopicPartition(self.settings.topic_clickstream, partition)
        consumer.assign([tp])
        try:
            consumer.seek(tp, offset)
            deadline = time.monotonic() + CHECK_TIMEOUT_S
            while time.monotonic() < deadline:
                got = await consumer.getmany(tp, timeout_ms=1000, max_records=1)
                if got.get(tp):
                    return int(got[tp][0].offset)
            return None
        finally:
            consumer.unsubscribe()

    def written(self, partition: int, offset: int) -> None:
        """The batch holding the record at ``offset`` is written (outputs acknowledged, states stored)."""
        if offset + 1 > self.done.get(partition, -1):
            self.done[partition] = offset + 1

    def stuck_seeks(self, older_than_s: float) -> dict[int, int]:
        """Partitions sent back by a seek longer ago than ``older_than_s`` whose record at the sought offset has
        not come (a fetch already under way can overwrite the seek): they are sought again."""
        now = time.monotonic()
        out = {}
        for partition, (offset, at) in self._sought.items():
            if self.next.get(partition) == offset and now - at > older_than_s:
                out[partition] = offset
                self._sought[partition] = (offset, now)
        return out

    def committable(self, tps: Any, committed: Any) -> dict[Any, int]:
        """Offsets to commit for the input partitions among ``tps`` (Faust TPs): the offset after the last written
        record (as of ``pinned``, while a commit is pinned), where it moved past what ``committed`` (Faust's last
        committed offsets) holds."""
        done = self.done if self.pinned is None else self.pinned
        out = {}
        for tp in tps:
            if tp.topic != self.settings.topic_clickstream or tp.partition not in done:
                continue
            nxt = done[tp.partition]
            last = committed.get(tp)
            if last is None or nxt > last:
                # aiokafka's commits refuse Faust's TP tuples (equal and of equal hash, but not its class)
                out[TopicPartition(tp.topic, tp.partition)] = nxt
        return out
