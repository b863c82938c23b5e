"""stream/offsets.py against the real broker: where a partition resumes, repeats, real gaps (transaction markers,
aborted records) stepped over, made-up gaps sent back, and what may be committed."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from faust.types import TP

from stream.offsets import InputOffsets, Verdict
from stream.settings import Settings
from stream.topics import admin_client, ensure_topics_async, kafka_client_kwargs

pytestmark = pytest.mark.kafka


async def _produce(settings: Settings, values: list[bytes], transactional: str | None = None, abort: bool = False):
    producer = AIOKafkaProducer(**kafka_client_kwargs(settings), transactional_id=transactional)
    await producer.start()
    try:
        if transactional:
            async with producer.transaction() if not abort else _aborting(producer):
                for v in values:
                    await producer.send(settings.topic_clickstream, v, key=b"u", partition=0)
        else:
            for v in values:
                await (await producer.send(settings.topic_clickstream, v, key=b"u", partition=0))
    finally:
        await producer.stop()


class _aborting:
    def __init__(self, producer: AIOKafkaProducer):
        self.producer = producer

    async def __aenter__(self) -> None:
        await self.producer.begin_transaction()

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.flush()  # the records written first: an abort drops batches still in the producer
        await self.producer.abort_transaction()


async def _wait_for_end_offset(settings: Settings, end: int) -> None:
    """Until partition 0 ends at ``end``. A transaction's marker is written by the coordinator after the producer's
    commit or abort has returned: without this wait, the next producer's records could land before it, and the
    offsets would have no gap where the test expects one (a flaky run read offsets 0 to 4, all records)."""
    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings))
    await consumer.start()
    try:
        tp = TopicPartition(settings.topic_clickstream, 0)
        for _ in range(600):
            if (await consumer.end_offsets([tp]))[tp] >= end:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"partition 0 did not reach offset {end}: is the transaction coordinator stuck?")
    finally:
        await consumer.stop()


async def _commit(settings: Settings, offset: int) -> None:
    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings), group_id=settings.app_id, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(settings.topic_clickstream, 0)
        consumer.assign([tp])
        await consumer.commit({tp: offset})
    finally:
        await consumer.stop()


def test_resume_repeat_process_and_made_up_gap(fresh: Settings):
    async def run() -> None:
        await ensure_topics_async(fresh)
        await _produce(fresh, [b"r%d" % i for i in range(10)])  # offsets 0..9, no gaps
        await _commit(fresh, 3)
        offsets = InputOffsets(fresh, read_committed=False)
        try:
            assert await offsets.judge(0, 2) == (Verdict.REPEAT, None)  # committed already
            assert await offsets.judge(0, 3) == (Verdict.PROCESS, None)
            tp = TP(fresh.topic_clickstream, 0)
            assert offsets.committable([tp], {}) == {TopicPartition(fresh.topic_clickstream, 0): 3}  # not written yet
            offsets.written(0, 3)
            assert await offsets.judge(0, 3) == (Verdict.REPEAT, None)  # handed over twice
            # 4..6 were never handed over: a made-up gap, the consumer must seek back to 4
            assert await offsets.judge(0, 7) == (Verdict.REFETCH, 4)
            assert await offsets.judge(0, 8) == (Verdict.REFETCH, None)  # still queued from before the seek
            assert await offsets.judge(0, 4) == (Verdict.PROCESS, None)
            offsets.written(0, 4)
            assert offsets.committable([tp], {}) == {TopicPartition(fresh.topic_clickstream, 0): 5}
            # nothing new since the last commit: nothing to commit
            assert offsets.committable([tp], {tp: 5}) == {}
            offsets.reset()  # a revocation: the next generation resumes from the group's commit (3)
            assert await offsets.judge(0, 4) == (Verdict.REFETCH, 3)
        finally:
            await offsets.stop()

    asyncio.run(run())


async def _visible(settings: Settings, read_committed: bool) -> list[int]:
    """Offsets of the records of partition 0 that a consumer of this isolation level reads."""
    isolation = "read_committed" if read_committed else "read_uncommitted"
    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings), isolation_level=isolation)
    await consumer.start()
    try:
        tp = TopicPartition(settings.topic_clickstream, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        end = (await consumer.end_offsets([tp]))[tp]
        seen: list[int] = []
        while await consumer.position(tp) < end:
            seen += [m.offset for m in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, [])]
        return seen
    finally:
        await consumer.stop()


@pytest.mark.parametrize("read_committed", [False, True])
def test_real_gaps_are_stepped_over(fresh: Settings, read_committed: bool):
    """A transactional producer leaves a marker after each transaction (an offset no consumer reads); under
    read_committed an aborted transaction's records are not read either. Every record a consumer reads is the
    next one to process, however far its offset jumps."""

    async def run() -> None:
        await ensure_topics_async(fresh)
        await _produce(fresh, [b"a0", b"a1"], transactional=f"{fresh.app_id}-t1")  # 0, 1, marker
        await _wait_for_end_offset(fresh, 3)
        await _produce(fresh, [b"x0", b"x1"], transactional=f"{fresh.app_id}-t2", abort=True)  # 3, 4, marker
        await _wait_for_end_offset(fresh, 6)
        await _produce(fresh, [b"b0"])  # 6
        await _commit(fresh, 0)
        visible = await _visible(fresh, read_committed)
        assert visible == ([0, 1, 6] if read_committed else [0, 1, 3, 4, 6])  # gaps to step over
        offsets = InputOffsets(fresh, read_committed=read_committed)
        try:
            for offset in visible:
                assert await offsets.judge(0, offset) == (Verdict.PROCESS, None), offset
            assert offsets.next[0] == visible[-1] + 1
        finally:
            await offsets.stop()

    asyncio.run(run())


def test_records_removed_by_retention_are_stepped_over(fresh: Settings):
    """The group's committed offset is below the log start (records deleted by retention): the first record
    that still exists is the next one, as with auto_offset_reset=earliest."""
    from aiokafka.admin import RecordsToDelete

    async def run() -> None:
        await ensure_topics_async(fresh)
        await _produce(fresh, [b"r%d" % i for i in range(10)])
        await _commit(fresh, 2)
        async with admin_client(fresh) as admin:
            await admin.delete_records({TopicPartition(fresh.topic_clickstream, 0): RecordsToDelete(6)})
        offsets = InputOffsets(fresh, read_committed=False)
        try:
            assert await offsets.judge(0, 6) == (Verdict.PROCESS, None)
            assert offsets.next[0] == 7
        finally:
            await offsets.stop()

    asyncio.run(run())


def test_a_seek_whose_record_never_came_is_sought_again(fresh: Settings):
    async def run() -> None:
        await ensure_topics_async(fresh)
        await _produce(fresh, [b"r%d" % i for i in range(5)])
        await _commit(fresh, 0)
        offsets = InputOffsets(fresh, read_committed=False)
        try:
            assert await offsets.judge(0, 3) == (Verdict.REFETCH, 0)
            assert offsets.stuck_seeks(older_than_s=60) == {}
            assert offsets.stuck_seeks(older_than_s=0) == {0: 0}
            assert await offsets.judge(0, 0) == (Verdict.PROCESS, None)
            assert offsets.stuck_seeks(older_than_s=0) == {}  # the record came
        finally:
            await offsets.stop()

    asyncio.run(run())
