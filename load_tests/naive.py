"""The naive baseline of the load test: a plain Faust agent, one event at a time.

    python -m load_tests.naive     (settings from INTENTSTREAM_*, like ``intentstream worker``)

What most Faust users would write first: ``async for event in stream.events()``, read the user's state
from the table, update it, score the event alone with the same model, write the state back and ``await``
the output. Same table (RocksDB, rocksdict driver, changelog), same user-state codec and window rules
(stream/state/user.py), same model and featurizer (stream/scoring.py with a batch of one), same output
records, same Faust settings as the engine's app: the only differences are no batching and the plain
per-event code, which is the point of the comparison. Session closing and churn alerts are left out
(they only add work), so the comparison flatters the naive agent.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import faust
import torch
from faust.web import Request, Response, View

from stream import contract
from stream.app import load_model
from stream.scoring import UserBatch, score_batch
from stream.settings import Settings
from stream.state.user import BANDS, Accept, UserState

MAX_FUTURE_MS = 86_400_000


def create_app(settings: Settings) -> faust.App:
    from models.artifact import resolve_device
    from stream import emit
    from stream.topics import ensure_topics_async, init_group_offsets

    device = resolve_device(settings.device)
    torch.set_num_threads(max(1, settings.torch_threads))
    model = load_model(settings, device)

    async def prepare() -> None:
        await ensure_topics_async(settings)
        await init_group_offsets(settings, settings.app_id, settings.topic_clickstream)

    asyncio.run(prepare())
    datadir = settings.state_dir / f"naive-{settings.web_port}"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{addr.strip()}" for addr in settings.kafka_bootstrap.split(",")],
        store="rocksdb://",
        datadir=str(datadir),
        processing_guarantee=settings.processing_guarantee,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_enabled=True,
        web_in_thread=False,
        stream_buffer_maxsize=settings.queue_max_events,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        broker_commit_every=max(settings.batch_max_events, 1000),
        broker_commit_interval=1.0,
        producer_linger_ms=5,
        producer_max_batch_size=262_144,
        table_key_index_size=100_000,
    )
    raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    clickstream = app.topic(settings.topic_clickstream, partitions=settings.partitions, **raw)
    intents = app.topic(settings.topic_intent, partitions=settings.partitions, **raw)
    dlq = app.topic(settings.topic_dlq, partitions=settings.partitions, **raw)
    users = app.Table(
        "users", partitions=settings.partitions, key_type=bytes, value_type=bytes, options={"driver": "rocksdict"}
    )
    lateness_ms = int(settings.allowed_lateness_s * 1000)
    thresholds = model.thresholds["purchase"]

    @app.agent(clickstream, name="score")
    async def score(stream: faust.StreamT) -> None:
        async for event in stream.events():
            m = event.message
            now_ms = int(time.time() * 1000)
            ts_ms = int(m.timestamp * 1000)
            ev = contract.validate(
                m.value, m.key, max_bytes=settings.max_record_bytes, max_ts_ms=now_ms + MAX_FUTURE_MS
            )
            if isinstance(ev, str):
                value = contract.dlq_record(ev, m.key, m.value, m.topic, m.partition, m.offset, now_ms)
                await dlq.send(key=m.key, value=value)
                continue
            blob = users.get(m.key)
            st = UserState.from_bytes(blob) if blob else UserState()
            prior = st.records
            hidden = st.hidden if st.model_tag == model.state_tag else None
            outcome = st.accept(ev, model.featurizer, lateness_ms)
            if outcome in (Accept.DUPLICATE, Accept.TOO_LATE):
                continue
            batch = UserBatch(prior=prior, hidden=hidden)
            if outcome is Accept.INSERTED:
                batch.rescore_window = st.records
            else:
                batch.new = st.records[-1:]
            scores = score_batch(model, [batch], device)[0]
            p = scores.probs[-1]
            st.hidden, st.model_tag = scores.hidden, model.state_tag
            st.score, st.churn_risk = float(p[0]), float(p[1])
            band = emit.band_of(st.score, thresholds)
            scored_at = int(time.time() * 1000)
            value = contract.intent_record(
                user_id=ev.user_id,
                score=st.score,
                band=BANDS[band],
                order_value_if_purchase=float(p[2]),
                model_name=model.name,
                model_version=model.version,
                event_id=ev.event_id,
                event_ts=ev.ts,
                produced_at_ms=ts_ms,
                scored_at_ms=scored_at,
                reasons=emit.intent_reasons(st.records),
            )
            st.last_score, st.last_band, st.last_emit_ts = st.score, band, ev.ts
            users[m.key] = st.to_bytes()
            await intents.send(key=m.key, value=value)

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return self.json(
                {
                    "status": "ok",
                    "ready": bool(app.tables.recovery.completed.is_set() and not app.rebalancing),  # type: ignore[attr-defined]
                    "partitions": sorted(
                        tp.partition for tp in app.consumer.assignment() if tp.topic == settings.topic_clickstream
                    ),
                }
            )

    return app


def main() -> int:
    from faust.worker import Worker

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app(settings)
    Worker(app, loglevel=settings.log_level.lower(), quiet=True).execute_from_commandline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
