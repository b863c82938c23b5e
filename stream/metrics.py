"""Prometheus metrics of a worker, served at GET /metrics on its web port."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from stream import compat
from stream.contract import reason_field

if TYPE_CHECKING:
    from stream.engine import BatchResult

REGISTRY = CollectorRegistry()
EVENTS_IN = Counter("intentstream_events_in_total", "Input records consumed", registry=REGISTRY)
SCORED = Counter("intentstream_events_scored_total", "Events scored by the model", registry=REGISTRY)
DUPLICATES = Counter("intentstream_duplicates_total", "Events ignored as duplicate event_ids", registry=REGISTRY)
INTENTS = Counter("intentstream_intents_emitted_total", "Purchase-intent events emitted", registry=REGISTRY)
ALERTS = Counter("intentstream_churn_alerts_total", "Churn alerts emitted", registry=REGISTRY)
DLQ = Counter("intentstream_dlq_total", "Records sent to the dead-letter topic", ["field"], registry=REGISTRY)
BATCH_SIZE = Histogram(
    "intentstream_batch_size",
    "Records per batch",
    buckets=(1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
    registry=REGISTRY,
)
MODEL_SECONDS = Histogram(
    "intentstream_model_seconds",
    "Model forward time per batch",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
LATENCY = Histogram(
    "intentstream_latency_seconds",
    "From the input record's timestamp to its scoring",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "intentstream_consumer_lag", "Records behind the end of the input", ["partition"], registry=REGISTRY
)
MODEL_VERSION = Info("intentstream_model", "The model being served", registry=REGISTRY)
ITEMS_MODEL = Info(
    "intentstream_items_model",
    "The item model of the suggestions being served (version none: no item model, suggestions are null)",
    registry=REGISTRY,
)


def observe_batch(result: BatchResult, n_records: int) -> None:
    BATCH_SIZE.observe(n_records)
    SCORED.inc(result.scored)
    DUPLICATES.inc(result.duplicates)
    INTENTS.inc(result.intents)
    ALERTS.inc(result.alerts)
    for reason in result.dlq_reasons:
        DLQ.labels(field=reason_field(reason)).inc()
    if result.scored:
        MODEL_SECONDS.observe(result.model_seconds)
    compat.observe_many(LATENCY, np.asarray(result.latencies_ms, dtype=np.float64) / 1000)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
