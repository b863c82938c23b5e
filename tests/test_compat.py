"""The compat module's start check, its patches, and the ingest path's queue and admission (unit tests: the worker tests
run the same code on the real broker; the fetcher patch under read_committed is read here from the real broker too)."""

from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace

import pytest
from faust.transport.consumer import Consumer

from stream import compat
from stream.compat import CompatError, FetchedBatch
from stream.ingest import InputQueue, admit
from stream.offsets import InputOffsets
from stream.settings import Settings


def test_the_pinned_versions_have_every_internal_the_worker_uses():
    compat.check_internals()


def test_a_missing_internal_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delattr(Consumer, "_filter_committable_offsets")
    with pytest.raises(CompatError) as err:
        compat.check_internals()
    message = str(err.value)
    assert "Consumer._filter_committable_offsets is missing" in message
    assert "faust-streaming 0.15.3" in message and "\n" not in message


def test_the_worker_refuses_to_start_without_a_patched_internal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path
):
    from stream.worker import run

    monkeypatch.delattr(Consumer, "_wait_next_records")
    settings = Settings.from_env({}, model_dir=tmp_path / "models", state_dir=tmp_path / "state")
    assert run(argparse.Namespace(web_port=None), settings) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Consumer._wait_next_records is missing" in err[0], err


def test_require_names_an_instance_attribute():
    with pytest.raises(CompatError, match=r"SimpleNamespace\._key_index is missing"):
        compat.require(SimpleNamespace(), "_key_index")


def test_the_worker_consumer_gets_the_fetch_wait_and_min_bytes(monkeypatch: pytest.MonkeyPatch):
    """bound_fetch_wait wraps Faust's own _create_worker_consumer (1500 ms, 1 byte) once, however often it is called:
    the last call's values apply, and min_bytes None keeps aiokafka's."""
    import faust
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    # Faust's own method (a create_app earlier in this process has wrapped it already and stashed it); monkeypatch
    # undoes the class patches (and the stash) after the test
    faust_own = (
        getattr(AIOKafkaConsumerThread, "_faust_create_worker_consumer", None)
        or AIOKafkaConsumerThread._create_worker_consumer
    )
    monkeypatch.setattr(AIOKafkaConsumerThread, "_faust_create_worker_consumer", None, raising=False)
    monkeypatch.setattr(AIOKafkaConsumerThread, "_create_worker_consumer", faust_own)

    async def built() -> list[tuple[int, int]]:
        app = faust.App("compat-test", broker="kafka://localhost:9")
        thread = app.consumer._thread
        assert isinstance(thread, AIOKafkaConsumerThread)
        seen = []
        for args in [(100, 16_384), (20, None), (10, 65_536)]:
            compat.bound_fetch_wait(*args)
            consumer = thread._create_worker_consumer(app.transport)  # no broker needed: start() is not called
            seen.append((consumer._fetch_max_wait_ms, consumer._fetch_min_bytes))
            await consumer.stop()
        return seen

    assert asyncio.run(built()) == [(100, 16_384), (20, 1), (10, 65_536)]


def record(partition: int, offset: int) -> SimpleNamespace:
    return SimpleNamespace(key=b"u", value=b"{}", topic="clickstream", partition=partition, offset=offset, timestamp=7)


def fetch(generation: int, runs: dict[int, range]) -> FetchedBatch:
    return FetchedBatch(generation, {p: [record(p, o) for o in offsets] for p, offsets in runs.items()})


def test_queue_takes_whole_fetches_up_to_the_batch_size_or_the_wait():
    async def scenario() -> tuple[list[int], list[int], int]:
        q = InputQueue(max_events=1000)
        for i in range(3):
            await q.put(fetch(1, {0: range(i * 10, i * 10 + 10)}))
        first = await q.take(max_events=15, within_s=0.0)  # 10 < 15: a second fetch joins, then 20 >= 15
        second = await q.take(max_events=15, within_s=0.05)  # the last one, then waits 50 ms for more
        await q.put(fetch(1, {0: range(30, 31)}))
        return [len(f.records[0]) for f in first], [len(f.records[0]) for f in second], q.clear()

    first, second, cleared = asyncio.run(scenario())
    assert first == [10, 10] and second == [10] and cleared == 1


def test_a_fetch_queued_longer_than_the_wait_is_taken_without_waiting_for_more():
    """The wait counts from when the first fetch was handed over: fetches that queued while the scoring loop was busy
    with the batch before have waited already."""

    async def scenario() -> list[int]:
        q = InputQueue(max_events=1000)
        await q.put(fetch(1, {0: range(0, 10)}))
        await asyncio.sleep(0.06)  # the scoring loop busy with the batch before
        later = asyncio.get_running_loop().call_later(
            0.01, lambda: asyncio.ensure_future(q.put(fetch(1, {0: range(10, 20)})))
        )
        taken = await q.take(max_events=100, within_s=0.05)
        later.cancel()
        return [len(f.records[0]) for f in taken]

    assert asyncio.run(scenario()) == [10]


def test_a_backlog_fills_a_batch_up_to_the_backlog_size_without_waiting():
    """Past ``max_events`` a batch takes only what is queued already: a backlog makes bigger batches, while a worker
    that keeps up never waits for them."""

    async def scenario() -> tuple[list[int], list[int], list[int], bool]:
        q = InputQueue(max_events=1000)
        for i in range(6):
            await q.put(fetch(1, {0: range(i * 10, i * 10 + 10)}))
        behind = await q.take(max_events=15, within_s=0.05, backlog_events=35)  # 20 >= 15, then 40 >= 35
        rest = await q.take(max_events=15, within_s=0.05, backlog_events=35)  # the two left: 20, none queued more
        await q.put(fetch(1, {0: range(60, 80)}))
        kept_up = asyncio.ensure_future(q.take(max_events=15, within_s=5.0, backlog_events=1000))
        for _ in range(3):
            await asyncio.sleep(0)  # a take that waited for more would still be pending here
        done = kept_up.done()
        await q.put(fetch(1, {0: range(80, 90)}))
        taken = await kept_up
        return (
            [len(f.records[0]) for f in behind],
            [len(f.records[0]) for f in rest],
            [len(f.records[0]) for f in taken],
            done,
        )

    behind, rest, kept_up, done = asyncio.run(scenario())
    assert behind == [10, 10, 10, 10] and rest == [10, 10]
    assert done and kept_up == [20]


def test_the_queue_holds_the_fetcher_back_past_its_records_and_never_splits_a_fetch():
    async def scenario() -> tuple[list[bool], list[int], int]:
        q = InputQueue(max_events=25)
        await q.put(fetch(1, {0: range(0, 40)}))  # bigger than the bound: an empty queue takes any fetch whole
        held = asyncio.ensure_future(q.put(fetch(1, {0: range(40, 50)})))
        await asyncio.sleep(0)
        states = [held.done()]  # 40 >= 25 queued: the fetcher waits
        first = await q.take(max_events=1, within_s=0.0)
        await asyncio.sleep(0)
        states.append(held.done())  # room again
        await q.put(fetch(1, {0: range(50, 60)}))  # 10 + 10 < 25
        await q.put(fetch(1, {0: range(60, 70)}))  # 20 < 25 before it: 30 queued now
        third = asyncio.ensure_future(q.put(fetch(1, {0: range(70, 80)})))
        await asyncio.sleep(0)
        states.append(third.done())
        cleared = q.clear()
        await asyncio.sleep(0)
        states.append(third.done())
        return states, [len(f.records[0]) for f in first], cleared + q.clear()

    states, first, cleared = asyncio.run(scenario())
    assert states == [False, True, False, True] and first == [40] and cleared == 4


def test_admission_takes_the_next_records_once_and_drops_stale_fetches():
    offsets = InputOffsets(Settings.from_env({}), read_committed=False)
    offsets.next.update({0: 100, 1: 5})

    async def scenario() -> tuple:
        first = await admit([fetch(3, {0: range(100, 104), 1: range(5, 7)})], offsets, stale_upto_generation=2)
        # a fetch from before a revocation, and a repeat of records already admitted
        second = await admit([fetch(2, {0: range(104, 106)}), fetch(3, {0: range(102, 106)})], offsets, 2)
        return first, second

    first, second = asyncio.run(scenario())
    assert [(r.partition, r.offset) for r in first.records] == [(0, 100), (0, 101), (0, 102), (0, 103), (1, 5), (1, 6)]
    assert first.records[0].timestamp == 7 and not first.seeks
    assert [(r.partition, r.offset) for r in second.records] == [(0, 104), (0, 105)]
    assert second.skipped == {"stale": 2, "repeat": 2, "refetch": 0}
    assert first.last_offsets == {0: 103, 1: 6} and second.last_offsets == {0: 105}  # what becomes committable
    assert offsets.next == {0: 106, 1: 7}


def test_a_histogram_takes_a_batch_as_it_takes_each_value():
    import numpy as np
    from prometheus_client import CollectorRegistry, Histogram

    bounds = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
    one, many = (Histogram("lat", "x", buckets=bounds, registry=CollectorRegistry()) for _ in range(2))
    values = np.random.default_rng(0).exponential(0.1, 5000)
    values[:6] = [0.005, 0.01, 1.0, 2.0, 0.0, 0.25]  # on the bounds, past the last, zero
    for v in values:
        one.observe(float(v))
    compat.observe_many(many, values)
    samples = [{s.name: s.value for s in h.collect()[0].samples if s.name != "lat_created"} for h in (one, many)]
    by_bucket = [
        {s.labels.get("le"): s.value for s in h.collect()[0].samples if s.name == "lat_bucket"} for h in (one, many)
    ]
    assert by_bucket[0] == by_bucket[1] and samples[0]["lat_count"] == samples[1]["lat_count"] == 5000
    assert samples[1]["lat_sum"] == pytest.approx(samples[0]["lat_sum"], rel=1e-12)


def test_a_recovery_progresses_with_the_changelog_records_of_partitions_still_behind():
    """``recovery_progress`` reads Faust's own Recovery (built offline, its fields set as its recovery loop sets
    them): None when no recovery waits for records; else when it last received a record of a partition still behind
    (its start when none came), and which partitions those are."""
    import faust
    from faust.types import TP

    app = faust.App("compat-recovery-test", broker="kafka://127.0.0.1:1")
    recovery = app.tables.recovery
    behind, done = TP("users-changelog", 0), TP("users-changelog", 1)
    assert compat.recovery_progress(app) is None  # not recovering

    recovery._set_recovery_started()
    started = recovery._recovery_started_at
    recovery.active_highwaters.update({behind: 100, done: 50})
    recovery.active_offsets.update({behind: -1, done: 50})
    progress = compat.recovery_progress(app)
    assert progress is not None and progress.last_at == started  # nothing received yet
    assert progress.behind == ["users-changelog[0] -1/100"]
    recovery._active_events_received_at[done] = started + 25  # a partition that is done does not count
    assert compat.recovery_progress(app).last_at == started  # type: ignore[union-attr]
    recovery._active_events_received_at[behind] = started + 20
    recovery.active_offsets[behind] = 40
    assert compat.recovery_progress(app).last_at == started + 20  # type: ignore[union-attr]
    recovery.active_offsets[behind] = 100  # caught up: nothing to wait for
    assert compat.recovery_progress(app) is None


def test_the_recovery_stall_clock_starts_over_only_at_a_new_consumer_generation():
    """The stall clock starts over at a new consumer generation (a rebalance restarts the recovery) and otherwise runs
    from the recovery's last record: Faust's ``app.rebalancing`` stays true until a recovery completes, so a clock
    held back by it never ran out for a recovery that received nothing (a CI chaos run waited four minutes)."""
    from stream.app import RecoveryWatch

    watch = RecoveryWatch(limit_s=60.0, since=0.0)
    stuck = compat.RecoveryProgress(last_at=10.0, behind=["users-changelog[2] -1/248"])
    assert watch.stalled_for(10.0, 6, stuck) is None  # generation 6 assigned: the clock starts at 10
    assert watch.stalled_for(65.0, 6, stuck) is None  # 55 s without a record
    assert watch.stalled_for(75.0, 6, stuck) == 65.0  # the same generation all along: stalled
    assert watch.stalled_for(80.0, 7, stuck) is None  # a rebalance since: counted from it
    assert watch.stalled_for(141.0, 7, stuck) == 61.0
    moving = compat.RecoveryProgress(last_at=130.0, behind=["users-changelog[2] 120/248"])
    assert watch.stalled_for(141.0, 7, moving) is None  # a record 11 s ago
    assert watch.stalled_for(141.0, 7, None) is None  # no recovery waiting for records


def _fetched(topic: str, rows: list[tuple[bytes | None, bytes | None, int]]) -> list:
    """The records aiokafka's fetcher unpacks from one real record batch of ``rows`` (key, value, timestamp)."""
    from aiokafka.consumer.fetcher import PartitionRecords
    from aiokafka.record.default_records import DefaultRecordBatchBuilder
    from aiokafka.record.memory_records import MemoryRecords
    from aiokafka.structs import TopicPartition

    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=0, is_transactional=0, producer_id=-1, producer_epoch=-1, base_sequence=-1,
        batch_size=1 << 20,
    )  # fmt: skip
    for i, (key, value, ts) in enumerate(rows):
        builder.append(i, timestamp=ts, key=key, value=value, headers=[])
    data = builder.build()
    data[0:8] = (100).to_bytes(8, "big")  # the batch's base offset
    return list(PartitionRecords(TopicPartition(topic, 3), MemoryRecords(bytes(data)), [], 100, None, None, True, 0))


@pytest.fixture
def unpatched_partition_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiokafka's own PartitionRecords constructor and no lean topic, put back afterwards: a create_app earlier in this
    process has wrapped the constructor already, and the patch is process-wide."""
    from aiokafka.consumer.fetcher import PartitionRecords

    aiokafka_own = getattr(PartitionRecords, "_intentstream_init", None) or PartitionRecords.__init__
    monkeypatch.setattr(PartitionRecords, "__init__", aiokafka_own)
    monkeypatch.setattr(PartitionRecords, "_intentstream_init", None, raising=False)
    monkeypatch.setattr(compat, "_LEAN_TOPICS", set())


@pytest.mark.usefixtures("unpatched_partition_records")
def test_the_input_topic_is_unpacked_into_lean_records_and_other_topics_into_consumer_records():
    from aiokafka.consumer.fetcher import PartitionRecords
    from aiokafka.structs import ConsumerRecord

    rows = [(b"u1", b'{"a":1}', 1_700_000_000_000), (None, b"x", 1_700_000_000_001), (b"u2", None, 5)]
    before = _fetched("clicks-lean", rows)
    compat.lean_input_records("clicks-lean")
    wrapped = PartitionRecords.__init__
    compat.lean_input_records("clicks-lean")
    assert PartitionRecords.__init__ is wrapped  # idempotent: one wrapper
    lean, other = _fetched("clicks-lean", rows), _fetched("users-changelog", rows)
    assert [type(r) for r in lean] == [compat.InputRecord] * 3
    assert [type(r) for r in other] == [ConsumerRecord] * 3
    fields = ("topic", "partition", "offset", "timestamp", "key", "value")
    assert (
        [tuple(getattr(r, f) for f in fields) for r in lean]
        == [tuple(getattr(r, f) for f in fields) for r in before]
        == [("clicks-lean", 3, 100 + i, ts, key, value) for i, (key, value, ts) in enumerate(rows)]
    )


@pytest.mark.kafka
@pytest.mark.usefixtures("unpatched_partition_records")
def test_lean_records_under_read_committed_skip_an_aborted_transaction(fresh: Settings):
    """The real broker: a transaction aborted between two committed ones, and a plain record after them, read with
    read_committed (the worker's isolation under exactly-once) through the patched fetcher. Only the committed and
    plain records come, as InputRecords with the offsets the broker gave them (the aborted records and the
    transactions' markers hold offsets between them), and nothing of the aborted transaction."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition

    from stream.topics import ensure_topics, kafka_client_kwargs

    ensure_topics(fresh)  # the input topic as the worker makes it (the producer would have the broker auto-create it)
    topic = fresh.topic_clickstream
    tp = TopicPartition(topic, 0)

    async def run() -> tuple[dict[bytes, int], list]:
        kwargs = kafka_client_kwargs(fresh)
        txn = AIOKafkaProducer(**kwargs, transactional_id=f"{fresh.app_id}-txn", acks="all", enable_idempotence=True)
        plain = AIOKafkaProducer(**kwargs, acks="all", enable_idempotence=True)
        offsets: dict[bytes, int] = {}
        await txn.start()
        try:
            for outcome, values in (("commit", [b"c1", b"c2"]), ("abort", [b"a1", b"a2", b"a3"]), ("commit", [b"c3"])):
                await txn.begin_transaction()
                for v in values:
                    offsets[v] = (await txn.send_and_wait(topic, key=b"u", value=v, partition=0)).offset
                await (txn.commit_transaction() if outcome == "commit" else txn.abort_transaction())
        finally:
            await txn.stop()
        await plain.start()
        try:
            offsets[b"p1"] = (await plain.send_and_wait(topic, key=b"u", value=b"p1", partition=0)).offset
        finally:
            await plain.stop()
        compat.lean_input_records(topic)
        consumer = AIOKafkaConsumer(
            **kwargs, isolation_level="read_committed", enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            consumer.assign([tp])
            got: list = []
            deadline = asyncio.get_running_loop().time() + 30
            while len(got) < 4 and asyncio.get_running_loop().time() < deadline:
                got += (await consumer.getmany(tp, timeout_ms=500)).get(tp, [])
            got += (await consumer.getmany(tp, timeout_ms=1000)).get(tp, [])  # nothing more may come
            return offsets, got
        finally:
            await consumer.stop()

    offsets, got = asyncio.run(run())
    assert offsets[b"a1"] > offsets[b"c2"] + 1  # the first transaction's commit marker lies between
    assert [type(r) for r in got] == [compat.InputRecord] * 4
    assert [(r.topic, r.partition, r.offset, r.key, r.value) for r in got] == [
        (topic, 0, offsets[v], b"u", v) for v in (b"c1", b"c2", b"c3", b"p1")
    ]


@pytest.mark.kafka
def test_a_closed_batch_waits_in_the_producer_until_the_loop_gives_its_sender_turns(fresh: Settings):
    """The real broker and aiokafka's producer: a record batch handed over stays in the producer's accumulator
    (``has_unsent_batches``) until the event loop gives its sender a turn; ``let_requests_out`` gives it turns until
    the sender has taken it into a request, which the broker then acknowledges."""
    from aiokafka import AIOKafkaProducer

    from stream.delivery import Sent, let_requests_out
    from stream.topics import ensure_topics, kafka_client_kwargs

    ensure_topics(fresh)

    async def run() -> tuple[bool, bool, int]:
        producer = AIOKafkaProducer(**kafka_client_kwargs(fresh), acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(fresh.topic_intent, b"warm", partition=0)  # metadata and connection ready
            batch = producer.create_batch()
            batch.append(key=b"u", value=b"v", timestamp=None)
            batch.close()
            acked = await producer.send_batch(batch, fresh.topic_intent, partition=0)
            handed = [(fresh.topic_intent, 0)]
            before = compat.has_unsent_batches(producer, handed)  # handed over, no turn given yet
            await let_requests_out([Sent(producer, handed)])
            after = compat.has_unsent_batches(producer, handed)
            return before, after, (await acked).offset
        finally:
            await producer.stop()

    before, after, offset = asyncio.run(run())
    assert before and not after
    assert offset == 1
