"""The at-least-once commit of stream/delivery.py, with a fake producer whose acknowledgements the test gives: the
batch lock is free while the commit waits for its changelog, batches written meanwhile are not in the offsets it
commits, and a changelog record that fails commits nothing. (The whole protocol against the real broker, crashes
included: tests/test_worker.py and tests/test_chaos.py.)"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from faust.types import TP

from stream.delivery import SEND_TURNS, Delivery, DeliveryError, commit_at_least_once
from stream.engine import BatchResult, InRecord, Output
from stream.offsets import InputOffsets
from stream.settings import Settings


class FakeBatch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes]] = []
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def append(self, *, key: bytes | None, value: bytes, timestamp: None) -> int:
        self.records.append((key, value))
        return len(self.records)


class FakeProducer:
    """aiokafka's batch API; every sent batch waits for the test to acknowledge it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, list[tuple[bytes | None, bytes]], asyncio.Future]] = []
        # aiokafka's accumulator: record batches its sender has not taken into a request (``hold``: they stay there
        # until the test takes them; otherwise they are taken at once)
        self._message_accumulator = SimpleNamespace(_batches={})
        self.hold = False

    def _ensure_producer(self) -> FakeProducer:
        return self

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> asyncio.Future:
        assert batch.closed, "a batch handed over open lingers in aiokafka's accumulator"
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.sent.append((topic, partition, batch.records, fut))
        if self.hold:
            self._message_accumulator._batches.setdefault((topic, partition), []).append(batch)
        return fut

    def acknowledge(self, topic: str) -> int:
        n = 0
        for t, partition, _records, fut in self.sent:
            if t == topic and not fut.done():
                fut.set_result(type("Meta", (), {"topic_partition": TP(t, partition), "offset": 0})())
                n += 1
        return n

    def fail(self, topic: str) -> None:
        for t, _, _, fut in self.sent:
            if t == topic and not fut.done():
                fut.set_exception(RuntimeError("broker gone"))


class FakeStore:
    def __init__(self) -> None:
        self._key_index: dict[bytes, int] = {}
        self.written: list[tuple[int, Any]] = []
        self.persisted: dict[Any, int] = {}

    def _db_for_partition(self, partition: int) -> Any:
        store = self

        class Db:
            def write(self, batch: Any) -> None:
                store.written.append((partition, batch))

        return Db()

    def set_persisted_offset(self, tp: Any, offset: int) -> None:
        self.persisted[tp] = offset


class FakeTable:
    def __init__(self) -> None:
        self.data = FakeStore()
        self.changelog_topic = type("Topic", (), {"get_topic_name": lambda self: "users-changelog"})()


def _batch(settings: Settings, offset: int, user: str) -> BatchResult:
    rec = InRecord(user.encode(), b"{}", settings.topic_clickstream, 0, offset, 0)
    result = BatchResult()
    result.outputs.append(Output(settings.topic_intent, rec.key, b'{"intent":1}', rec))
    result.states[user] = (f"state of {user} at {offset}".encode(), rec)
    return result


def _setup() -> tuple[Settings, FakeProducer, Delivery, InputOffsets]:
    settings = Settings.from_env({})
    producer = FakeProducer()
    app = type("App", (), {"producer": producer})()
    delivery = Delivery(app, FakeTable(), settings, exactly_once=False)
    offsets = InputOffsets(settings, read_committed=False)
    offsets.done[0] = 0
    delivery.on_written = lambda last: [offsets.written(p, o) for p, o in last.items()]
    return settings, producer, delivery, offsets


class Recorder:
    """A consumer commit that records the offsets it would commit."""

    def __init__(self, settings: Settings, offsets: InputOffsets) -> None:
        self.tp, self.offsets, self.committed = TP(settings.topic_clickstream, 0), offsets, []

    async def __call__(self) -> bool:
        self.committed.append(self.offsets.committable([self.tp], {}))
        return True


async def _until_changelog_sent(producer: FakeProducer) -> None:
    for _ in range(100):
        await asyncio.sleep(0)
        if any(t == "users-changelog" for t, *_ in producer.sent):
            return


def test_commit_waits_for_its_changelog_without_the_batch_lock_and_covers_only_what_it_waited_for():
    async def scenario() -> None:
        settings, producer, delivery, offsets = _setup()
        lock = asyncio.Lock()
        commit = Recorder(settings, offsets)
        committed, tp = commit.committed, commit.tp

        async with lock:
            await delivery.start_batch(_batch(settings, 9, "u1"), {0: 9})  # records up to offset 9
        producer.acknowledge(settings.topic_intent)
        async with lock:
            await delivery.complete()  # written: u1's changelog record queued, offsets up to 9 committable
            await delivery.start_batch(_batch(settings, 14, "u3"), {0: 14})  # in flight: its outputs not acknowledged
        task = asyncio.ensure_future(commit_at_least_once(delivery, offsets, lock, commit))
        await _until_changelog_sent(producer)
        assert [r for t, _, r, _ in producer.sent if t == "users-changelog"] == [[(b"u1", b"state of u1 at 9")]]
        assert not lock.locked() and not task.done()  # waiting for the changelog, the lock free for batches

        producer.acknowledge(settings.topic_intent)
        async with lock:  # batches written while the commit waits
            await delivery.start_batch(_batch(settings, 19, "u2"), {0: 19})
        producer.acknowledge(settings.topic_intent)
        async with lock:
            await delivery.complete()
        assert offsets.done[0] == 20
        assert producer.acknowledge("users-changelog") == 1
        assert await asyncio.wait_for(task, 10) is True
        # not 15 or 20: the states of those batches were written after the changelog records it waited for
        assert committed == [{TopicPartition(settings.topic_clickstream, 0): 10}]
        assert offsets.pinned is None
        assert offsets.committable([tp], {}) == {TopicPartition(settings.topic_clickstream, 0): 20}
        assert delivery.pending[0] == {b"u3": b"state of u3 at 14", b"u2": b"state of u2 at 19"}

    asyncio.run(scenario())


def test_states_are_written_to_the_store_once_a_commit_and_read_from_memory_until_then(monkeypatch):
    """A user's states of several batches reach RocksDB once, at the commit, as its last state, before its changelog
    record is sent; until then readers find the newest one in memory (the batch in flight's, then the queued one)."""
    from stream import delivery as delivery_module

    async def scenario() -> None:
        settings, producer, delivery, offsets = _setup()
        writes: list[tuple[int, dict[bytes, bytes], int]] = []  # partition, states, changelog batches sent before
        monkeypatch.setattr(
            delivery_module.compat,
            "write_partition",
            lambda _table, partition, items: writes.append(
                (partition, dict(items), sum(t == "users-changelog" for t, *_ in producer.sent))
            ),
        )
        lock = asyncio.Lock()
        commit = Recorder(settings, offsets)
        assert delivery.unwritten_state("u1", 0) is None
        for offset in (3, 5):
            await delivery.start_batch(_batch(settings, offset, "u1"), {0: offset})
            assert delivery.unwritten_state("u1", 0) == f"state of u1 at {offset}".encode()  # in flight
            producer.acknowledge(settings.topic_intent)
        await delivery.start_batch(_batch(settings, 6, "u2"), {0: 6})
        producer.acknowledge(settings.topic_intent)
        await delivery.complete()
        assert writes == []  # queued, not written
        assert delivery.unwritten_state("u1", 0) == b"state of u1 at 5"  # queued, the last state only
        assert delivery.unwritten_state("u1") == b"state of u1 at 5"  # any partition
        assert delivery.unwritten_state("u1", 1) is None  # not that partition's

        task = asyncio.ensure_future(commit_at_least_once(delivery, offsets, lock, commit))
        await _until_changelog_sent(producer)
        # one write of each user's last state, before any changelog record was sent
        assert writes == [(0, {b"u1": b"state of u1 at 5", b"u2": b"state of u2 at 6"}, 0)]
        assert delivery.unwritten_state("u1", 0) is None  # in the store now
        producer.acknowledge("users-changelog")
        assert await asyncio.wait_for(task, 10) is True
        assert commit.committed == [{TopicPartition(settings.topic_clickstream, 0): 7}]

    asyncio.run(scenario())


def test_a_state_write_that_fails_commits_nothing_and_keeps_the_states_queued(monkeypatch):
    from stream import delivery as delivery_module

    async def scenario() -> None:
        settings, producer, delivery, offsets = _setup()
        commit = Recorder(settings, offsets)

        def failing_write(_table: Any, partition: int, _items: Any) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(delivery_module.compat, "write_partition", failing_write)
        await delivery.start_batch(_batch(settings, 4, "u1"), {0: 4})
        producer.acknowledge(settings.topic_intent)
        await delivery.complete()
        with pytest.raises(DeliveryError, match="disk full"):
            await asyncio.wait_for(commit_at_least_once(delivery, offsets, asyncio.Lock(), commit), 10)
        assert commit.committed == [] and not [t for t, *_ in producer.sent if t == "users-changelog"]
        assert delivery.unwritten[0] == delivery.pending[0] == {b"u1": b"state of u1 at 4"}  # nothing taken
        assert delivery.unwritten_state("u1", 0) == b"state of u1 at 4"

    asyncio.run(scenario())


def test_past_the_bound_states_are_written_between_commits_and_their_changelog_waits(monkeypatch):
    """With a million users few repeat within a commit: the store takes the states before the commit (one write of
    them all would stall the scoring loop), and their changelog records still wait for it."""
    from stream import delivery as delivery_module

    async def scenario() -> None:
        settings, producer, delivery, _offsets = _setup()
        writes: list[dict[bytes, bytes]] = []
        monkeypatch.setattr(delivery_module, "MAX_UNWRITTEN", 1)
        monkeypatch.setattr(
            delivery_module.compat, "write_partition", lambda _table, _partition, items: writes.append(dict(items))
        )
        await delivery.start_batch(_batch(settings, 4, "u1"), {0: 4})
        producer.acknowledge(settings.topic_intent)
        await delivery.start_batch(_batch(settings, 5, "u2"), {0: 5})  # completes u1's batch: one queued, not past
        producer.acknowledge(settings.topic_intent)
        assert writes == []
        await delivery.complete()  # two queued: past the bound
        assert writes == [{b"u1": b"state of u1 at 4", b"u2": b"state of u2 at 5"}]
        assert delivery.unwritten_state("u2", 0) is None  # in the store now
        assert delivery.pending[0] == {b"u1": b"state of u1 at 4", b"u2": b"state of u2 at 5"}
        assert not [t for t, *_ in producer.sent if t == "users-changelog"]

    asyncio.run(scenario())


def test_a_changelog_record_that_fails_commits_nothing():
    async def scenario() -> None:
        settings, producer, delivery, offsets = _setup()
        lock = asyncio.Lock()
        commits: list[int] = []

        async def commit() -> bool:
            commits.append(1)
            return True

        async with lock:
            await delivery.start_batch(_batch(settings, 4, "u1"), {0: 4})
        producer.acknowledge(settings.topic_intent)
        async with lock:
            await delivery.complete()
        task = asyncio.ensure_future(commit_at_least_once(delivery, offsets, lock, commit))
        await _until_changelog_sent(producer)
        producer.fail("users-changelog")
        with pytest.raises(DeliveryError, match="broker gone"):
            await asyncio.wait_for(task, 10)
        assert commits == []

    asyncio.run(scenario())


def test_a_batch_in_flight_whose_outputs_are_acknowledged_is_in_the_commit():
    async def scenario() -> None:
        settings, producer, delivery, offsets = _setup()
        lock = asyncio.Lock()
        commit = Recorder(settings, offsets)
        committed = commit.committed

        async with lock:
            await delivery.start_batch(_batch(settings, 7, "u1"), {0: 7})
        producer.acknowledge(settings.topic_intent)  # acknowledged, not yet written
        task = asyncio.ensure_future(commit_at_least_once(delivery, offsets, lock, commit))
        await _until_changelog_sent(producer)
        assert delivery.inflight is None and [
            k for t, _, r, _ in producer.sent for k, _ in r if t != settings.topic_intent
        ] == [b"u1"]
        producer.acknowledge("users-changelog")
        assert await asyncio.wait_for(task, 10) is True
        assert committed == [{TopicPartition(settings.topic_clickstream, 0): 8}]

    asyncio.run(scenario())


def test_a_changelog_send_that_failed_unawaited_blocks_every_later_commit():
    """A send past MAX_PENDING_CHANGELOG is not awaited by the batch that made it; its failure must still stop the
    next commit from covering the offsets whose states it carried."""

    async def scenario() -> None:
        settings, producer, delivery, offsets = _setup()
        lock = asyncio.Lock()
        commit = Recorder(settings, offsets)
        async with lock:
            await delivery.start_batch(_batch(settings, 3, "u1"), {0: 3})
        producer.acknowledge(settings.topic_intent)
        async with lock:
            await delivery.complete()
            await delivery.send_changelog()  # as complete() does past the bound
        producer.fail("users-changelog")
        await asyncio.sleep(0)
        assert not delivery.unacked  # the failed future is gone from what a commit would wait for
        with pytest.raises(DeliveryError, match="not acknowledged"):
            await asyncio.wait_for(commit_at_least_once(delivery, offsets, lock, commit), 10)
        with pytest.raises(DeliveryError, match="not acknowledged"):
            await asyncio.wait_for(delivery.flush(), 10)
        assert commit.committed == []

    asyncio.run(scenario())


def test_a_changelog_acknowledgement_after_a_stall_records_no_persisted_offset():
    """A changelog send still in aiokafka's hands when the worker froze lands after the new owner's records; its
    offset must not become the store's persisted one (the next restore would skip the new owner's states): the
    acknowledgement goes through ``before_write``, which ends a stalled worker (here: raises)."""

    class Stalled(Exception):
        pass

    async def scenario() -> None:
        settings, producer, delivery, _offsets = _setup()
        stalled = False

        def before_write() -> None:
            if stalled:
                raise Stalled

        delivery.before_write = before_write
        await delivery.start_batch(_batch(settings, 3, "u1"), {0: 3})
        producer.acknowledge(settings.topic_intent)
        await delivery.complete()
        await delivery.send_changelog()
        stalled = True  # frozen now; the acknowledgement comes after
        loop = asyncio.get_running_loop()
        errors: list[BaseException] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context["exception"]))
        assert producer.acknowledge("users-changelog") == 1
        await asyncio.sleep(0)
        assert [type(e) for e in errors] == [Stalled]
        assert delivery.table.data.persisted == {}

        # the same acknowledgement without a stall is recorded
        stalled = False
        await delivery.start_batch(_batch(settings, 4, "u2"), {0: 4})
        producer.acknowledge(settings.topic_intent)
        await delivery.complete()
        await delivery.send_changelog()
        producer.acknowledge("users-changelog")
        await asyncio.sleep(0)
        assert delivery.table.data.persisted == {TP("users-changelog", 0): 0}

    asyncio.run(scenario())


def test_a_closed_record_batch_is_sent_without_lingering_and_an_open_one_lingers():
    """What ``Delivery.send`` relies on in aiokafka (pinned in pyproject.toml): the sender takes a batch handed over by
    ``send_batch`` at once when it is closed, and only after ``linger_ms`` when it is open."""
    from aiokafka.producer.message_accumulator import BatchBuilder, MessageBatch

    async def scenario() -> tuple[float | None, float | None]:
        def batch(closed: bool) -> MessageBatch:
            builder = BatchBuilder(16_384, 0)
            builder.append(timestamp=None, key=b"u1", value=b"{}")
            if closed:
                builder.close()
            return MessageBatch(TopicPartition("t", 0), builder, ttl=30, linger_time=60.0)

        return batch(closed=True).remaining_linger(), batch(closed=False).remaining_linger()

    closed, open_ = asyncio.run(scenario())
    assert closed is None
    assert open_ is not None and open_ > 0


@pytest.mark.parametrize(
    ("setting", "codec"), [("zstd", "zstd"), ("lz4", "lz4"), ("snappy", "snappy"), ("gzip", "gzip"), ("none", None)]
)
def test_the_worker_produces_compressed_record_batches(setting, codec, tmp_path, monkeypatch):
    """INTENTSTREAM_PRODUCER_COMPRESSION reaches the settings every aiokafka producer of the worker is built from
    (Faust's plain producer and, under exactly-once, its transactional ones), and the codec's library is installed
    (aiokafka refuses to build a producer without it). tests/test_worker.py reads zstd outputs back from the broker."""
    import aiokafka.codec

    from tests.helpers import create_app_offline

    s = Settings.from_env(
        {}, producer_compression=setting, state_dir=str(tmp_path / "state"), model_dir=str(tmp_path / "models")
    )
    app = create_app_offline(s, monkeypatch)
    assert app.producer.compression_type == codec
    assert app.producer._settings_default()["compression_type"] == codec  # what Faust builds its producers with
    if codec is not None:
        assert getattr(aiokafka.codec, f"has_{codec}")()


def test_the_worker_keeps_no_standby_replicas(tmp_path, monkeypatch):
    """A standby buffers the changelog records it reads in memory and writes them at the next rebalance; one
    promoted to owner in the chaos scenario started its recovery at the changelog's end without most of them in its
    store (docs/reliability.md, section 3). The worker's partition assignor therefore assigns no standbys: a new
    owner restores from its own store's persisted offset."""
    from tests.helpers import create_app_offline

    s = Settings.from_env({}, state_dir=str(tmp_path / "state"), model_dir=str(tmp_path / "models"))
    app = create_app_offline(s, monkeypatch)
    assert app.conf.table_standby_replicas == 0
    assert app.assignor.replicas == 0


def test_the_worker_producers_take_the_producer_request_timeout(tmp_path, monkeypatch):
    """Faust's producers expire an unacknowledged record batch after 20 minutes (its producer_request_timeout): a
    worker whose batches had no partition leader hung that long with a live event loop (docs/reliability.md). The
    worker's producers take INTENTSTREAM_PRODUCER_REQUEST_TIMEOUT_S (2 minutes, Kafka's delivery.timeout.ms): the
    batch then fails, and a failed batch ends the worker without a commit (tests above)."""
    from tests.helpers import create_app_offline

    s = Settings.from_env(
        {}, producer_request_timeout_s=45.0, state_dir=str(tmp_path / "state"), model_dir=str(tmp_path / "models")
    )
    app = create_app_offline(s, monkeypatch)
    assert app.producer._settings_default()["request_timeout_ms"] == 45_000  # every producer Faust builds
    assert Settings.from_env({}).producer_request_timeout_s == 120.0


def test_a_batch_handed_over_returns_once_its_record_batches_are_taken_into_a_request():
    """start_batch gives the producer's sender turns of the event loop until it has taken the batch's record batches
    (aiokafka's sender needs a few; a scoring loop that never waits for input would give it none until the next batch), and
    no more than SEND_TURNS when they cannot go (its acknowledgements are then awaited at the next batch, as before)."""

    async def scenario() -> None:
        settings, producer, delivery, _offsets = _setup()
        producer.hold = True
        queued = producer._message_accumulator._batches
        turns = {"sender": 0, "taken_at": None}

        async def sender(take_after: int | None) -> None:  # one check a turn, as long as the test runs
            while True:
                await asyncio.sleep(0)
                turns["sender"] += 1
                if take_after is not None and turns["sender"] == take_after and queued:
                    queued.clear()
                    turns["taken_at"] = turns["sender"]

        task = asyncio.ensure_future(sender(take_after=5))
        await delivery.start_batch(_batch(settings, 4, "u1"), {0: 4})
        assert turns["taken_at"] == 5 and not queued  # it waited for the sender
        assert turns["sender"] <= 7  # and returned soon after: one turn to see it, one for the request to be written
        task.cancel()

        producer.acknowledge(settings.topic_intent)  # the batch before, completed by the next start_batch
        turns.update(sender=0, taken_at=None)
        task = asyncio.ensure_future(sender(take_after=None))  # a sender that cannot send (its broker busy)
        await delivery.start_batch(_batch(settings, 5, "u2"), {0: 5})
        assert queued and turns["taken_at"] is None
        assert SEND_TURNS <= turns["sender"] <= SEND_TURNS + 2  # bounded: the batch is scored on regardless
        task.cancel()

    asyncio.run(scenario())
