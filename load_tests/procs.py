"""Processes under test (engine workers, the naive agent, the ceiling) and what the load test reads from
them and from Kafka: readiness, /metrics, CPU and resident memory, topic end offsets, committed offsets."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from stream.settings import Settings
from stream.topics import kafka_client_kwargs

COMMANDS: dict[str, list[str]] = {
    "engine": [sys.executable, "-m", "stream.cli", "worker"],
    "naive": [sys.executable, "-m", "load_tests.naive"],
    "ceiling": [sys.executable, "-m", "load_tests.ceiling"],
}
HAS_WEB = {"engine", "naive"}
VARIANT_MODULE = ["-m", "load_tests.variants"]  # a worker with a proposed change (load_tests/variants.py)


def variant_argv(variant: str) -> list[str]:
    """The command of a worker of ``variant`` (``a+b`` for several)."""
    return [sys.executable, *VARIANT_MODULE, variant]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """One process under test, with its CPU counter at the last sample."""

    kind: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path
    ps: psutil.Process
    cpu_s: float = 0.0  # user + system CPU seconds at the last sample
    sampled_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def cpu_rss(self) -> tuple[float, float]:
        """(CPU % of one core since the last call, resident MB), counting the process's children too."""
        now = time.monotonic()
        try:
            procs = [self.ps, *self.ps.children(recursive=True)]
            cpu = 0.0
            rss = 0
            for p in procs:
                t = p.cpu_times()
                cpu += t.user + t.system
                rss += p.memory_info().rss
        except psutil.Error:
            return 0.0, 0.0
        pct = 100.0 * (cpu - self.cpu_s) / max(now - self.sampled_at, 1e-6)
        self.cpu_s, self.sampled_at = cpu, now
        return pct, rss / 1e6


def start(kind: str, settings: Settings, log_dir: Path, *, argv: list[str] | None = None, **extra: object) -> Proc:
    """Start one process of ``kind`` with ``settings`` (plus ``extra`` settings) in its environment."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{kind}-{port}.log"
    env = settings.child_env(web_port=port, **extra)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(argv or COMMANDS[kind], env=env, stdout=log, stderr=subprocess.STDOUT)
    proc = Proc(kind, popen, port, log_path, psutil.Process(popen.pid))
    proc.cpu_rss()  # starts the CPU counter
    return proc


def stop(procs: list[Proc], timeout: float = 60.0) -> None:
    for p in procs:
        if p.alive():
            p.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()


class Http:
    """GETs to the workers' web ports (aiohttp: Faust already depends on it)."""

    def __init__(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def text(self, port: int, path: str) -> str | None:
        try:
            async with self.session.get(f"http://127.0.0.1:{port}{path}") as r:
                return await r.text() if r.status == 200 else None
        except (TimeoutError, OSError, Exception):
            return None

    async def close(self) -> None:
        await self.session.close()


async def wait_ready(procs: list[Proc], http: Http, partitions: int, timeout: float = 180.0) -> float:
    """Wait until the workers (with a web port) own all partitions with their tables restored; seconds."""
    import orjson

    started = time.monotonic()
    web = [p for p in procs if p.kind in HAS_WEB]
    while web:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.kind} worker (pid {p.pid}) exited:\n{p.tail()}")
        owned: list[int] = []
        ready = True
        for p in web:
            body = await http.text(p.port, "/health")
            health = orjson.loads(body) if body else {}
            if not health.get("ready") or not health.get("partitions"):
                ready = False
            owned += health.get("partitions", [])
        if ready and sorted(owned) == list(range(partitions)):
            break
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"workers not ready after {timeout:.0f} s:\n{web[0].tail()}")
        await asyncio.sleep(0.5)
    return time.monotonic() - started


# ---- /metrics ------------------------------------------------------------------------------------------

HISTOGRAMS = ("intentstream_batch_size", "intentstream_model_seconds", "intentstream_latency_seconds")
COUNTERS = (
    "intentstream_events_in",
    "intentstream_events_scored",
    "intentstream_dlq",
    "intentstream_duplicates",
    "intentstream_intents_emitted",
    "intentstream_churn_alerts",
)


def parse_metrics(text: str) -> dict[str, Any]:
    """Counters (summed over labels) and histograms ({"count", "sum", "buckets": {le: cumulative}})."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {c: 0.0 for c in COUNTERS}
    for h in HISTOGRAMS:
        out[h] = {"count": 0.0, "sum": 0.0, "buckets": {}}
    for family in text_string_to_metric_families(text):
        if family.name in COUNTERS:
            out[family.name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
        elif family.name in HISTOGRAMS:
            h = out[family.name]
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    h["buckets"][s.labels["le"]] = s.value
                elif s.name.endswith("_count"):
                    h["count"] = s.value
                elif s.name.endswith("_sum"):
                    h["sum"] = s.value
    return out


def add_metrics(a: dict[str, Any] | None, b: dict[str, Any], sign: float = 1.0) -> dict[str, Any]:
    """a + sign * b, key by key (sum over workers, or a difference between two scrapes)."""
    if a is None:
        a = {c: 0.0 for c in COUNTERS} | {h: {"count": 0.0, "sum": 0.0, "buckets": {}} for h in HISTOGRAMS}
    out: dict[str, Any] = {}
    for c in COUNTERS:
        out[c] = a[c] + sign * b[c]
    for h in HISTOGRAMS:
        buckets = dict(a[h]["buckets"])
        for le, v in b[h]["buckets"].items():
            buckets[le] = buckets.get(le, 0.0) + sign * v
        out[h] = {
            "count": a[h]["count"] + sign * b[h]["count"],
            "sum": a[h]["sum"] + sign * b[h]["sum"],
            "buckets": buckets,
        }
    return out


async def scrape(procs: list[Proc], http: Http) -> dict[str, Any] | None:
    """Engine metrics summed over the workers; None if one did not answer."""
    total = None
    for p in procs:
        if p.kind != "engine":
            continue
        text = await http.text(p.port, "/metrics")
        if text is None:
            return None
        total = add_metrics(total, parse_metrics(text))
    return total


# ---- Kafka offsets -------------------------------------------------------------------------------------


class Offsets:
    """End offsets of topics and committed offsets of groups, summed over partitions."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.consumer: Any = None
        self.admin: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        self.consumer = AIOKafkaConsumer(**kafka_client_kwargs(self.settings), enable_auto_commit=False)
        await self.consumer.start()
        self.admin = AIOKafkaAdminClient(**kafka_client_kwargs(self.settings))
        await self.admin.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self.admin is not None:
            await self.admin.close()

    def _tps(self, topics: list[str] | tuple[str, ...]) -> list[Any]:
        from aiokafka import TopicPartition

        return [TopicPartition(t, p) for t in topics for p in range(self.settings.partitions)]

    async def end(self, topics: list[str] | tuple[str, ...]) -> int:
        ends = await self.consumer.end_offsets(self._tps(topics))
        return int(sum(ends.values()))

    async def committed(self, group: str, topic: str) -> int | None:
        try:
            got = await self.admin.list_consumer_group_offsets(group, partitions=self._tps([topic]))
        except Exception:
            return None
        return int(sum(max(0, o.offset) for o in got.values())) if got else 0


async def create_topics(settings: Settings, topics: dict[str, int]) -> None:
    """Create the topics (name -> partitions) that do not exist, as the worker creates its own
    (stream.topics.create_missing_topics: the settings' output topics with the broker's clock as their records'
    timestamps; a topic the broker refuses raises)."""
    from stream.topics import admin_client, create_missing_topics

    async with admin_client(settings) as admin:
        await create_missing_topics(admin, settings, topics)


async def delete_topics(settings: Settings, prefix: str) -> list[str]:
    """Delete every topic whose name starts with ``prefix`` (ours: inputs, outputs, changelogs)."""
    from stream.topics import admin_client

    async with admin_client(settings) as admin:
        ours = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if ours:
            await admin.delete_topics(ours)
        return ours


def broker_process(settings: Settings) -> psutil.Process | None:
    """The local broker's process when it runs on this machine (its CPU is part of every figure)."""
    pid_file = (settings.state_dir / "kafka" / "broker.pid").resolve()
    try:
        return psutil.Process(int(pid_file.read_text().strip()))
    except (OSError, ValueError, psutil.Error):
        return None


async def read_to_end(
    settings: Settings, topics: list[str], isolation: str = "read_uncommitted", timeout_s: float = 300.0
) -> dict[str, list[Any]]:
    """Every record of ``topics`` (topic -> its ConsumerRecords), from the beginning to the end offsets taken at the
    call: the last stable offsets under read_committed. The one reader of the tests, the chaos run and the demo's
    checks; fails after ``timeout_s`` rather than wait for records that never come."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        **kafka_client_kwargs(settings),
        enable_auto_commit=False,
        isolation_level=isolation,
        max_partition_fetch_bytes=4 << 20,  # dead-letter records carry up to 342 KiB of the original
    )
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t, n in (await partitions(settings, topics)).items() for p in range(n)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        got: dict[str, list[Any]] = {t: [] for t in topics}
        deadline = time.monotonic() + timeout_s
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topics} to their end offsets within {timeout_s:.0f} s")
            for tp, msgs in (await consumer.getmany(timeout_ms=500)).items():
                got[tp.topic].extend(m for m in msgs if m.offset < end[tp])
        return got
    finally:
        await consumer.stop()


async def partitions(settings: Settings, topics: list[str]) -> dict[str, int]:
    """Partitions of each topic, from the broker (a topic that does not exist: an error naming it)."""
    from stream.topics import admin_client

    async with admin_client(settings) as admin:
        described = await admin.describe_topics(topics)
    out = {d["topic"]: len(d["partitions"]) for d in described}
    missing = [t for t in topics if not out.get(t)]
    if missing:
        raise LookupError(f"no such topic: {', '.join(missing)}")
    return out
