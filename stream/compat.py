"""Every use of Faust's and aiokafka's private members, in one marked place.

The worker depends on internals of the versions below (pinned in pyproject.toml). ``check_internals`` runs
before the app is built and refuses to start, naming the missing attribute in one line, when one of them is
not there (a newer Faust renamed it, say): a patch that silently stopped applying would turn into lost or
repeated records, not an error. Instance attributes are checked where they are first used (``require``).

What is patched, and why (docs/reliability.md, docs/performance.md):
1. Ingest by record batch: Faust's ``Consumer.getmany`` hands records of the input topic over as whole fetched
   batches (``IngestHook``), raw records, not one ``Message``, ``Event``, queue hop and sensor call each; aiokafka's
   fetcher unpacks them into tuples, not ConsumerRecords (``lean_input_records``).
2. The worker consumer's fetch wait (Faust hard-codes 1500 ms) and fetch min bytes (the broker fills the fetches).
3. Exactly-once table recovery reads the changelogs' end offsets from the broker.
4. The consumer's commit asks ``stream.offsets`` which offsets to commit (records are never acked to Faust).
5. Outputs go out with aiokafka's producers: the transactional producer of the source partition under
   exactly-once (faust-streaming issue #177), the plain one otherwise; the scoring loop gives their senders turns
   until the accumulator has no batch left to send (``has_unsent_batches``).
6. State writes go to the partition's RocksDB as one WriteBatch, and the table's key index learns each key; the
   table's RocksDB has no write-ahead log (the changelog is the durable copy, as in Kafka Streams), and a store is
   flushed before Faust lets go of it (a revocation, the stop).
7. prometheus_client: a histogram takes a batch's latencies in one call (it observes one value at a time).
8. A table recovery's progress (when it last received a changelog record), for the worker to leave a recovery that
   stalled.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger("intentstream.worker")

FAUST_VERSION = "0.15.3"
AIOKAFKA_VERSION = "0.14.0"


class CompatError(RuntimeError):
    """A Faust or aiokafka internal the worker patches is missing."""


def _versions() -> str:
    from importlib.metadata import version

    return f"faust-streaming {version('faust-streaming')}, aiokafka {version('aiokafka')}"


def require(obj: Any, name: str) -> Any:
    """``getattr(obj, name)``, or a CompatError that names the missing attribute."""
    try:
        return getattr(obj, name)
    except AttributeError:
        owner = obj.__name__ if isinstance(obj, type) else type(obj).__name__
        raise CompatError(
            f"{owner}.{name} is missing ({_versions()} installed; the worker is written against faust-streaming "
            f"{FAUST_VERSION} and aiokafka {AIOKAFKA_VERSION}: install those, `pip install -e .`)"
        ) from None


def check_internals() -> None:
    """Refuse to start when a class-level internal the worker patches or calls is missing."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.consumer.fetcher import PartitionRecords
    from aiokafka.producer import AIOKafkaProducer
    from faust.stores.rocksdb import Store
    from faust.tables.recovery import Recovery
    from faust.transport.consumer import Consumer
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    needed: list[tuple[type, str]] = [
        (Consumer, "getmany"),
        (Consumer, "_wait_next_records"),
        (Consumer, "perform_seek"),
        (Consumer, "_filter_tps_with_pending_acks"),
        (Consumer, "_filter_committable_offsets"),
        (Consumer, "seek_wait"),
        (Consumer, "flow_active"),
        (AIOKafkaConsumerThread, "_highwaters"),
        (AIOKafkaConsumerThread, "_create_worker_consumer"),
        (AIOKafkaConsumerThread, "_ensure_consumer"),
        (AIOKafkaConsumer, "position"),
        (PartitionRecords, "_consumer_record"),
        (AIOKafkaProducer, "create_batch"),
        (AIOKafkaProducer, "send_batch"),
        (Store, "_db_for_partition"),
        (Store, "_open_for_partition"),
        (Store, "stop"),
        (Store, "revoke_partitions"),
        (Recovery, "_recovery_started_at"),
        (Recovery, "active_remaining"),
    ]
    for cls, name in needed:
        require(cls, name)


# ---- 1. ingest by record batch --------------------------------------------------------------------------------


class InputRecord(NamedTuple):
    """A record of the input topic as the fetcher hands it over (``lean_input_records``): what the engine reads of
    aiokafka's ConsumerRecord (``stream.engine.Record``)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


def lean_input_records(topic: str) -> None:
    """Make aiokafka's fetcher unpack the records of ``topic`` into ``InputRecord`` tuples instead of ConsumerRecords.

    aiokafka builds a ConsumerRecord per record in Faust's consumer thread (``PartitionRecords._consumer_record``):
    a dataclass with a ``__dict__`` and eleven fields, its headers copied into a tuple, and the scoring loop frees it
    with the batch. The engine reads six of them. The tuple costs the consumer thread, which holds the GIL the
    scoring loop needs, about a third less per record (0.69 against 1.06 us unpacking a fetch, in process; not
    shown end to end: docs/performance.md, seventeenth pass). Only the per-record constructor is swapped, on each
    fetched partition's records object before it unpacks anything: transactions, control batches and offsets are
    aiokafka's as ever. The records of other topics (the changelog a recovery reads) stay ConsumerRecords, and so do
    the input's when the consumer has deserializers (Faust's worker consumer has none: raw bytes). The patch is
    process-wide: any consumer of this process reading ``topic`` without deserializers gets the tuples."""
    from aiokafka.consumer.fetcher import PartitionRecords

    _LEAN_TOPICS.add(topic)
    if getattr(PartitionRecords, "_intentstream_init", None) is not None:
        return
    require(PartitionRecords, "_consumer_record")
    aiokafka_init = PartitionRecords.__init__
    PartitionRecords._intentstream_init = aiokafka_init
    tuple_new = tuple.__new__

    def input_record(tp: Any, record: Any) -> InputRecord:
        return tuple_new(
            InputRecord, (tp.topic, tp.partition, record.offset, record.timestamp, record.key, record.value)
        )

    def init_with_input_records(self: Any, *args: Any, **kwargs: Any) -> None:
        aiokafka_init(self, *args, **kwargs)
        raw = require(self, "_key_deserializer") is None and require(self, "_value_deserializer") is None
        if raw and require(self, "_tp").topic in _LEAN_TOPICS:
            self._consumer_record = input_record  # read by _unpack_records per record, before the class's method

    PartitionRecords.__init__ = init_with_input_records


_LEAN_TOPICS: set[str] = set()


@dataclass(slots=True)
class FetchedBatch:
    """The input topic's records of one fetch, per partition, in offset order: ``InputRecord`` tuples
    (``lean_input_records``), or aiokafka ConsumerRecords."""

    generation_id: int  # the consumer generation when it was fetched (a rebalance since makes it stale)
    records: dict[int, list[Any]]  # partition -> records


HandOver = Callable[[FetchedBatch], Awaitable[None]]


def divert_input_topic(app: Any, topic: str, hand_over: HandOver) -> None:
    """Make the app's consumer hand every fetched batch of ``topic`` to ``hand_over`` (awaited: a bounded queue
    there holds the fetcher back), and every other record (table changelogs during recovery) to Faust as usual.

    Faust's ``getmany`` turns each record into a ``ConsumerMessage`` and yields it to ``_drain_messages``, which
    awaits the conductor's callback per record (an ``Event`` per subscribed stream, a queue put, sensors). For
    the input topic that per-record path cost more than the whole engine (docs/performance.md). The patch is on
    the class, checks a marker on the app and otherwise behaves as Faust's own, so other apps are unaffected."""
    from faust.transport.consumer import Consumer

    app._intentstream_ingest = (topic, hand_over)
    if getattr(Consumer, "_intentstream_getmany", None) is not None:
        return
    faust_getmany = require(Consumer, "getmany")
    Consumer._intentstream_getmany = faust_getmany  # type: ignore[attr-defined]

    async def getmany(self: Any, timeout: float) -> Any:
        hook = getattr(self.app, "_intentstream_ingest", None)
        if hook is None:
            async for pair in faust_getmany(self, timeout):
                yield pair
            return
        our_topic, deliver = hook
        # From here on, Faust's getmany (faust/transport/consumer.py) with the input topic taken out.
        records, active_partitions = await self._wait_next_records(timeout)
        generation_id = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return
        if not self.flow_active:
            try:
                await self.perform_seek()
            except Exception as exc:
                self.log.warning(f"exception performing seek when flow not active {exc}")
            return
        buffered = self._buffered_partitions
        ours: dict[int, list[Any]] = {}
        for tp in [tp for tp in records if tp.topic == our_topic]:
            batch = records.pop(tp)
            if batch and (active_partitions is None or tp in active_partitions or tp in buffered):
                ours[tp.partition] = batch
        if ours:
            await deliver(FetchedBatch(generation_id, ours))
        if not records:
            return
        to_message = self._to_message
        for tp, record in self.scheduler.iterate(records):
            if not self.flow_active or self.app.consumer_generation_id != generation_id:
                break
            if active_partitions is None or tp in active_partitions or tp in buffered:
                self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                yield tp, to_message(tp, record)

    Consumer.getmany = getmany  # type: ignore[method-assign]


# ---- 2. fetch wait and min bytes -------------------------------------------------------------------------------


def bound_fetch_wait(ms: int, min_bytes: int | None = None) -> None:
    """Faust builds its worker consumer with ``fetch_max_wait_ms=1500``, hard-coded. aiokafka keeps one fetch in
    flight per broker, and a fetch that holds only partitions without new data (the assignor's topic, an idle
    changelog) waits those 1.5 s at the broker while the input partitions cannot be fetched: under paced
    traffic that wait was the latency (p99 981 -> 177 ms at 500 ev/s with 100 ms, docs/performance.md).

    ``min_bytes`` (``fetch_min_bytes``; None keeps aiokafka's 1 byte) makes the broker hold a fetch until it has
    that much for us or the wait has passed: under paced traffic each fetch then costs the consumer thread, the
    thread hops and Faust's hand-over once for hundreds of records instead of dozens. Calling this again replaces the
    earlier values: the wrapper always wraps Faust's own method, once."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    create = getattr(AIOKafkaConsumerThread, "_faust_create_worker_consumer", None)
    if create is None:
        create = require(AIOKafkaConsumerThread, "_create_worker_consumer")
        AIOKafkaConsumerThread._faust_create_worker_consumer = create  # type: ignore[attr-defined]

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        # Both are read by AIOKafkaConsumer.start() when it builds its fetcher.
        require(consumer, "_fetch_max_wait_ms")
        consumer._fetch_max_wait_ms = ms
        if min_bytes is not None:
            require(consumer, "_fetch_min_bytes")
            consumer._fetch_min_bytes = min_bytes
        return consumer

    AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer  # type: ignore[method-assign]


# ---- 3. exactly-once table recovery -----------------------------------------------------------------------------


def use_broker_highwaters() -> None:
    """Exactly-once: let table recovery ask the broker for the changelogs' last stable offsets.

    Faust reads them from the consumer's fetch state (``last_stable_offset``), unknown (None) until a partition
    has been fetched, i.e. always at the start of a recovery: a restarted worker then skipped restoring its
    tables, and a rebalance crashed it with ConsistencyError ("persisted offset ... higher than ... -1").
    ``end_offsets`` on a read_committed consumer (Faust's under exactly-once) returns the same offsets, from
    the broker."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    async def _highwaters(self: Any, partitions: list[Any]) -> Any:
        return await self._ensure_consumer().end_offsets(partitions)

    AIOKafkaConsumerThread._highwaters = _highwaters  # type: ignore[method-assign]


# ---- 4. offset commits -----------------------------------------------------------------------------------------


def consumer_commit_hooks(
    consumer: Any,
    committable: Callable[[Any, Any], dict[Any, int]],
    wrap_commit: Callable[[Callable[..., Awaitable[bool]]], Callable[..., Awaitable[bool]]],
    wrap_revoke: Callable[[Callable[[set], Awaitable[None]]], Callable[[set], Awaitable[None]]],
) -> None:
    """Faust's commit asks ``_filter_tps_with_pending_acks`` and ``_filter_committable_offsets`` which partitions
    and offsets to commit; ``committable(tps, last_committed)`` answers both. ``wrap_commit`` and ``wrap_revoke``
    wrap every commit (the commit timer, rebalances, the stop) and the revocation handler."""
    if getattr(consumer, "_intentstream_guarded", False):
        return
    last_committed = require(consumer, "_committed_offset")
    require(consumer, "_filter_tps_with_pending_acks")

    def committable_offsets(tps: Any = None) -> dict[Any, int]:
        return committable(consumer.assignment() if tps is None else tps, last_committed)

    consumer._filter_tps_with_pending_acks = lambda topics=None: list(committable_offsets())
    consumer._filter_committable_offsets = committable_offsets
    consumer.commit = wrap_commit(consumer.commit)
    consumer.on_partitions_revoked = wrap_revoke(consumer.on_partitions_revoked)
    consumer._intentstream_guarded = True


async def commit_transaction(app: Any, offsets: dict[Any, int]) -> None:
    """Exactly-once: commit ``offsets`` in the open transactions of their partitions, start new ones, and tell the
    tables (Faust's own commit path, for a revocation that must not wait for the next commit)."""
    await app.consumer.transactions.commit(offsets, start_new_transaction=True)
    app.tables.on_commit(offsets)


# ---- 5. output producers ---------------------------------------------------------------------------------------


def plain_producer(app: Any) -> Any:
    """The app's aiokafka producer (at-least-once)."""
    return require(app.producer, "_ensure_producer")()


def has_unsent_batches(producer: Any, topic_partitions: Iterable[tuple[str, int]]) -> bool:
    """Whether an aiokafka producer holds a record batch of these topic-partitions that its sender has not yet taken
    into a produce request (its accumulator's queues, keyed by TopicPartition, a NamedTuple equal to the plain
    tuple; a partition's queue is dropped once empty). An instance attribute: a renamed one fails the first batch,
    with the name, as ``require`` does."""
    queued = require(require(producer, "_message_accumulator"), "_batches")
    return any(tp in queued for tp in topic_partitions)


def transactional_producers(app: Any) -> dict[str, Any]:
    """Exactly-once: Faust's transactional aiokafka producers by transactional id (``{app}-{group}-{partition}``)."""
    return require(app.producer, "_transaction_producers")


# ---- 6. table writes -------------------------------------------------------------------------------------------


def partition_db(table: Any, partition: int) -> Any:
    """The RocksDB (rocksdict Rdict) of one partition of a table."""
    return require(table.data, "_db_for_partition")(partition)


def write_partition(table: Any, partition: int, items: Iterable[tuple[bytes, bytes]]) -> None:
    """Put ``items`` into one partition's RocksDB as one WriteBatch (one write), and tell the
    table's key index where each key lives (what Faust's ``Store._set`` does per key, through a context variable
    holding the current event)."""
    from rocksdict import WriteBatch

    store = table.data
    key_index = require(store, "_key_index")
    batch = WriteBatch(raw_mode=True)
    for key, value in items:
        batch.put(key, value)
        key_index[key] = partition
    partition_db(table, partition).write(batch)


def disable_table_wal(table: Any) -> None:
    """Open every partition's RocksDB of ``table`` with its write-ahead log off, for every write through it (ours,
    and Faust's recovery and persisted offsets): the changelog is the durable copy of the table, as in Kafka Streams'
    RocksDBStore, and the log doubled the cost of a state write (6.7 against 2.9 us a 2.6-KB state, measured).

    Why a crash stays safe: with every write unlogged, a store that crashed comes back as it was at its last memtable
    flush, a prefix of its writes; the changelog offset it holds (written after the states that offset covers) is
    in the same prefix, so the recovery replays from there every state the crash took. Mixing logged writes after
    unlogged ones would break that (the log would restore later writes over a gap), hence the option set when a
    partition's store is opened, before anything is written through it. The patch is on the class and checks a marker
    on the table, so other tables keep Faust's behaviour."""
    from faust.stores.rocksdb import Store

    table._intentstream_no_wal = True
    if getattr(Store, "_intentstream_open_for_partition", None) is not None:
        return
    faust_open = require(Store, "_open_for_partition")
    Store._intentstream_open_for_partition = faust_open  # type: ignore[attr-defined]

    def open_for_partition(self: Any, partition: int) -> Any:
        db = faust_open(self, partition)
        if getattr(self.table, "_intentstream_no_wal", False):
            from rocksdict import WriteOptions

            options = WriteOptions()
            options.disable_wal = True  # type: ignore[method-assign,assignment]  # a property; the stub says method
            db.set_write_options(options)
        return db

    Store._open_for_partition = open_for_partition  # type: ignore[method-assign]

    # Faust lets go of a store when its partition is revoked and when the table stops, without closing it (RocksDB
    # would flush it when the object is freed, whenever that is): flushed first, so that what it holds is on disk.
    faust_stop, faust_revoke = require(Store, "stop"), require(Store, "revoke_partitions")

    async def stop(self: Any) -> None:
        if getattr(self.table, "_intentstream_no_wal", False):
            log.info("event=stores_flushed reason=stop partitions=%d", _flush_dbs(self._dbs.values()))
        await faust_stop(self)

    def revoke_partitions(self: Any, table: Any, tps: Any) -> None:
        if getattr(self.table, "_intentstream_no_wal", False):
            revoked = {tp.partition for tp in tps if tp.topic in table.changelog_topic.topics}
            _flush_dbs([db for partition, db in self._dbs.items() if partition in revoked])
        faust_revoke(self, table, tps)

    Store.stop = stop  # type: ignore[method-assign]
    Store.revoke_partitions = revoke_partitions  # type: ignore[method-assign]


def _flush_dbs(dbs: Iterable[Any], wait: bool = True) -> int:
    n = 0
    for db in dbs:
        db.flush(wait)
        n += 1
    return n


def flush_table(table: Any, wait: bool = True) -> int:
    """Flush the memtables of every open partition store of ``table`` (without a write-ahead log, what is only in
    memory would be read back from the changelog after a crash); ``wait=False`` only starts the flushes (RocksDB's
    background thread writes them). Returns the stores flushed."""
    return _flush_dbs(list(require(table.data, "_dbs").values()), wait)


# ---- 7. metrics --------------------------------------------------------------------------------------------------


def observe_many(histogram: Any, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, with one bucket count per batch: what ``Histogram.observe`` does
    (a value goes to the first bucket whose upper bound holds it, and into the sum), a lock taken per bucket
    instead of per value."""
    if not len(values):
        return
    require(histogram, "_raise_if_not_observable")()
    bounds, buckets, total = (require(histogram, n) for n in ("_upper_bounds", "_buckets", "_sum"))
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))
    total.inc(float(values.sum()))


# ---- 8. table recovery ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecoveryProgress:
    """A table recovery under way that still waits for changelog records."""

    last_at: float  # when it last received a record of a partition still behind (its start if none came yet)
    behind: list[str]  # those partitions, as "topic[partition] offset/highwater"


def recovery_progress(app: Any) -> RecoveryProgress | None:
    """The progress of the table recovery under way (``time.monotonic``'s clock, the one Faust's recovery keeps), or
    None when no recovery waits for records."""
    recovery = app.tables.recovery
    if not recovery.in_recovery:
        return None
    started = require(recovery, "_recovery_started_at")
    behind = [tp for tp, remaining in recovery.active_remaining().items() if remaining > 0]
    if started is None or not behind:
        return None
    received = require(recovery, "_active_events_received_at")
    offsets, highwaters = recovery.active_offsets, recovery.active_highwaters
    return RecoveryProgress(
        max([started, *(received[tp] for tp in behind if tp in received)]),
        [f"{tp.topic}[{tp.partition}] {offsets[tp]}/{highwaters[tp]}" for tp in behind],
    )
