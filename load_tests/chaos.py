"""Chaos scenario: a fixed simulator trace replayed through crashes, rebalances, a broker restart, a paused worker
and a model swap, on a Kafka broker of its own; then every input record is matched to its outcome.

    python -m load_tests chaos --out DIR [--guarantee at_least_once|exactly_once] [--short]
    python -m load_tests.chaos --out DIR ...               (the same, without the load_tests dispatcher)

The trace (simulator users with malformed records mixed in) is sent in segments at a fixed rate; during each
segment one fault happens while records flow:

  1. warm-up            one worker
  2. kill -9 + restart  SIGKILL the worker, start it again on the same state folder
  3. rebalance          a second worker joins, then is SIGKILLed: the survivor takes its partitions and state
  4. broker restart     the broker is stopped (SIGTERM, clean) and started again mid-stream
  5. pause              two workers; one is SIGSTOPped for longer than the session timeout, then SIGCONTed
  6. model swap         a new artifact is written into the model directory during traffic

Workers run with INTENTSTREAM_EMIT_POLICY=every_event, so every scored event has an intent record carrying its
event_id; a rejected record is in the DLQ with its original bytes (base64) and its source offset. Once the
consumer group has committed the end of the input, every output topic is read to its end (read_committed
under exactly-once) and DIR/chaos.json gets:

  inputs             records in the input topic
  scored / dlq       inputs whose event_id has an intent record / that are in the DLQ
  lost               inputs with neither
  duplicate_intents  intent records beyond the first per event_id
  duplicate_alerts   churn alerts beyond the first per (user, last_seen)
  recovery_s         seconds from each fault until every partition is owned by a ready worker and the group
                     commits offsets again (scoring again)
  state_mismatches   users whose window (sha256 over /users/{id}/score?window=1) differs from an offline
                     replay of the same records without any fault

A worker that exits on its own (exactly-once: a paused worker finds its producer fenced and exits) is
restarted at once, as a supervisor would; such exits are listed under "unexpected_exits".
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from load_tests.procs import free_port, read_to_end
from stream.settings import Settings
from stream.topics import admin_client, changelog_topic, kafka_client_kwargs

# Faust reads these from the environment (no INTENTSTREAM_ prefix): a dead or paused member leaves the group
# after 10 s instead of 60 s, so a fault costs seconds, not minutes.
FAUST_ENV = {"BROKER_SESSION_TIMEOUT": "10", "BROKER_HEARTBEAT_INTERVAL": "1", "BROKER_REBALANCE_TIMEOUT": "20"}
SESSION_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 240.0
DRAIN_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Plan:
    users: int  # simulator users in the trace
    days: float  # of event time
    segment_s: float  # each of the six segments of the trace is sent over this many seconds
    bad_every: int  # one malformed record after every N events
    state_sample: int  # users whose window is compared with the offline replay (0: all)


FULL = Plan(users=8000, days=5.0, segment_s=40.0, bad_every=40, state_sample=0)
SHORT = Plan(users=1000, days=3.0, segment_s=20.0, bad_every=25, state_sample=0)
SEGMENTS = ("warmup", "kill_restart", "rebalance", "broker_restart", "pause", "model_swap")


# ---- the trace ------------------------------------------------------------------------------------------


def build_trace(plan: Plan, seed: int) -> list[tuple[bytes | None, bytes]]:
    """Simulator events (key = user_id) with malformed records mixed in, the same list for the same seed."""
    from stream.traffic.badrecords import generate
    from stream.traffic.simulator import simulate

    events = simulate(plan.users, plan.days, seed).events
    bad = iter(generate(len(events) // plan.bad_every + 1, seed=seed))
    trace: list[tuple[bytes | None, bytes]] = []
    for i, e in enumerate(events, start=1):
        trace.append((e.user_id.encode(), e.to_json()))
        if i % plan.bad_every == 0:
            b = next(bad)
            trace.append((b.key, b.value))
    return trace


def split(trace: list[Any], n: int) -> list[list[Any]]:
    size = -(-len(trace) // n)
    return [trace[i * size : (i + 1) * size] for i in range(n)]


# ---- processes ------------------------------------------------------------------------------------------


def worker_env(settings: Settings, port: int, guarantee: str) -> dict[str, str]:
    env = settings.child_env(web_port=port, emit_policy="every_event", processing_guarantee=guarantee, log_level="INFO")
    return {**env, **FAUST_ENV}


class ChaosWorker:
    """One worker slot: a fixed web port, hence a fixed state folder (state_dir/worker-PORT) across restarts."""

    def __init__(self, name: str, settings: Settings, log_dir: Path, guarantee: str):
        self.name = name
        self.port = free_port()
        self.env = worker_env(settings, self.port, guarantee)
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.wanted = False  # the scenario wants this worker running
        self.cwd: Path | None = None  # run the worker from another checkout (before/after comparisons)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== chaos: start {self.name} at {time.strftime('%H:%M:%S')} ====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stream.cli", "worker"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
            )
        self.wanted, self.paused = True, False

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.wanted = False
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        self.wanted = False
        if self.paused:
            self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health(self) -> dict[str, Any]:
        if self.paused or not self.alive():
            return {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=3) as r:
                return dict(json.loads(r.read()))
        except (OSError, ValueError):
            return {}

    def get(self, path: str) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return dict(json.loads(r.read()))
        except urllib.error.HTTPError as err:
            return {"status": err.code}

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Scenario:
    settings: Settings
    out: Path
    guarantee: str
    workers: list[ChaosWorker] = field(default_factory=list)
    unexpected_exits: list[dict[str, Any]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f} s] {text}"
        self.log.append(line)
        print(f"chaos: {line}", flush=True)

    def supervise(self) -> None:
        """Restart a wanted worker that exited on its own (what systemd or Kubernetes would do)."""
        for w in self.workers:
            if w.wanted and not w.alive() and w.proc is not None:
                code = w.proc.returncode
                self.unexpected_exits.append({"worker": w.name, "code": code, "at_s": time.monotonic() - self.started})
                self.note(f"{w.name} exited with code {code}; restarting it")
                w.start()

    def wait_ready(self, what: str, timeout: float = READY_TIMEOUT_S) -> float:
        """Wait until the running, unpaused workers own all partitions with their tables restored."""
        started = time.monotonic()
        while True:
            self.supervise()
            live = [w for w in self.workers if w.wanted and not w.paused]
            owned: list[int] = []
            ready = bool(live)
            for w in live:
                h = w.health()
                if not h.get("ready") or not h.get("partitions"):
                    ready = False
                owned += h.get("partitions", [])
            if ready and sorted(owned) == list(range(self.settings.partitions)):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                tails = "\n".join(f"--- {w.name}\n{w.tail()}" for w in live)
                raise RuntimeError(f"chaos: {what}: workers not ready after {timeout:.0f} s\n{tails}")
            time.sleep(0.25)

    def recovered(self, what: str, since: float) -> float:
        """Seconds from ``since`` until the workers own every partition again *and* score again: the group's
        committed offsets move past where they stood once the workers were ready (or the input is all done)."""
        self.wait_ready(what)
        committed, _ = asyncio.run(_offsets(self.settings))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            now_committed, now_end = asyncio.run(_offsets(self.settings))
            if now_committed > committed or now_committed >= now_end:
                return time.monotonic() - since
            if time.monotonic() > deadline:
                raise RuntimeError(f"chaos: {what}: no offset committed for {READY_TIMEOUT_S:.0f} s")
            self.sleep(0.5)

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.supervise()
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


# ---- Kafka I/O -------------------------------------------------------------------------------------------


async def _produce(settings: Settings, records: list[tuple[bytes | None, bytes]], rate: float) -> int:
    """Send at ``rate`` records/s; returns the number of failed sends (the topic is read back anyway)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        **kafka_client_kwargs(settings),
        acks="all",
        enable_idempotence=True,
        request_timeout_ms=120_000,  # rides out the broker restart
        retry_backoff_ms=500,
    )
    await producer.start()
    futures = []
    try:
        started = time.monotonic()
        for i, (key, value) in enumerate(records):
            futures.append(await producer.send(settings.topic_clickstream, value, key=key))
            ahead = (i + 1) / rate - (time.monotonic() - started)
            if ahead > 0.005:
                await asyncio.sleep(ahead)
        results = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await producer.stop()
    return sum(isinstance(r, BaseException) for r in results)


class Feeder:
    """Sends one segment of the trace in a background thread."""

    def __init__(self, settings: Settings, records: list[tuple[bytes | None, bytes]], rate: float):
        self.failed = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(settings, records, rate), daemon=True)
        self.thread.start()

    def _run(self, settings: Settings, records: list[tuple[bytes | None, bytes]], rate: float) -> None:
        try:
            self.failed = asyncio.run(_produce(settings, records, rate))
        except BaseException as exc:  # reported by join()
            self.error = exc

    def join(self, scenario: Scenario) -> int:
        while self.thread.is_alive():
            scenario.supervise()
            self.thread.join(0.25)
        if self.error is not None:
            raise RuntimeError(f"chaos: producing the trace failed: {self.error!r}") from self.error
        return self.failed


async def _offsets(settings: Settings) -> tuple[int, int]:
    """(offsets the consumer group has committed, end offsets), summed over the input partitions."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings), group_id=settings.app_id, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer._client.set_topics([settings.topic_clickstream])
        tps = [TopicPartition(settings.topic_clickstream, p) for p in range(settings.partitions)]
        end = await consumer.end_offsets(tps)
        committed = [await consumer.committed(tp) for tp in tps]
        return sum(c or 0 for c in committed), sum(end.values())
    finally:
        await consumer.stop()


def _lag(settings: Settings) -> int:
    committed, end = asyncio.run(_offsets(settings))
    return end - committed


# ---- accounting ------------------------------------------------------------------------------------------


def _event_id(value: bytes | None) -> str | None:
    if not value:
        return None
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    event_id = obj.get("event_id") if type(obj) is dict else None
    return event_id if type(event_id) is str else None


def account(inputs: list[Any], intents: list[Any], dlq: list[Any], alerts: list[Any]) -> dict[str, Any]:
    """Match every input record to its outcome: an intent record with its event_id, or a DLQ record (by source
    offset, or by the event_id recovered from the original bytes when they parse)."""
    intent_ids = Counter(orjson.loads(m.value)["event_id"] for m in intents)
    dlq_sources: Counter[tuple[int, int]] = Counter()
    dlq_ids: set[str] = set()
    for m in dlq:
        d = orjson.loads(m.value)
        dlq_sources[(d["source"]["partition"], d["source"]["offset"])] += 1
        original = base64.b64decode(d["value_b64"]) if d["value_b64"] else None
        if (event_id := _event_id(original)) is not None:
            dlq_ids.add(event_id)
    scored = in_dlq = lost = 0
    lost_examples: list[dict[str, Any]] = []
    for m in inputs:
        event_id = _event_id(m.value)
        if (m.partition, m.offset) in dlq_sources:
            in_dlq += 1
        elif event_id is not None and event_id in intent_ids:
            scored += 1
        elif event_id is not None and event_id in dlq_ids:
            in_dlq += 1
        else:
            lost += 1
            if len(lost_examples) < 10:
                lost_examples.append({"partition": m.partition, "offset": m.offset, "event_id": event_id})
    alert_keys = Counter((m.key, orjson.loads(m.value)["last_seen"]) for m in alerts)
    return {
        "inputs": len(inputs),
        "scored": scored,
        "dlq": in_dlq,
        "lost": lost,
        "duplicate_intents": sum(n - 1 for n in intent_ids.values()),
        "duplicate_alerts": sum(n - 1 for n in alert_keys.values()),
        "duplicate_dlq": sum(n - 1 for n in dlq_sources.values()),
        "intent_records": len(intents),
        "dlq_records": len(dlq),
        "alert_records": len(alerts),
        "lost_examples": lost_examples,
    }


def expected_windows(settings: Settings, inputs: list[Any]) -> dict[str, Any]:
    """Each user's state after the input records in partition order, without any fault (the engine's own rules:
    the validator, then UserState.accept; rejected records leave the state alone)."""
    from models.features import FeaturizerConfig
    from stream.contract import Event, validate
    from stream.state.user import UserState

    config = FeaturizerConfig(window=settings.window_size)
    lateness_ms = int(settings.allowed_lateness_s * 1000)
    states: dict[str, UserState] = {}
    for m in sorted(inputs, key=lambda m: (m.partition, m.offset)):
        event = validate(m.value, m.key, max_bytes=settings.max_record_bytes)
        if type(event) is Event:
            states.setdefault(event.user_id, UserState()).accept(event, config, lateness_ms)
    return states


def window_difference(got: dict[str, Any], expected: Any) -> dict[str, Any]:
    """What a mismatched window holds that the replay's does not, and the reverse, as (ts, type) pairs: events
    missing from the worker's window point at a lost or rewound state, extra ones at a repeated input."""
    from stream.contract import EVENT_TYPES

    want = list(zip(expected.records["ts"].tolist(), [EVENT_TYPES[t] for t in expected.records["type"]], strict=True))
    have = list(zip(got.get("ts", []), got.get("type", []), strict=True))
    missing, extra = Counter(want) - Counter(have), Counter(have) - Counter(want)
    return {
        # the same events, yet the records differ: a derived field (count, gap, flags, the event hash) does
        "same_events_other_fields_differ": not missing and not extra,
        "events": len(have),
        "expected_events": len(want),
        "missing": sorted(missing.elements())[:5],
        "extra": sorted(extra.elements())[:5],
        "last_ts": max((t for t, _ in have), default=None),
        "expected_last_ts": max((t for t, _ in want), default=None),
    }


def compare_states(scenario: Scenario, expected: dict[str, Any], sample: int) -> dict[str, Any]:
    worker = next(w for w in scenario.workers if w.wanted and w.alive())
    users = sorted(expected)
    if sample and len(users) > sample:
        step = len(users) / sample
        users = [users[int(i * step)] for i in range(sample)]
    mismatches: list[str] = []
    details: dict[str, Any] = {}
    for user in users:
        got = worker.get(f"/users/{user}/score?window=1")
        window = got.get("window", {})
        if window.get("sha256") != hashlib.sha256(expected[user].records.tobytes()).hexdigest():
            mismatches.append(user)
            if len(details) < 5:
                details[user] = window_difference(window, expected[user]) if window else got
    return {
        "users_checked": len(users),
        "state_mismatches": len(mismatches),
        "mismatch_examples": mismatches[:10],
        "mismatch_details": details,
    }


# ---- the scenario ----------------------------------------------------------------------------------------


def run_scenario(out: Path, guarantee: str, plan: Plan, seed: int) -> dict[str, Any]:
    import logging

    from stream import broker
    from stream.topics import ensure_topics

    # The feeder's client logs every refused connection while the broker restarts: expected here.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    from tests.helpers import write_model

    out.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    base = out / f"run-{guarantee}-{tag}"
    settings = Settings.from_env(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        kafka_controller_port=free_port(),
        state_dir=str(base / "state"),
        model_dir=str(base / "models"),
        app_id=f"chaos-{tag}",
        topic_clickstream=f"clickstream-{tag}",
        topic_dlq=f"clickstream-dlq-{tag}",
        topic_intent=f"purchase-intent-{tag}",
        topic_churn=f"churn-alerts-{tag}",
    )
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    scenario = Scenario(settings, out, guarantee)
    load_before = os.getloadavg()
    trace = build_trace(plan, seed)
    segments = dict(zip(SEGMENTS, split(trace, len(SEGMENTS)), strict=True))
    scenario.note(f"trace: {len(trace)} records, {plan.users} users; broker at {settings.kafka_bootstrap}")
    broker.start(settings)
    recovery: dict[str, float] = {}
    failed_sends = 0
    a = ChaosWorker("worker-a", settings, logs, guarantee)
    b = ChaosWorker("worker-b", settings, logs, guarantee)
    scenario.workers = [a, b]
    try:
        ensure_topics(settings)
        write_model(settings.model_dir, seed=0)
        a.start()
        scenario.note(f"worker-a ready after {scenario.wait_ready('start'):.1f} s")

        def segment(name: str, fault: Callable[[], None], lead_s: float = 2.0) -> None:
            nonlocal failed_sends
            records = segments[name]
            rate = len(records) / plan.segment_s
            scenario.note(f"segment {name}: {len(records)} records at {rate:.0f}/s")
            feeder = Feeder(settings, records, rate)
            scenario.sleep(lead_s)
            fault()
            failed_sends += feeder.join(scenario)

        segment("warmup", lambda: None)

        def kill_restart() -> None:
            t0 = time.monotonic()
            a.kill()
            a.start()
            recovery["kill_restart"] = scenario.recovered("kill_restart", t0)
            scenario.note(f"SIGKILL + restart of worker-a: scoring again after {recovery['kill_restart']:.1f} s")

        segment("kill_restart", kill_restart)

        def rebalance() -> None:
            b.start()
            scenario.note(f"worker-b joined; two workers own all partitions after {scenario.wait_ready('join'):.1f} s")
            scenario.sleep(2.0)
            t0 = time.monotonic()
            b.kill()
            recovery["rebalance"] = scenario.recovered("rebalance", t0)
            scenario.note(f"SIGKILL of worker-b: worker-a scores all partitions after {recovery['rebalance']:.1f} s")

        segment("rebalance", rebalance, lead_s=0.5)

        def broker_restart() -> None:
            t0 = time.monotonic()
            broker.stop(settings)
            down = time.monotonic() - t0
            scenario.sleep(2.0)
            broker.start(settings)
            scenario.note(f"broker stopped ({down:.1f} s) and started again ({time.monotonic() - t0:.1f} s)")
            recovery["broker_restart"] = scenario.recovered("broker_restart", t0)
            scenario.note(f"broker restart: scoring again {recovery['broker_restart']:.1f} s after the stop")

        segment("broker_restart", broker_restart)

        b.start()
        scenario.note(f"worker-b back; two workers ready after {scenario.wait_ready('rejoin'):.1f} s")

        def pause() -> None:
            t0 = time.monotonic()
            a.signal(signal.SIGSTOP)
            a.paused = True
            scenario.sleep(SESSION_TIMEOUT_S + 5.0)
            scenario.wait_ready("pause")  # worker-b alone owns everything by now
            a.signal(signal.SIGCONT)
            a.paused = False
            scenario.note(f"worker-a paused {time.monotonic() - t0:.1f} s, resumed")
            recovery["pause"] = scenario.recovered("resume", t0)
            scenario.note(f"pause/resume: scoring again {recovery['pause']:.1f} s after the SIGSTOP")

        segment("pause", pause, lead_s=1.0)

        def model_swap() -> None:
            path = write_model(settings.model_dir, seed=1)
            scenario.note(f"model swap: wrote {path.name}")

        segment("model_swap", model_swap)

        scenario.note("trace sent; waiting for the consumer group to commit the end of the input")
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while (lag := _lag(settings)) > 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"chaos: {lag} input records still uncommitted after {DRAIN_TIMEOUT_S:.0f} s")
            scenario.sleep(1.0)
        scenario.wait_ready("drain")
        scenario.note("input fully committed; reading every topic to its end")
        isolation = "read_committed" if guarantee == "exactly_once" else "read_uncommitted"
        topics = [settings.topic_clickstream, settings.topic_intent, settings.topic_dlq, settings.topic_churn]
        got = asyncio.run(read_to_end(settings, topics, isolation))
        result = account(
            got[settings.topic_clickstream],
            got[settings.topic_intent],
            got[settings.topic_dlq],
            got[settings.topic_churn],
        )
        expected = expected_windows(settings, got[settings.topic_clickstream])
        result.update(compare_states(scenario, expected, plan.state_sample))
        versions = Counter(orjson.loads(m.value)["model"]["version"] for m in got[settings.topic_intent])
        result.update(
            {
                "recovery_s": [round(recovery[k], 1) for k in SEGMENTS if k in recovery],
                "recovery": {k: round(v, 1) for k, v in recovery.items()},
                "guarantee": guarantee,
                "trace": {"records": len(trace), "users": plan.users, "days": plan.days, "segment_s": plan.segment_s},
                "failed_sends": failed_sends,
                "unexpected_exits": scenario.unexpected_exits,
                "model_versions": dict(sorted(versions.items())),
                "seconds": round(time.monotonic() - scenario.started, 1),
                "load_average": {
                    "before": [round(x, 2) for x in load_before],
                    "after": [round(x, 2) for x in os.getloadavg()],
                },
                "cpus": os.cpu_count(),
                "timeline": scenario.log,
            }
        )
        return result
    finally:
        for w in scenario.workers:
            w.stop()
        broker.stop(settings)


def targets_met(result: dict[str, Any]) -> bool:
    ok = result["lost"] == 0 and result["state_mismatches"] == 0
    if result["guarantee"] == "exactly_once":
        ok = ok and result["duplicate_intents"] == 0 and result["duplicate_alerts"] == 0
    return ok


# ---- recovery time with a large state ----------------------------------------------------------------------


STATE_BASE_TS = 1_767_600_000_000 - 30 * 86_400_000  # user u's events: STATE_BASE_TS + u * 1000 + i * 60_000


def user_states(n_users: int, seed: int) -> Any:
    """(key, state) of ``n_users`` users with four past events each, as the engine stores them (about 480 bytes:
    header, a 64-float hidden state, four window records). As in a running partition, only the users active in the
    last session gap (the newest 1,000) have an open session; the sessions of the others were judged already."""
    import numpy as np

    from models.features import FeaturizerConfig
    from stream.contract import Event
    from stream.state.user import UserState

    config = FeaturizerConfig()
    hidden = np.zeros(64, dtype=np.float32)
    base = STATE_BASE_TS
    for u in range(n_users):
        state = UserState()
        for i in range(4):
            state.accept(Event(f"r{u}-{i}", f"r{u:07d}", "product_view", base + u * 1000 + i * 60_000), config, 0)
        state.hidden, state.model_tag, state.score = hidden, "0123456789abcdef", 0.1
        if u < n_users - 1000:
            state.closed_ts = state.last_ts
        yield f"r{u:07d}".encode(), state.to_bytes()


async def _end_sum(settings: Settings, topic: str, isolation: str) -> int:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings), isolation_level=isolation)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


def measure_recovery(out: Path, n_users: int, guarantee: str, seed: int = 7) -> dict[str, Any]:
    """A worker whose table holds ``n_users`` users: how long until it scores again, (1) started on an empty
    state folder (the whole changelog is restored: a new machine, or any restart under exactly-once), then
    (2) SIGKILLed and started again on its own RocksDB (only the changelog's tail is replayed). "Scoring" is
    measured end to end: fresh events for users of every partition until their intent records are out, which
    includes the scan that rebuilds each partition's session index (its seconds come from the worker's log)."""
    import logging
    import re

    from aiokafka.admin import NewTopic

    from stream import broker
    from stream.topics import ensure_topics
    from stream.traffic.replay import replay
    from tests.helpers import write_model

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    tag = uuid.uuid4().hex[:8]
    base = out / f"recovery-{guarantee}-{tag}"
    settings = Settings.from_env(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        kafka_controller_port=free_port(),
        state_dir=str(base / "state"),
        model_dir=str(base / "models"),
        app_id=f"recovery-{tag}",
        topic_clickstream=f"clickstream-{tag}",
        topic_dlq=f"clickstream-dlq-{tag}",
        topic_intent=f"purchase-intent-{tag}",
        topic_churn=f"churn-alerts-{tag}",
    )
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    changelog = changelog_topic(settings)
    isolation = "read_committed" if guarantee == "exactly_once" else "read_uncommitted"
    broker.start(settings)
    worker = ChaosWorker("worker", settings, logs, guarantee)
    scenario = Scenario(settings, out, guarantee, workers=[worker])
    result: dict[str, Any] = {"users": n_users, "guarantee": guarantee, "load_average_before": os.getloadavg()}
    try:
        ensure_topics(settings)
        write_model(settings.model_dir, seed=0)

        async def create_changelog() -> None:  # as Faust declares it: compacted, co-partitioned with the input
            async with admin_client(settings) as admin:
                await admin.create_topics(
                    [NewTopic(changelog, settings.partitions, 1, topic_configs={"cleanup.policy": "compact"})]
                )

        asyncio.run(create_changelog())
        started = time.monotonic()
        stats = asyncio.run(replay(settings, user_states(n_users, seed), topic=changelog))
        result["changelog"] = {"records": stats.sent, "seconds": round(time.monotonic() - started, 1)}
        scenario.note(f"changelog: {stats.sent} user states written in {result['changelog']['seconds']} s")

        probe_round = [0]

        def scoring_again(what: str, t0: float) -> dict[str, float]:
            scenario.wait_ready(what, timeout=1800)
            ready_s = time.monotonic() - t0
            before = asyncio.run(_end_sum(settings, settings.topic_intent, isolation))
            probe_round[0] += 1
            # Each probe comes just after its user's last event: in order for the user, and below the partition's
            # watermark (the newest state), so it closes no sessions; a probe far ahead in event time would close
            # every open session of the partition at once (half a million churn checks): not recovery work.
            probes = [
                (
                    f"r{u:07d}".encode(),
                    orjson.dumps({"event_id": f"probe-{probe_round[0]}-{u}", "user_id": f"r{u:07d}",
                                  "type": "add_to_cart", "ts": STATE_BASE_TS + u * 1000 + 3 * 60_000 + probe_round[0]}),
                )
                for u in range(0, n_users, max(1, n_users // 64))
            ]  # fmt: skip
            asyncio.run(replay(settings, probes))
            deadline = time.monotonic() + 1800
            while asyncio.run(_end_sum(settings, settings.topic_intent, isolation)) < before + len(probes):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"chaos: {what}: the probe events were not scored")
                scenario.sleep(0.5)
            return {"ready_s": round(ready_s, 1), "scoring_s": round(time.monotonic() - t0, 1)}

        t0 = time.monotonic()
        worker.start()
        result["cold"] = scoring_again("cold start", t0)
        scenario.note(f"cold start (whole changelog restored): {result['cold']}")
        scenario.sleep(3.0)  # one commit interval: the probes are committed
        t0 = time.monotonic()
        worker.kill()
        worker.start()
        result["after_sigkill"] = scoring_again("restart after SIGKILL", t0)
        scenario.note(f"restart after SIGKILL: {result['after_sigkill']}")
        log = worker.log_path.read_text(errors="replace")
        scans = [
            float(x) for x in re.findall(r"event=sessions_restored partition=\d+ users=\d+ seconds=([0-9.]+)", log)
        ]
        users_scanned = [int(x) for x in re.findall(r"event=sessions_restored partition=\d+ users=(\d+)", log)]
        result["session_scan"] = {"per_partition_s": scans, "users": users_scanned}
        result["rss_mb"] = psutil_rss_mb(worker)
        result["load_average_after"] = os.getloadavg()
        result["cpus"] = os.cpu_count()
        result["session_timeout_s"] = SESSION_TIMEOUT_S
        return result
    finally:
        worker.stop()
        broker.stop(settings)


def psutil_rss_mb(worker: ChaosWorker) -> int | None:
    import psutil

    try:
        return int(psutil.Process(worker.proc.pid).memory_info().rss >> 20) if worker.proc else None
    except psutil.Error:
        return None


# ---- throughput of the two guarantees ------------------------------------------------------------------------


def measure_throughput(
    out: Path, n_users: int, days: float, seed: int = 7, engine_root: Path | None = None
) -> dict[str, Any]:
    """Events per second of one worker draining the same backlog of simulator events, under each guarantee
    (default emission policy); ``engine_root``: run the worker from another checkout (a before/after figure)."""
    import logging

    from stream import broker
    from stream.traffic.replay import replay
    from stream.traffic.simulator import simulate
    from tests.helpers import write_model

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    tag = uuid.uuid4().hex[:8]
    base = out / f"throughput-{tag}"
    common = Settings.from_env(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        kafka_controller_port=free_port(),
        state_dir=str(base / "state"),
        model_dir=str(base / "models"),
        topic_clickstream=f"clickstream-{tag}",
    )
    broker.start(common)
    result: dict[str, Any] = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
    try:
        write_model(common.model_dir, seed=0)
        events = simulate(n_users, days, seed).events
        asyncio.run(replay(common, events))
        result["events"] = len(events)
        for guarantee in ("at_least_once", "exactly_once"):
            s = Settings.from_env(
                **{
                    **common.public_dict(),
                    "kafka_sasl_password": common.kafka_sasl_password,
                    "app_id": f"tp-{guarantee}-{tag}",
                    "topic_dlq": f"dlq-{guarantee}-{tag}",
                    "topic_intent": f"pi-{guarantee}-{tag}",
                    "topic_churn": f"ca-{guarantee}-{tag}",
                }
            )
            w = ChaosWorker(f"{guarantee}", s, base, guarantee)
            w.env["INTENTSTREAM_EMIT_POLICY"] = "on_change"
            if engine_root is not None:
                w.cwd = engine_root
            scenario = Scenario(s, out, guarantee, workers=[w])
            w.start()
            try:
                scenario.wait_ready("start")
                t0 = time.monotonic()
                while _lag(s) > 0:
                    scenario.sleep(0.5)
                seconds = time.monotonic() - t0
            finally:
                w.stop()
            result[guarantee] = {"seconds": round(seconds, 1), "events_per_s": round(len(events) / seconds, 1)}
            scenario.note(f"{guarantee}: {result[guarantee]}")
        alo, eos = result["at_least_once"]["events_per_s"], result["exactly_once"]["events_per_s"]
        result["exactly_once_cost"] = round(1 - eos / alo, 3)
        result["load_average_after"] = os.getloadavg()
        return result
    finally:
        broker.stop(common)


# ---- command line ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for chaos.json, worker logs and state")
    parser.add_argument(
        "--guarantee", choices=("at_least_once", "exactly_once"), default="at_least_once", help="processing guarantee"
    )
    parser.add_argument("--short", action="store_true", help="a small trace (the test suite's version)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the simulator trace and malformed records")
    parser.add_argument(
        "--recovery-users",
        type=int,
        metavar="N",
        help="instead of the scenario: recovery time of a worker whose table holds N users (DIR/recovery.json)",
    )
    parser.add_argument(
        "--throughput",
        action="store_true",
        help="instead of the scenario: events/s of one worker under each guarantee (DIR/throughput.json)",
    )
    parser.add_argument("--users", type=int, default=4000, help="--throughput: simulator users (default 4000)")
    parser.add_argument("--engine-root", type=Path, help="--throughput: run the worker from this checkout instead")


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="python -m load_tests chaos", description=__doc__.split("\n")[0])
        add_arguments(parser)
        args = parser.parse_args(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.recovery_users:
        result = measure_recovery(args.out, args.recovery_users, args.guarantee, args.seed)
        (args.out / "recovery.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        print(f"chaos: recovery with {args.recovery_users:,} users: {orjson.dumps(result).decode()}")
        return 0
    if args.throughput:
        result = measure_throughput(args.out, args.users, 5.0, args.seed, args.engine_root)
        (args.out / "throughput.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        print(f"chaos: throughput: {orjson.dumps(result).decode()}")
        return 0
    result = run_scenario(args.out, args.guarantee, SHORT if args.short else FULL, args.seed)
    path = args.out / "chaos.json"
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    summary = {k: result[k] for k in ("inputs", "scored", "dlq", "lost", "duplicate_intents", "duplicate_alerts")}
    print(f"chaos: {args.guarantee}: {summary} recovery_s={result['recovery_s']} -> {path}")
    return 0 if targets_met(result) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
