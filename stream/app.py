"""The Faust app: topics, the RocksDB-backed user table, the scoring agent, model hot-swap and HTTP views.

Thin glue: the logic of a batch lives in stream/engine.py. Faust gives us the consumer group (workers
split the partitions), changelog-backed tables (a moved or restarted worker recovers its users), offset
commits, and table routing for ``GET /users/{id}/score``.

Delivery order of a batch (docs/reliability.md): its outputs and the changelog records of its users'
states are sent and acknowledged by the broker first, and only then are the states written to RocksDB and
the batch's input records acknowledged for the offset commit. A crash at any point therefore either
replays the batch (its outputs may repeat: at-least-once) or finds both outputs and state in place;
never a state that says "seen" for an event whose output was lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import threading
import time
import weakref
from pathlib import Path
from typing import Any, NoReturn

import faust
import orjson
import torch
from aiokafka import TopicPartition
from faust.streams import _current_event  # the partition of a table write follows the current event
from faust.web import Request, Response, View

from models.artifact import LoadedModel, list_versions, load_artifact, load_newest, resolve_device
from stream import metrics
from stream.contract import EVENT_TYPES
from stream.engine import Engine, InRecord
from stream.offsets import InputOffsets, Verdict
from stream.settings import Settings
from stream.state.user import BANDS, UserState
from stream.topics import kafka_client_kwargs

log = logging.getLogger("intentstream.worker")
MODEL_POLL_S = 5.0
OFFSET_KEY = b"__faust\0offset__"


class NoModelError(RuntimeError):
    pass


class DeliveryError(RuntimeError):
    """A batch's outputs or state records could not be delivered to the broker."""


def _broker_credentials(settings: Settings) -> Any:
    kwargs = kafka_client_kwargs(settings)
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


def _use_broker_highwaters() -> None:
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


def _bound_fetch_wait(ms: int) -> None:
    """Faust builds its worker consumer with ``fetch_max_wait_ms=1500``, hard-coded. aiokafka keeps one fetch in
    flight per broker, and a fetch that holds only partitions without new data (the assignor's topic, an idle
    changelog) waits those 1.5 s at the broker while the input partitions cannot be fetched: under paced
    traffic that wait was the latency (p99 981 -> 177 ms at 500 ev/s with 100 ms, docs/performance.md)."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    create = getattr(AIOKafkaConsumerThread, "_faust_create_worker_consumer", None)
    if create is None:
        create = AIOKafkaConsumerThread._create_worker_consumer
        AIOKafkaConsumerThread._faust_create_worker_consumer = create  # type: ignore[attr-defined]

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = ms  # read by AIOKafkaConsumer.start() when it builds its fetcher
        return consumer

    AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer  # type: ignore[method-assign]


def load_model(settings: Settings, device: torch.device) -> LoadedModel:
    model, refused = load_newest(settings.model_dir, device, expect_window=settings.window_size)
    for line in refused:
        log.error("event=model_refused %s", line)
    if model is None:
        raise NoModelError(
            f"no usable model in {settings.model_dir}: train one with "
            f"`intentstream train --data FILE --out {settings.model_dir}` (or run `intentstream demo`)"
        )
    return model


def create_app(settings: Settings, *, datadir: Path | None = None) -> faust.App:
    device = resolve_device(settings.device)
    torch.set_num_threads(max(1, settings.torch_threads))
    engine = Engine(settings, load_model(settings, device), device)
    log.info("event=model_loaded name=%s version=%s device=%s", engine.model.name, engine.model.version, device)

    from stream.topics import ensure_topics_async, init_group_offsets

    async def prepare() -> None:
        await ensure_topics_async(settings)
        await init_group_offsets(settings, settings.app_id, settings.topic_clickstream)

    asyncio.run(prepare())
    _bound_fetch_wait(settings.fetch_max_wait_ms)
    datadir = datadir or settings.state_dir / f"worker-{settings.web_port}"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{addr.strip()}" for addr in settings.kafka_bootstrap.split(",")],
        broker_credentials=_broker_credentials(settings),
        store="rocksdb://",
        datadir=str(datadir),
        processing_guarantee=settings.processing_guarantee,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=True,
        web_host=settings.web_host,
        web_bind=settings.web_host,  # Faust binds to web_bind (default 0.0.0.0), not to web_host
        web_port=settings.web_port,
        web_enabled=True,
        web_in_thread=False,
        stream_buffer_maxsize=settings.queue_max_events,  # bounded: a full buffer pauses the partition
        consumer_auto_offset_reset="earliest",
        # Records are bytes in and bytes out (orjson, the binary state codec); tables use these defaults.
        key_serializer="raw",
        value_serializer="raw",
        broker_commit_every=max(settings.batch_max_events, 1000),
        broker_commit_interval=1.0,
        producer_linger_ms=5,
        producer_max_batch_size=262_144,
        table_key_index_size=100_000,
    )
    app.engine = engine  # type: ignore[attr-defined]
    exactly_once = settings.processing_guarantee == "exactly_once"
    if exactly_once:
        _use_broker_highwaters()
        # RocksDB may hold states of a transaction that was aborted when the last run died, and Faust does not
        # keep table offsets under exactly-once (its pending offsets are keyed by changelog partition but looked
        # up by source partition), so it replays the whole changelog anyway: start from an empty store and let
        # the replay (read_committed) rebuild exactly the committed states, as Kafka Streams does.
        shutil.rmtree(app.conf.tabledir, ignore_errors=True)
    # Serializers as keyword arguments: a faust.Schema passed to a topic lost its "raw" serializers once the
    # app also had a table (keys were then decoded as JSON and the records acked as decode errors).
    raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    clickstream = app.topic(settings.topic_clickstream, partitions=settings.partitions, **raw)
    users = app.Table(
        "users",
        partitions=settings.partitions,
        key_type=bytes,
        value_type=bytes,
        options={"driver": "rocksdict"},
        recovery_buffer_size=10_000,
    )
    app.users = users  # type: ignore[attr-defined]

    def partition_db(partition: int) -> Any:
        return users.data._db_for_partition(partition)  # type: ignore[attr-defined]

    def get_state(user_id: str, rec: InRecord) -> bytes | None:
        return partition_db(rec.partition).get(user_id.encode())

    def restore_sessions(partition: int) -> None:
        """After an assignment: rebuild the open-session index and watermark of a partition from the table."""
        started = time.perf_counter()
        items = ((k.decode(), v) for k, v in partition_db(partition).items() if k != OFFSET_KEY)
        n = engine.restore_partition(partition, items)
        log.info(
            "event=sessions_restored partition=%d users=%d seconds=%.2f", partition, n, time.perf_counter() - started
        )

    def exit_without_commit(event: str, error: BaseException | None) -> NoReturn:
        # Leaving the agent's loop by an exception makes Faust ack the batch (take_events acks in a finally), and a
        # clean stop commits acked offsets: the batch's outputs would be lost. Exit at once instead; the restarted
        # worker replays from the last commit.
        log.critical("event=%s error=%r; exiting without an offset commit", event, error)
        logging.shutdown()
        os._exit(70)

    # A batch holds this from its first output to its acks, and so does every offset commit (guard_consumer): a
    # commit sees a batch whole or not at all. Under exactly-once a transaction never commits part of a batch.
    batch_lock = asyncio.Lock()
    # At-least-once: changelog records not yet acknowledged by the broker; an offset commit waits for them.
    unacked_changelog: set[asyncio.Future] = set()
    # Records fetched in this consumer generation or an earlier one are stale: a rebalance has begun since (or the
    # worker stalled), and once it is done Faust seeks every partition back to its committed offset, so their
    # partition's owner replays them. Applying them now would apply them twice.
    stale: dict[str, Any] = {"upto_generation": -1, "stalled": False}
    # The next input offset to process per partition, and what may be committed: ours, not Faust's (stream/offsets.py).
    offsets = InputOffsets(settings, read_committed=exactly_once)

    def guard_consumer() -> None:
        """Wrap the consumer's commit (every caller: the commit timer, commit_every, rebalances, the stop) and its
        revocation handler."""
        consumer: Any = app.consumer  # faust.transport.consumer.Consumer; its type stub lacks these members
        if getattr(consumer, "_intentstream_guarded", False):
            return
        commit = consumer.commit
        revoke = consumer.on_partitions_revoked

        # Faust's commit asks these two which partitions and offsets to commit; records are never acked to Faust
        # (settle below), so its own acked lists and gap trees stay empty.
        def committable(tps: Any = None) -> dict[Any, int]:
            return offsets.committable(consumer.assignment() if tps is None else tps, consumer._committed_offset)

        consumer._filter_tps_with_pending_acks = lambda topics=None: list(committable())
        consumer._filter_committable_offsets = committable

        async def guarded_commit(*args: Any, **kwargs: Any) -> bool:
            async with batch_lock:
                if unacked_changelog:
                    try:
                        await asyncio.gather(*list(unacked_changelog))
                    except Exception as exc:  # a state in RocksDB but not in its changelog: not committable
                        exit_without_commit("changelog_failed", exc)
                if not exactly_once:
                    return bool(await commit(*args, **kwargs))
                try:
                    return bool(await commit(*args, **kwargs))
                except Exception as exc:
                    # The transaction is aborted while RocksDB holds its states, and a clean stop would commit the
                    # offsets in a new one: only a restart (empty store, changelog replayed) is safe.
                    exit_without_commit("commit_failed", exc)

        async def guarded_revoke(revoked: set) -> None:
            async with batch_lock:
                stale["upto_generation"] = app.consumer_generation_id
                if exactly_once:
                    # Faust forgets what was acked in revoked partitions before it would commit it (and aiokafka has
                    # emptied the assignment by then, so the commit would be discarded anyway). Their open
                    # transactions hold the outputs of those records, which the partitions' next owners replay:
                    # committed twice. Commit them now, with their offsets, as Kafka Streams does on revocation.
                    # The consumer's own keys: aiokafka refuses Faust's TP tuples that ``revoked`` holds.
                    tps = [tp for tp in revoked if tp.topic == settings.topic_clickstream]
                    pending = committable(tps)
                    if pending:
                        try:
                            await consumer.transactions.commit(pending, start_new_transaction=True)
                        except Exception as exc:
                            exit_without_commit("commit_failed", exc)
                        app.tables.on_commit(pending)
            try:
                await revoke(revoked)  # at-least-once: its wait_empty commits what was written, if it still can
            finally:
                offsets.reset()

        consumer.commit = guarded_commit
        consumer.on_partitions_revoked = guarded_revoke
        consumer._intentstream_guarded = True

    def output_producer(partition: int) -> Any:
        """The aiokafka producer for the outputs of an input partition."""
        if not exactly_once:
            return app.producer._ensure_producer()  # type: ignore[attr-defined]
        # Faust's transaction manager picks the transactional producer from the *consumer's* metadata, which
        # lacks topics we only write to, and then sends outside any transaction (faust-streaming issue #177).
        # So we send with the transactional producer of the source partition ourselves: the one that commits
        # this partition's offsets and changelog.
        group = app.assignor.group_for_topic(settings.topic_clickstream)
        tid = f"{settings.app_id}-{group}-{partition}"
        producer = app.producer._transaction_producers.get(tid)  # type: ignore[attr-defined]
        if producer is None:
            raise RuntimeError(f"no transactional producer {tid} (partition {partition} revoked?)")
        return producer

    async def send_outputs(outs: list[Any]) -> list[Any]:
        """Hand a batch's outputs to the producer; returns the futures of their delivery. Every output goes to the
        partition of the input record it answers (co-partitioned; a DLQ record without a key too), in the
        batch's order. Whole record batches per topic and partition (aiokafka's ``send_batch``): a Faust send per
        record cost 7-8% of the worker and most of the aiokafka sender's 11-16% (docs/performance.md)."""
        groups: dict[tuple[str, int], list[Any]] = {}
        for out in outs:
            groups.setdefault((out.topic, out.source.partition), []).append(out)
        futures = []
        for (topic, partition), group in groups.items():
            producer = output_producer(partition)
            batch = producer.create_batch()
            for out in group:
                if batch.append(key=out.key, value=out.value, timestamp=None) is None:  # full: send, start anew
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    if batch.append(key=out.key, value=out.value, timestamp=None) is None:
                        raise RuntimeError(f"an output of {len(out.value)} bytes does not fit in a record batch")
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        return futures

    # Stall watchdog. A worker frozen (SIGSTOP, a VM pause) for longer than its group session is no longer the
    # owner of its partitions when it wakes up, but it does not know yet, and under at-least-once nothing fences
    # it: it would write the states of the batch in its hands over the newer ones of the new owner (the changelog
    # goes back in time for those users). After such a stall the worker exits rather than write (the owner replays
    # the batch). A thread keeps the time: it misses its ticks only when the whole process is frozen, not when the
    # event loop is merely busy (restoring tables, say). Half the session timeout: the member may have expired.
    stall_limit_s = float(app.conf.broker_session_timeout) / 2
    alive_at = [time.monotonic()]

    def stalled() -> bool:
        if time.monotonic() - alive_at[0] > stall_limit_s:  # frozen, and the thread has not run since
            stale["stalled"] = True
        return bool(stale["stalled"])

    def tick() -> None:
        while True:
            time.sleep(0.25)
            was_stalled = stale["stalled"]
            if stalled() and not was_stalled:  # logged once; the next batch exits
                log.warning("event=stalled seconds=%.1f", time.monotonic() - alive_at[0])
            alive_at[0] = time.monotonic()

    threading.Thread(target=tick, name="stall-watchdog", daemon=True).start()

    async def write_batch(result: Any, by_record: dict[int, Any]) -> None:
        """Outputs first, acknowledged by the broker, then the states: a state that holds an event (and makes a
        replay skip it as a duplicate) never exists without the event's output. Exactly-once: outputs and states
        go to the partition's open transaction together and commit (or abort) together."""
        try:
            sent = await send_outputs(result.outputs)
            if exactly_once:
                sent += [users.send_changelog(r.partition, u.encode(), b) for u, (b, r) in result.states.items()]
            if sent:
                await asyncio.gather(*sent)
        except Exception as exc:  # a fenced transactional producer, a broker gone for longer than the timeouts
            raise DeliveryError(str(exc)) from exc
        if stalled():
            exit_without_commit("stalled", None)
        for user_id, (blob, rec) in result.states.items():
            _current_event.set(weakref.ref(by_record[id(rec)]))  # the store picks the partition's database by it
            users.data[user_id.encode()] = blob
            if not exactly_once:
                fut = users.send_changelog(rec.partition, user_id.encode(), blob)
                unacked_changelog.add(fut)
                fut.add_done_callback(unacked_changelog.discard)
        _current_event.set(None)

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

    def settle(e: Any) -> None:
        """Done with a record, for Faust: never acked to its consumer (stream/offsets.py commits), and no longer
        awaited by a rebalance."""
        e.message.acked = True
        app.consumer._unacked_messages.discard(e.message)  # type: ignore[attr-defined]

    async def admit(events: list[Any]) -> list[Any]:
        """The records of a batch to process, in order: the next record of each partition, once. Stale records
        (fetched before the latest revocation), repeats and records after a made-up gap are settled and left out;
        after a made-up gap the consumer seeks back to the first record it never handed over."""
        admitted, skipped = [], {"stale": 0, "repeat": 0, "refetch": 0}
        for e in events:
            m = e.message
            if m.generation_id <= stale["upto_generation"]:
                settle(e)
                skipped["stale"] += 1
                continue
            verdict, back = await offsets.judge(m.partition, m.offset)
            if verdict is Verdict.PROCESS:
                admitted.append(e)
                continue
            settle(e)
            skipped[verdict.value] += 1
            if back is not None:
                log.info("event=offset_gap partition=%d offset=%d seek_to=%d", m.partition, m.offset, back)
                await seek(m.partition, back)
        if any(skipped.values()):
            log.info("event=records_skipped %s", " ".join(f"{k}={v}" for k, v in skipped.items()))
        return admitted

    @app.agent(clickstream, name="score")
    async def score(stream: faust.StreamT) -> None:
        guard_consumer()
        async for events in stream.take_events(settings.batch_max_events, within=settings.batch_max_ms / 1000):
            async with batch_lock:
                if stalled():
                    exit_without_commit("stalled", None)
                try:
                    events = await admit(events)
                    if not events:
                        continue
                    records = []
                    for e in events:
                        m = e.message
                        records.append(
                            InRecord(m.key, m.value, m.topic, m.partition, m.offset, int(m.timestamp * 1000))
                        )
                        if m.partition not in engine.sessions:
                            restore_sessions(m.partition)
                    by_record = {id(r): e for r, e in zip(records, events, strict=True)}
                    metrics.EVENTS_IN.inc(len(records))
                    result = engine.process(records, get_state)
                    await write_batch(result, by_record)
                except DeliveryError as exc:
                    exit_without_commit("delivery_failed", exc.__cause__)
                except Exception as exc:
                    # Admitted records move the partition's next offset; an agent restarted by Faust would skip
                    # them. The restarted worker replays from the last commit instead.
                    exit_without_commit("batch_failed", exc)
                for e in events:
                    settle(e)
                    offsets.written(e.message.partition, e.message.offset)
            metrics.observe_batch(result, len(records))

    @app.on_partitions_revoked.connect
    async def on_revoked(app: faust.App, revoked: set, **kwargs: Any) -> None:
        for tp in revoked:
            if tp.topic == settings.topic_clickstream:
                engine.sessions.pop(tp.partition, None)

    @app.on_partitions_assigned.connect
    async def on_assigned(app: faust.App, assigned: set, **kwargs: Any) -> None:
        """Exactly-once: drop the transactional producers of partitions this worker no longer owns.

        Faust stops them only for revoked partitions that are not standbys here, and with standby replicas (on by
        default) a partition handed to another worker usually stays as a standby: its producer, fenced by the
        new owner, was kept and reused when the partition came back, and the first send failed (ProducerFenced).
        Dropped now, it is created afresh (a new epoch) if the partition returns."""
        if not exactly_once:
            return
        assignor = app.assignor
        active = {tp.partition for tp in assigned if tp.topic == settings.topic_clickstream and assignor.is_active(tp)}
        try:
            prefix = f"{settings.app_id}-{assignor.group_for_topic(settings.topic_clickstream)}-"
        except KeyError:  # nothing of ours assigned
            return
        producers = app.producer._transaction_producers  # type: ignore[attr-defined]
        for tid in [t for t in producers if t.startswith(prefix) and int(t[len(prefix) :]) not in active]:
            log.info("event=transactional_producer_dropped id=%s", tid)
            await producers.pop(tid).stop()

    refused_paths: set[Path] = set()

    @app.timer(interval=MODEL_POLL_S)
    async def poll_models() -> None:
        """Hot swap: a newer valid artifact replaces the model between two batches."""
        for version, path in list_versions(settings.model_dir):
            if version <= int(engine.model.manifest["version"]) or path in refused_paths:
                return
            try:
                model = await asyncio.to_thread(load_artifact, path, device, settings.window_size)
            except Exception as exc:
                refused_paths.add(path)
                log.error(
                    "event=model_refused path=%s reason=%s; still serving %s", path.name, exc, engine.model.version
                )
                continue
            engine.swap_model(model)
            metrics.MODEL_VERSION.info({"name": model.name, "version": model.version})
            log.info("event=model_swapped name=%s version=%s", model.name, model.version)
            return

    @app.timer(interval=5.0)
    async def report_lag() -> None:
        consumer = app.consumer
        for tp in consumer.assignment():
            if tp.topic != settings.topic_clickstream:
                continue
            try:
                highwater = consumer.highwater(tp)
                position = await consumer._consumer.position(tp) if hasattr(consumer, "_consumer") else None  # type: ignore[attr-defined]
            except Exception:
                continue
            if highwater is not None and position is not None:
                metrics.CONSUMER_LAG.labels(partition=str(tp.partition)).set(max(0, highwater - position))

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return self.json(
                {
                    "status": "ok",
                    # false while rebalancing or restoring tables from their changelogs
                    "ready": bool(app.tables.recovery.completed.is_set() and not app.rebalancing),
                    "model": {"name": engine.model.name, "version": engine.model.version},
                    "device": str(device),
                    "partitions": sorted(
                        tp.partition for tp in app.consumer.assignment() if tp.topic == settings.topic_clickstream
                    ),
                }
            )

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            body, content_type = metrics.render()
            return self.bytes(body, content_type=content_type.split(";")[0])

    @app.page("/users/{user_id}/score")
    @app.table_route(table=users, match_info="user_id")
    async def user_score(web: Any, request: Request, user_id: str) -> Response:
        blob = users.get(user_id.encode())
        if blob is None:
            return web.json({"user_id": user_id, "error": "unknown user"}, status=404)
        st = UserState.from_bytes(blob)
        detail = {}
        if request.query.get("window"):
            detail["window"] = {
                "sha256": hashlib.sha256(st.records.tobytes()).hexdigest(),
                "ts": st.records["ts"].tolist(),
                "type": [EVENT_TYPES[t] for t in st.records["type"]],
            }
        return web.json(
            {
                "user_id": user_id,
                "score": None if st.score < 0 else round(st.score, 5),
                "last_emitted_score": None if st.last_score < 0 else round(st.last_score, 5),
                "band": BANDS[st.last_band] if st.last_band >= 0 else None,
                "churn_risk": round(st.churn_risk, 5),
                "events": st.count,
                "window": len(st.records),
                "last_seen": st.last_ts,
                "model_version": st.model_version or None,
                "served_by": f"{settings.web_host}:{settings.web_port}",
                **detail,
            }
        )

    return app


def json_bytes(obj: Any) -> bytes:
    return orjson.dumps(obj)
