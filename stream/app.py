"""The Faust app: topics, the RocksDB-backed user table, the scoring loop, timers, and the wiring of the modules
that do the work, in the order of the data: ingest (stream/ingest.py) -> engine (stream/engine.py: state,
batch, score, emit) -> delivery (stream/delivery.py) -> offsets (stream/offsets.py).

Faust gives us the consumer group (workers split the partitions), changelog-backed tables (a moved or restarted
worker recovers its users), the commit timer, and table routing for ``GET /users/{id}/score``. The records of the
input topic do not take Faust's per-record stream path: the consumer hands each fetch over whole
(stream/compat.py, where every use of Faust's and aiokafka's internals lives).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import faust
import torch
from aiokafka import TopicPartition

from models.artifact import resolve_device
from stream import compat, hot_swap, memory, metrics
from stream.delivery import Delivery, DeliveryError, commit_at_least_once
from stream.engine import Engine, Record
from stream.hot_swap import NoModelError, load_model
from stream.ingest import InputQueue, admit
from stream.offsets import InputOffsets
from stream.settings import Settings
from stream.topics import kafka_client_kwargs
from stream.views import register_views

log = logging.getLogger("intentstream.worker")
OFFSET_KEY = b"__faust\0offset__"

__all__ = ["NoModelError", "create_app", "load_model"]


def _broker_credentials(settings: Settings) -> Any:
    kwargs: dict[str, Any] = kafka_client_kwargs(settings)
    if settings.kafka_security_protocol == "PLAINTEXT":
        return None
    if settings.kafka_security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=kwargs.get("ssl_context"),
        )
    return faust.SSLCredentials(kwargs["ssl_context"])


def exit_without_commit(event: str, error: BaseException | None) -> NoReturn:
    """Leave at once, committing nothing: the restarted worker replays from the last commit. (Leaving the scoring
    loop by an exception would let a clean stop commit offsets of a batch whose outputs were not delivered.)"""
    log.critical("event=%s error=%r; exiting without an offset commit", event, error)
    logging.shutdown()
    os._exit(70)


class StallWatch:
    """A worker frozen (SIGSTOP, a VM pause) for longer than its group session is no longer the owner of its
    partitions when it wakes up, but it does not know yet, and under at-least-once nothing fences it: it would
    write the states of the batch in its hands over the newer ones of the new owner (the changelog goes back in
    time for those users), and the acknowledgement of a changelog send that was still in aiokafka's hands would
    move its store's persisted changelog offset past the new owner's records, which its next restore would then
    skip. After such a stall the worker exits rather than write (the owner replays the batch): from the watchdog
    thread as soon as it wakes, before the event loop gets far, and from any write that comes first (``check``).
    A thread keeps the time: it misses its ticks when the whole process is frozen, or when one call holds the GIL
    for longer than the limit (half the session timeout: the member would have expired anyway), not when the event
    loop is merely busy (restoring tables, say). Started with the scoring loop (``start``), not with the app, so
    that building an app (the tests do) leaves no watchdog behind."""

    def __init__(self, limit_s: float, on_stall: Callable[[float], None], period_s: float = 0.25):
        self.limit_s = limit_s
        self.period_s = period_s
        self.on_stall = on_stall
        self.alive_at = time.monotonic()
        self.stalled = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self.alive_at = time.monotonic()
            self._thread = threading.Thread(target=self._tick, name="stall-watchdog", daemon=True)
            self._thread.start()

    def check(self) -> bool:
        if self._thread is not None and time.monotonic() - self.alive_at > self.limit_s:  # frozen, no tick since
            self.stalled = True
        return self.stalled

    def _tick(self) -> None:
        while True:
            time.sleep(self.period_s)
            # One reading of the clock for the test and the new mark: a freeze between two readings would set the
            # mark after the freeze and hide it.
            now = time.monotonic()
            if now - self.alive_at > self.limit_s:
                self.stalled = True
                self.on_stall(now - self.alive_at)  # the worker's ends the process here, before anything else
            self.alive_at = now


def exit_when_done(coro: Any, event: str) -> asyncio.Future:
    """Run a task the worker cannot go on without: when it ends (other than cancelled), the worker leaves."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or exit_without_commit(event, t.exception()))
    return task


def log_if_failed(task: asyncio.Future) -> None:
    """A task the worker goes on without ended: say why if it failed."""
    if not task.cancelled() and task.exception() is not None:
        log.error("event=task_failed", exc_info=task.exception())


def exit_stalled(seconds: float) -> NoReturn:
    """The watchdog's exit: one line written straight to stderr and out, without the logging machinery (whose locks
    and flushes would give the event loop more time to write after the stall)."""
    os.write(2, f"event=stalled seconds={seconds:.1f}; exiting without an offset commit\n".encode())
    os._exit(70)


RECOVERY_CHECK_S = 5.0  # how often the stores' upkeep runs: a recovery's progress checked, a flush when due


@dataclass
class RecoveryWatch:
    """Whether a table recovery has stalled: no changelog record for ``limit_s`` from a partition still behind, counted
    from the latest of the recovery's start, its last record and the last change of consumer generation (a rebalance
    restarts the recovery). Not from Faust's ``app.rebalancing``, which stays true until the recovery completes: a
    stalled recovery then never counted as stalled (a CI chaos run waited four minutes for one)."""

    limit_s: float
    since: float  # when the clock last started over (monotonic)
    generation: int | None = None

    def stalled_for(self, now: float, generation: int, progress: compat.RecoveryProgress | None) -> float | None:
        """Seconds without a record when past the limit, else None."""
        if generation != self.generation:
            self.generation, self.since = generation, now
        if progress is None:
            return None
        stalled = now - max(progress.last_at, self.since)
        return stalled if stalled > self.limit_s else None


GC_YOUNG_THRESHOLD = 50_000  # net container allocations between two collections of the youngest generation


def freeze_startup_objects() -> None:
    """Take what exists once the worker runs (imports, torch, the Faust app, the restored tables) out of the
    cyclic garbage collector's reach. A full collection walked all of it every 4-5 s at 6,000 events/s, 140-180
    ms each time for nothing (batches free their objects by reference counting): those pauses made the p99
    of the seconds they fell in. Measured side by side (the ``gc-freeze`` variant of load_tests/variants.py):
    p99 248 -> 87 ms at 6,000 events/s (docs/performance.md).

    And collect the youngest generation less often. Its threshold counts net container allocations: while a batch
    is built its live objects grow by tens of thousands, so at Python's default (700) dozens of collections a batch
    walked them, found no garbage (a batch frees its objects by reference counting) and promoted them to the older
    generations, which were then walked in turn. A cycle that does become garbage now waits up to 50,000 allocations
    longer (about one batch). Measured against 700: capacity +15% (the ``gc-young-700`` variant; docs/performance.md,
    seventh pass). Python 3.14's incremental collector gives these thresholds another meaning: re-measure there."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    log.info("event=gc_frozen objects=%d young_threshold=%d", gc.get_freeze_count(), GC_YOUNG_THRESHOLD)


def create_app(settings: Settings, *, datadir: Path | None = None) -> faust.App:
    compat.check_internals()
    device = resolve_device(settings.device)
    torch.set_num_threads(max(1, settings.torch_threads))
    engine = Engine(settings, load_model(settings, device), device, hot_swap.load_items(settings))
    hot_swap.announce(engine.model)
    log.info("event=model_loaded name=%s version=%s device=%s", engine.model.name, engine.model.version, device)

    from stream.topics import USERS_TABLE, ensure_topics_async, init_group_offsets

    async def prepare() -> None:
        await ensure_topics_async(settings, changelog=True)  # the changelog before Faust subscribes to it
        await init_group_offsets(settings, settings.app_id, settings.topic_clickstream)

    asyncio.run(prepare())
    compat.bound_fetch_wait(settings.fetch_max_wait_ms, settings.fetch_min_bytes)
    datadir = datadir or settings.state_dir / f"worker-{settings.web_port}"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        # Faust's app id (the group's, the changelog's prefix) is exactly INTENTSTREAM_APP_ID: APP_VERSION above 1 in
        # the environment would make it "{id}-v{version}", and the worker would create, wait for and commit to names
        # Faust does not use (stream.topics.changelog_topic, init_group_offsets)
        version=1,
        broker=[f"kafka://{addr.strip()}" for addr in settings.kafka_bootstrap.split(",")],
        broker_credentials=_broker_credentials(settings),
        store="rocksdb://",
        datadir=str(datadir),
        processing_guarantee=settings.processing_guarantee,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=True,
        # Faust binds to web_bind and advertises canonical_url to the group (table routing of /users/{id}/score): a
        # worker bound to 0.0.0.0 must not advertise 0.0.0.0, or every worker believes it is everyone's owner.
        web_host=urllib.parse.urlsplit(settings.advertised_url).hostname,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        canonical_url=settings.advertised_url,
        web_enabled=True,
        web_in_thread=False,
        consumer_auto_offset_reset="earliest",
        # A fetch handed over holds at most what a batch of a backlog takes (under paced traffic fetches are small
        # anyway); the input queue holds queue_max_events records and at most one fetch more.
        broker_max_poll_records=max(settings.batch_max_events, settings.batch_backlog_events),
        # Records are bytes in and bytes out (orjson, the binary state codec); tables use these defaults.
        key_serializer="raw",
        value_serializer="raw",
        broker_commit_interval=settings.commit_interval_s,
        producer_linger_ms=5,
        producer_compression_type=None if settings.producer_compression == "none" else settings.producer_compression,
        # A record batch per partition per request (aiokafka sends one per partition at a time, and a partition's
        # next batch waits until the one before is in a request): a scored batch of 4,096 events is about 1.7 MB of
        # intent events, 425 KB a partition of four, which batches of 256 KB cut in two, one more round trip a
        # batch, and a commit's changelog in three.
        producer_max_batch_size=settings.producer_max_batch_bytes,
        # also when aiokafka gives up on a batch (Faust's default: 20 minutes); a batch that fails ends the worker
        producer_request_timeout=settings.producer_request_timeout_s,
        table_key_index_size=100_000,
        # No standby replicas. A standby's first changelog records can be fetched between its partitions' resume and
        # the end of the rebalance, when Faust clears its changelog queue (flow_control.resume: clear_on_resume);
        # its recovery accepts any higher offset, so its read offset then jumps past records it never applied. In
        # the chaos scenario a standby promoted to owner started its recovery at the changelog's end with most of a
        # partition's users missing (docs/reliability.md, section 3). Without standbys a partition's new owner
        # restores it, paused, up to the changelog's end before that clear: slower to take over, not exposed to it.
        table_standby_replicas=0,
    )
    exactly_once = settings.processing_guarantee == "exactly_once"
    if exactly_once:
        compat.use_broker_highwaters()
        # RocksDB may hold states of a transaction that was aborted when the last run died, and Faust does not
        # keep table offsets under exactly-once (its pending offsets are keyed by changelog partition but looked
        # up by source partition), so it replays the whole changelog anyway: start from an empty store and let
        # the replay (read_committed) rebuild exactly the committed states, as Kafka Streams does.
        shutil.rmtree(app.conf.tabledir, ignore_errors=True)
    # Serializers as keyword arguments: a faust.Schema passed to a topic lost its "raw" serializers once the
    # app also had a table (keys were then decoded as JSON).
    raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    clickstream = app.topic(settings.topic_clickstream, partitions=settings.partitions, **raw)
    users = app.Table(
        USERS_TABLE,
        partitions=settings.partitions,
        key_type=bytes,
        value_type=bytes,
        options={"driver": "rocksdict"},
        recovery_buffer_size=10_000,
    )
    compat.disable_table_wal(users)  # the changelog is its durable copy (stream/compat.py)
    delivery = Delivery(app, users, settings, exactly_once)
    register_views(app, users, delivery.unwritten_state, engine, settings, device)
    offsets = InputOffsets(settings, read_committed=exactly_once)  # ours, not Faust's (stream/offsets.py)
    inputs = InputQueue(max_events=settings.queue_max_events)
    compat.divert_input_topic(app, settings.topic_clickstream, inputs.put)
    compat.lean_input_records(settings.topic_clickstream)
    # A batch holds this from its admission to its last state write, and so does every offset commit: a commit
    # sees a batch whole or not at all. Under exactly-once a transaction never commits part of a batch.
    batch_lock = asyncio.Lock()
    # Records fetched in this consumer generation or an earlier one are stale: a rebalance has begun since, and
    # once it is done Faust seeks every partition back to its committed offset, so their partition's owner replays
    # them. Applying them now would apply them twice.
    stale_upto_generation = -1
    # half the session: the member may have expired
    stall = StallWatch(float(app.conf.broker_session_timeout) / 2, exit_stalled)

    def restore_sessions(partition: int) -> None:
        """After an assignment: rebuild the open-session index and watermark of a partition from the table."""
        started = time.perf_counter()
        db = compat.partition_db(users, partition)
        n = engine.restore_partition(partition, ((k.decode(), v) for k, v in db.items() if k != OFFSET_KEY))
        db.flush(False)  # the restored store to disk (no write-ahead log): a crash now need not restore it again
        log.info(
            "event=sessions_restored partition=%d users=%d seconds=%.2f", partition, n, time.perf_counter() - started
        )

    unwritten_state = delivery.unwritten_state

    def get_state(user_id: str, rec: Record) -> bytes | None:
        blob = unwritten_state(user_id, rec.partition)  # the batch in flight's, or queued for the next commit
        if blob is not None:
            return blob
        return compat.partition_db(users, rec.partition).get(user_id.encode())

    commit_lock = asyncio.Lock()  # one commit at a time (at-least-once waits for its acknowledgements unlocked)

    def wrap_commit(commit: Any) -> Any:
        async def guarded_commit(*args: Any, **kwargs: Any) -> bool:
            if not exactly_once and not app.consumer.should_stop:
                async with commit_lock:
                    try:
                        return await commit_at_least_once(
                            delivery, offsets, batch_lock, partial(commit, *args, **kwargs)
                        )
                    except DeliveryError as exc:  # a state in RocksDB but not in its changelog: not committable
                        exit_without_commit("changelog_failed", exc.__cause__)
            # Exactly-once, and a stopping worker's last commit: everything written, sent and acknowledged first.
            async with batch_lock:
                try:
                    await delivery.flush()
                except Exception as exc:  # a state in RocksDB but not in its changelog: not committable
                    exit_without_commit("changelog_failed", exc)
                try:
                    return bool(await commit(*args, **kwargs))
                except Exception as exc:
                    if not exactly_once:
                        raise
                    # The transaction is aborted while RocksDB holds its states, and a clean stop would commit the
                    # offsets in a new one: only a restart (empty store, changelog replayed) is safe.
                    exit_without_commit("commit_failed", exc)

        return guarded_commit

    def wrap_revoke(revoke: Any) -> Any:
        async def guarded_revoke(revoked: set) -> None:
            nonlocal stale_upto_generation
            async with batch_lock:
                stale_upto_generation = app.consumer_generation_id
                inputs.clear()
                if exactly_once:
                    # Faust forgets what was acked in revoked partitions before it would commit it (and aiokafka has
                    # emptied the assignment by then, so the commit would be discarded anyway). Their open
                    # transactions hold the outputs of those records, which the partitions' next owners replay:
                    # committed twice. Commit them now, with their offsets, as Kafka Streams does on revocation.
                    # The consumer's own keys: aiokafka refuses Faust's TP tuples that ``revoked`` holds.
                    tps = [tp for tp in revoked if tp.topic == settings.topic_clickstream]
                    try:
                        await delivery.flush()  # the batch in flight written, the changelog in the transactions
                        pending = offsets.committable(tps, app.consumer._committed_offset)  # type: ignore[attr-defined]
                        if pending:
                            await compat.commit_transaction(app, pending)
                    except Exception as exc:
                        exit_without_commit("commit_failed", exc)
                else:
                    try:
                        await delivery.flush()  # its wait_empty then commits what was written, if it still can
                    except Exception as exc:
                        exit_without_commit("changelog_failed", exc)
                delivery.forget(tp.partition for tp in revoked if tp.topic == settings.topic_clickstream)
            try:
                await revoke(revoked)
            finally:
                offsets.reset()

        return guarded_revoke

    async def seek(partition: int, offset: int) -> None:
        # In the consumer's own thread (Faust's seek_wait), which also moves Faust's read offset back.
        await app.consumer.seek_wait({TopicPartition(settings.topic_clickstream, partition): offset})

    @app.timer(interval=1.0)
    async def reseek() -> None:
        stuck = offsets.stuck_seeks(older_than_s=2.0)
        if stuck:
            async with batch_lock:
                for partition, offset in stuck.items():
                    log.info("event=offset_gap_reseek partition=%d seek_to=%d", partition, offset)
                    await seek(partition, offset)

    def exit_if_stalled() -> None:
        if stall.check():
            exit_without_commit("stalled", None)

    def on_written(last_offsets: dict[int, int]) -> None:
        for partition, offset in last_offsets.items():
            offsets.written(partition, offset)

    delivery.before_write, delivery.on_written = exit_if_stalled, on_written

    async def score_batches() -> None:
        startup_frozen = False
        stall.start()
        while True:
            if delivery.inflight is not None and inputs.queue.empty():
                async with batch_lock:  # nothing to overlap with: finish the batch in flight now
                    try:
                        await delivery.complete()
                    except Exception as exc:
                        exit_without_commit("delivery_failed", exc)
            fetches = await inputs.take(
                settings.batch_max_events, settings.batch_max_ms / 1000, settings.batch_backlog_events
            )
            async with batch_lock:
                exit_if_stalled()
                try:
                    admitted = await admit(fetches, offsets, stale_upto_generation)
                    for partition, offset in admitted.seeks.items():
                        await seek(partition, offset)
                    if any(admitted.skipped.values()):
                        log.info("event=records_skipped %s", " ".join(f"{k}={v}" for k, v in admitted.skipped.items()))
                    records = admitted.records
                    if not records:
                        continue
                    for partition in {r.partition for r in records} - engine.sessions.keys():
                        restore_sessions(partition)
                    metrics.EVENTS_IN.inc(len(records))
                    result = engine.process(records, get_state)
                    await delivery.start_batch(result, admitted.last_offsets)
                except DeliveryError as exc:
                    exit_without_commit("delivery_failed", exc.__cause__)
                except Exception as exc:
                    # Admitted records move the partition's next offset; a loop restarted here would skip them.
                    # The restarted worker replays from the last commit instead.
                    exit_without_commit("batch_failed", exc)
            metrics.observe_batch(result, len(records))
            if not startup_frozen:
                startup_frozen = True
                freeze_startup_objects()

    async def maintain_stores() -> None:
        """The stores' upkeep, from the agent's start (Faust's timers start only once the first recovery is done):

        - a flush every ``state_flush_s`` (they have no write-ahead log: this bounds what a crash makes the restart
          read back from the changelog, the first recovery's progress included);
        - leaving a table recovery that stalled: no changelog record for ``recovery_stall_s`` from a partition still
          behind, counted from the group's last assignment at the earliest (``RecoveryWatch``). Seen in the chaos
          test, after two rebalances 11 s apart: the recovery of two partitions a worker had just taken over received
          nothing for four minutes, its fetches going out; a restarted worker recovers them (docs/reliability.md, section 3). The stores are flushed
          first, so the restart keeps what was restored."""
        flushed_at = time.monotonic()
        watch = RecoveryWatch(settings.recovery_stall_s, since=flushed_at)
        while True:
            await asyncio.sleep(RECOVERY_CHECK_S)
            now = time.monotonic()
            if now - flushed_at >= settings.state_flush_s:
                compat.flush_table(users, wait=False)
                flushed_at = now
            progress = compat.recovery_progress(app)
            stalled = watch.stalled_for(now, app.consumer_generation_id, progress)
            if stalled is not None and progress is not None:
                compat.flush_table(users)
                exit_without_commit(
                    "recovery_stalled", TimeoutError(f"no record for {stalled:.0f} s of {', '.join(progress.behind)}")
                )

    @app.agent(clickstream, name="score")
    async def score(stream: faust.StreamT) -> None:
        # The agent subscribes the input topic (and co-partitions the table with it); its records come to
        # score_batches by the ingest hook, never through this stream.
        compat.consumer_commit_hooks(app.consumer, offsets.committable, wrap_commit, wrap_revoke)
        loop = exit_when_done(score_batches(), "scoring_loop_ended")
        upkeep = exit_when_done(maintain_stores(), "store_upkeep_ended")
        # Not exit_when_done: the trims are upkeep the worker can go on without (off, not glibc, a failed trim).
        trims = asyncio.ensure_future(memory.trim_after_bursts(settings.memory_trim_mb))
        trims.add_done_callback(log_if_failed)
        try:
            async for _event in stream:
                exit_without_commit("record_on_faust_stream_path", None)
        finally:
            loop.cancel()
            upkeep.cancel()
            trims.cancel()

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # Faust's stub wants a ``signal`` keyword
    async def on_revoked(app: faust.App, revoked: set, **kwargs: Any) -> None:
        for tp in revoked:
            if tp.topic == settings.topic_clickstream:
                engine.sessions.pop(tp.partition, None)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # likewise
    async def on_assigned(app: faust.App, assigned: set, **kwargs: Any) -> None:
        """Exactly-once: drop the transactional producers of partitions this worker no longer owns.

        Faust stops them only for revoked partitions that are not standbys here, and with standby replicas (Faust's
        default; off here since, see ``table_standby_replicas``) a partition handed to another worker usually stayed
        as a standby: its producer, fenced by the new owner, was kept and reused when the partition came back, and
        the first send failed (ProducerFenced). Dropped now, it is created afresh (a new epoch) if the partition
        returns, whatever the standby setting."""
        if not exactly_once:
            return
        assignor = app.assignor
        active = {tp.partition for tp in assigned if tp.topic == settings.topic_clickstream and assignor.is_active(tp)}
        try:
            prefix = f"{settings.app_id}-{assignor.group_for_topic(settings.topic_clickstream)}-"
        except KeyError:  # nothing of ours assigned
            return
        producers = compat.transactional_producers(app)
        for tid in [t for t in producers if t.startswith(prefix) and int(t[len(prefix) :]) not in active]:
            log.info("event=transactional_producer_dropped id=%s", tid)
            await producers.pop(tid).stop()

    refused_paths: set[Path] = set()
    refused_items: set[Path] = set()

    @app.timer(interval=hot_swap.MODEL_POLL_S)
    async def poll_models() -> None:
        """Hot swap: a newer valid artifact replaces the model (or the item model) between two batches."""
        await hot_swap.poll_once(settings, engine, device, refused_paths)
        await hot_swap.poll_items_once(settings, engine, refused_items)

    @app.timer(interval=5.0)
    async def report_lag() -> None:
        consumer = app.consumer
        for tp in consumer.assignment():
            if tp.topic != settings.topic_clickstream:
                continue
            try:
                highwater = consumer.highwater(tp)
                position = await consumer.position(tp)
            except Exception:
                continue
            if highwater is not None and position is not None:
                metrics.CONSUMER_LAG.labels(partition=str(tp.partition)).set(max(0, highwater - position))

    return app
