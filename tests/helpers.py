"""Test helpers: synthetic events, a real worker process, producing to and reading from the real broker."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from load_tests import procs
from load_tests.procs import free_port
from models.artifact import save_artifact, untrained_model
from models.features import FeaturizerConfig, _crc
from models.items import ItemConfig, ItemModel
from stream.settings import Settings
from stream.topics import kafka_client_kwargs

BASE_TS = 1_767_600_000_000  # 2026-01-05
FUNNEL = ["page_view", "search", "product_view", "product_view", "add_to_cart", "checkout_start", "purchase"]


# The environment of a load-test or peer run on a backlog of a few thousand events: batches of at most 256. The
# default 4,096 would drain such a backlog in one batch whose outputs share a timestamp: no rate, no CPU per event.
SMALL_BATCHES = {**os.environ, "INTENTSTREAM_BATCH_BACKLOG_EVENTS": "256", "INTENTSTREAM_QUEUE_MAX_EVENTS": "1024"}


def make_events(
    n_users: int, sessions: int = 3, per_session: int = 6, seed: int = 0, start_ts: int = BASE_TS
) -> list[dict]:
    """Contract events sorted by time; sessions separated by hours so that they close (gap > 30 min)."""
    rng = random.Random(seed)
    events = []
    for u in range(n_users):
        t = start_ts + rng.randrange(3_600_000)
        for s in range(sessions):
            for i in range(per_session):
                t += rng.choice([2_000, 15_000, 60_000, 180_000])
                events.append(
                    {
                        "event_id": f"e-{seed}-{u}-{s}-{i}",
                        "user_id": f"user-{u}",
                        "type": FUNNEL[min(i, len(FUNNEL) - 1)] if rng.random() < 0.7 else "product_view",
                        "ts": t,
                        "session_id": f"s-{u}-{s}",
                        "item_id": f"item-{rng.randrange(20)}",
                        "category": rng.choice(["shoes", "books", "toys"]),
                        "price": round(rng.uniform(5, 200), 2),
                    }
                )
            t += rng.choice([2, 5, 30]) * 3_600_000
    events.sort(key=lambda e: (e["ts"], e["event_id"]))
    return events


def write_model(model_dir: Path, arch: str = "gru", seed: int = 0, churn_alert: float = 0.0) -> Path:
    """An untrained (deterministic) artifact: tests of the pipeline, never shipped as a default."""
    return save_artifact(
        untrained_model(arch, seed),
        model_dir,
        featurizer=FeaturizerConfig(),
        calibration={},
        thresholds={"purchase": {"medium": 0.3, "high": 0.6}, "churn": {"alert": churn_alert}},
        horizon_s=3600,
        churn_days=14,
        data_hash="untrained-test",
        metrics={},
        name=f"untrained-{arch}",
    )


def item_model(table: dict[str, list[tuple[str, float]]], popular: list[str], version: int = 1) -> ItemModel:
    """An item model built by hand: ``table``, each item's neighbours (best first) with their similarities;
    ``popular``, the fallback list, most popular first (every item must be a key of ``table``)."""
    ids = sorted(table, key=_crc)  # the artifact's order: by crc32 code, for searchsorted
    at = {name: k for k, name in enumerate(ids)}
    indptr, cols, weights = [0], [], []
    for name in ids:
        cols += [at[x] for x, _ in table[name]]
        weights += [w for _, w in table[name]]
        indptr.append(len(cols))
    share = {name: (len(popular) - popular.index(name)) / len(popular) if name in popular else 0.0 for name in ids}
    return ItemModel(
        codes=np.array([_crc(x) for x in ids], dtype=np.uint32),
        item_ids=ids,
        indptr=np.array(indptr, dtype=np.int64),
        neighbours=np.array(cols, dtype=np.int32),
        weights=np.array(weights, dtype=np.float32),
        popular=np.array([at[x] for x in popular], dtype=np.int32),
        popularity=np.array([share[x] for x in ids], dtype=np.float32),
        manifest={"version": version, "serving": ItemConfig().to_dict()},
    )


class Worker:
    """A real `intentstream worker` process."""

    def __init__(self, settings: Settings, log_dir: Path, port: int | None = None, **extra: object):
        """``port``: a stopped worker's, to start again on its state folder (``state_dir/worker-<port>``)."""
        self.port = port or free_port()
        self.env = settings.child_env(web_port=self.port, **extra)
        self.log_path = log_dir / f"worker-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "worker"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        return self

    def get(self, path: str, timeout: float = 5.0) -> dict:
        """GET a JSON endpoint; a 404 answer (e.g. an unknown user) is returned as its JSON body."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return {"status": 404, **json.loads(err.read() or b"{}")}
            raise

    def partitions(self) -> list[int]:
        """Partitions this worker owns, once it is ready (tables restored); [] before."""
        try:
            health = self.get("/health")
        except OSError:
            return []
        return health["partitions"] if health["ready"] else []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = 15, timeout: float = 60) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_assigned(workers: list[Worker], partitions: int, timeout: float = 90) -> None:
    def covered() -> bool:
        for w in workers:
            assert w.alive(), f"worker died:\n{w.tail()}"
        got = [p for w in workers for p in w.partitions()]
        return sorted(got) == list(range(partitions)) and all(w.partitions() for w in workers)

    wait_for(covered, timeout, f"{len(workers)} worker(s) to own all {partitions} partitions")


def produce(
    settings: Settings,
    records: list[tuple[bytes | None, bytes]],
    rate: float | None = None,
    compression: str | None = None,
) -> None:
    async def run() -> None:
        producer = AIOKafkaProducer(
            **kafka_client_kwargs(settings), acks="all", enable_idempotence=True, compression_type=compression
        )
        await producer.start()
        try:
            started = time.monotonic()
            for i, (key, value) in enumerate(records):
                await producer.send(settings.topic_clickstream, key=key, value=value)
                if rate:
                    ahead = i / rate - (time.monotonic() - started)
                    if ahead > 0:
                        await producer.flush()
                        await asyncio.sleep(ahead)
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(run())


def encode(events: list[dict]) -> list[tuple[bytes | None, bytes]]:
    return [(e["user_id"].encode(), orjson.dumps(e)) for e in events]


def consume(
    settings: Settings, topics: list[str], until: Callable[[dict[str, list]], bool], timeout: float = 90
) -> dict[str, list]:
    """Read ``topics`` from the start until ``until(records by topic)`` holds (or fail after ``timeout``)."""

    async def run() -> dict[str, list]:
        consumer = AIOKafkaConsumer(
            *topics, **kafka_client_kwargs(settings), auto_offset_reset="earliest", enable_auto_commit=False
        )
        await consumer.start()
        got: dict[str, list] = {t: [] for t in topics}
        try:
            deadline = time.monotonic() + timeout
            while not until(got):
                if time.monotonic() > deadline:
                    counts = {t: len(v) for t, v in got.items()}
                    raise AssertionError(f"timed out after {timeout:.0f} s; got {counts}")
                batch = await consumer.getmany(timeout_ms=500)
                for tp, msgs in batch.items():
                    got[tp.topic].extend(msgs)
        finally:
            await consumer.stop()
        return got

    return asyncio.run(run())


def read_to_end(settings: Settings, topics: list[str]) -> dict[str, list]:
    """Every record now in ``topics`` (load_tests.procs.read_to_end, from synchronous test code)."""
    return asyncio.run(procs.read_to_end(settings, topics))


def create_app_offline(settings: Settings, monkeypatch: Any, topic_calls: list | None = None) -> Any:
    """``stream.app.create_app`` without a broker: topic creation and the group's offset preparation stubbed out,
    an untrained model in ``settings.model_dir``. For tests of what the app is built with; ``topic_calls`` receives
    the keyword arguments of each call of ``ensure_topics_async``."""
    import stream.topics
    from stream.app import create_app

    async def nothing(*args: object, **kwargs: object) -> None:
        return None

    async def topics(*args: object, **kwargs: object) -> None:
        if topic_calls is not None:
            topic_calls.append(kwargs)

    monkeypatch.setattr(stream.topics, "ensure_topics_async", topics)
    monkeypatch.setattr(stream.topics, "init_group_offsets", nothing)
    write_model(Path(settings.model_dir))
    return create_app(settings)
