"""The Faust app: topics, the RocksDB-backed user table, the scoring agent, model hot-swap and HTTP views.

Thin glue: the logic of a batch lives in stream/engine.py. Faust gives us the consumer group (workers
split the partitions), changelog-backed tables (a moved or restarted worker recovers its users), offset
commits after our outputs are flushed, and table routing for ``GET /users/{id}/score``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from pathlib import Path
from typing import Any

import faust
import orjson
import torch
from faust.streams import _current_event  # the partition of a table write follows the current event
from faust.web import Request, Response, View

from models.artifact import LoadedModel, list_versions, load_artifact, load_newest, resolve_device
from stream import metrics
from stream.contract import EVENT_TYPES
from stream.engine import Engine, InRecord
from stream.settings import Settings
from stream.state.user import BANDS, UserState
from stream.topics import kafka_client_kwargs

log = logging.getLogger("intentstream.worker")
MODEL_POLL_S = 5.0
OFFSET_KEY = b"__faust\0offset__"


class NoModelError(RuntimeError):
    pass


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
    # Serializers as keyword arguments: a faust.Schema passed to a topic lost its "raw" serializers once the
    # app also had a table (keys were then decoded as JSON and the records acked as decode errors).
    raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    clickstream = app.topic(settings.topic_clickstream, partitions=settings.partitions, **raw)
    outputs = {t: app.topic(t, partitions=settings.partitions, **raw) for t in settings.output_topics}
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

    @app.agent(clickstream, name="score")
    async def score(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.batch_max_events, within=settings.batch_max_ms / 1000):
            records = []
            for e in events:
                m = e.message
                records.append(InRecord(m.key, m.value, m.topic, m.partition, m.offset, int(m.timestamp * 1000)))
                if m.partition not in engine.sessions:
                    restore_sessions(m.partition)
            by_record = {id(r): e for r, e in zip(records, events, strict=True)}
            metrics.EVENTS_IN.inc(len(records))
            result = engine.process(records, get_state)
            for user_id, (blob, rec) in result.states.items():
                _current_event.set(weakref.ref(by_record[id(rec)]))
                users[user_id.encode()] = blob
            for out in result.outputs:
                _current_event.set(weakref.ref(by_record[id(out.source)]))
                outputs[out.topic].send_soon(key=out.key, value=out.value)
            _current_event.set(None)
            metrics.observe_batch(result, len(records))

    @app.on_partitions_revoked.connect
    async def on_revoked(app: faust.App, revoked: set, **kwargs: Any) -> None:
        for tp in revoked:
            if tp.topic == settings.topic_clickstream:
                engine.sessions.pop(tp.partition, None)

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
