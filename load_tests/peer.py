"""`python -m load_tests peer`: the worker beside Quix Streams 3.28, a peer stream processor, on one backlog.

    python -m load_tests peer [--events N] [--users U] [--turns T] [--systems S1,S2,...] --out DIR
    pip install -e '.[bench]'      (Quix Streams is a benchmark extra, not a runtime dependency)

What it measures: how many events per second, and how many CPU microseconds per event, each system needs to
drain the same backlog of simulator traffic (``--events`` events of ``--users`` users on ``--partitions``
partitions of a fresh topic ``lt-<8 hex>-backlog``, produced once), one process per system, on the CPU,
at least once, each with its own consumer group, state and output topics:

- ``quix_passthrough``: a Quix Streams Application (confluent-kafka consumer and producer, RocksDB state
  with a changelog topic) whose dataframe validates each record with the engine's validator
  (stream.contract.validate), keeps the user's window in Quix's state with the engine's state codec
  (stream.state.user.UserState, raw bytes through ``State.get_bytes``/``set_bytes``), sends rejected records
  to a dead-letter topic and writes one small record per event. No model: the cost of Quix itself.
- ``quix_model``: the same plus the GRU the way Quix's API invites, one forward pass per record through the
  engine's own scoring function (stream.scoring.score_batch with a batch of one user), and the engine's
  intent record (score, band, reasons) as its output.
- ``worker``: ``intentstream worker`` (Faust, batched scoring) with INTENTSTREAM_EMIT_POLICY=every_event:
  one intent record per event, like the two above.

The systems take turns (A B C, then C B A, then A B C, ...; ``--turns``), so a change in the machine's load
hits all of them alike; each figure is the median of its turns. A run stops once every input has its output
(output + dead-letter records). Its rate is the inputs processed over the seconds from its first to its last
output record, read from the records' broker timestamps (the output topics are created with
``message.timestamp.type=LogAppendTime``: Quix keeps the input's timestamp on what it produces, so only the
broker's clock is common to all three). Its CPU is the process's user + system time (psutil, children
included) over the samples in which it produced output, per output record; the broker's CPU over the same
window is reported beside it. Start-up (imports, model load, group join, state recovery) is left out of both
and reported on its own.

The Quix baselines use Quix's defaults as its documentation recommends (commit every 5 s, librdkafka's
producer batching, idempotent producer) and do no work the worker does not do: no session closing and no
churn alerts, which the worker does on top. The event window (the per-user history the model reads) fills
with the events/users ratio: 100,000 events of 10,000 users give windows of about 10 events; ``--users 1000``
fills the 64-event windows.

Writes DIR/peer_report.json, DIR/peer_summary.md and DIR/peer.png; the last stdout line is
``summary: worker_eps=... quix_passthrough_eps=... quix_model_eps=... worker_vs_quix_passthrough=...
worker_vs_quix_model=...`` (worker_vs_X: the worker's median events/s over X's).

Internally each Quix system runs as ``python -m load_tests.peer --system NAME`` with INTENTSTREAM_* settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

from load_tests import procs as P
from load_tests.procs import Offsets, Proc
from stream.settings import Settings

SYSTEMS = ("quix_passthrough", "quix_model", "worker")
QUIX_SYSTEMS = ("quix_passthrough", "quix_model")
QUIX_VERSION = "3.28.1"
MAX_FUTURE_MS = 86_400_000  # as stream/engine.py: event times more than a day ahead of the wall clock are rejected
TOO_LATE = "ts: later than the allowed lateness or older than the user's window"  # the engine's DLQ reason
STATE_KEY = b"u"  # one state entry per message key (Quix prefixes state keys with the record key)
COLORS = {"quix_passthrough": "tab:gray", "quix_model": "tab:orange", "worker": "tab:blue"}
INTERVAL_S = 0.5  # sampling period of output counts and CPU while a system drains the backlog


# ---- the Quix systems (child processes) ----------------------------------------------------------------


class Rejected(bytes):
    """A dead-letter record: its type routes it to the DLQ topic (no second pass over the record)."""


def _reject(reason: str, key: bytes | None, value: bytes | None, now_ms: int) -> Rejected:
    from quixstreams import message_context

    from stream import contract

    ctx = message_context()
    return Rejected(contract.dlq_record(reason, key, value, ctx.topic, ctx.partition, ctx.offset, now_ms))


def passthrough_handler(settings: Settings) -> Any:
    """validate -> the user's window in Quix state -> one small record; no model."""
    from models.features import FeaturizerConfig
    from stream import contract
    from stream.state.user import Accept, UserState

    featurizer = FeaturizerConfig(window=settings.window_size)
    lateness_ms = int(settings.allowed_lateness_s * 1000)
    max_bytes = settings.max_record_bytes
    validate, dumps, from_bytes = contract.validate, orjson.dumps, UserState.from_bytes

    def handle(value: bytes | None, key: bytes | None, timestamp: int, headers: Any, state: Any) -> bytes | None:
        now_ms = int(time.time() * 1000)
        ev = validate(value, key, max_bytes=max_bytes, max_ts_ms=now_ms + MAX_FUTURE_MS)
        if isinstance(ev, str):
            return _reject(ev, key, value, now_ms)
        blob = state.get_bytes(STATE_KEY)
        st = from_bytes(blob) if blob else UserState()
        outcome = st.accept(ev, featurizer, lateness_ms)
        if outcome is Accept.DUPLICATE:
            return None
        if outcome is Accept.TOO_LATE:
            return _reject(TOO_LATE, key, value, now_ms)
        state.set_bytes(STATE_KEY, st.to_bytes())
        return dumps({"user_id": ev.user_id, "event_id": ev.event_id, "events": st.count, "window": len(st.records)})

    return handle


def model_handler(settings: Settings) -> Any:
    """validate -> the user's window in Quix state -> one forward pass for this record -> the intent record."""
    import torch

    from models.artifact import load_newest, resolve_device
    from stream import contract, emit
    from stream.scoring import UserBatch, score_batch
    from stream.state.user import BANDS, Accept, UserState

    device = resolve_device(settings.device)
    torch.set_num_threads(max(1, settings.torch_threads))  # as the worker: one thread for the model
    model, refused = load_newest(
        settings.model_dir, device, expect_window=settings.window_size, runtime=settings.runtime, threads=1
    )
    if model is None:
        raise SystemExit(f"peer: no usable model in {settings.model_dir}: {'; '.join(refused) or 'none there'}")
    featurizer, version, name, tag = model.featurizer, model.version, model.name, model.state_tag
    thresholds = model.thresholds["purchase"]
    lateness_ms = int(settings.allowed_lateness_s * 1000)
    max_bytes = settings.max_record_bytes
    validate, from_bytes = contract.validate, UserState.from_bytes

    def handle(value: bytes | None, key: bytes | None, timestamp: int, headers: Any, state: Any) -> bytes | None:
        now_ms = int(time.time() * 1000)
        ev = validate(value, key, max_bytes=max_bytes, max_ts_ms=now_ms + MAX_FUTURE_MS)
        if isinstance(ev, str):
            return _reject(ev, key, value, now_ms)
        blob = state.get_bytes(STATE_KEY)
        st = from_bytes(blob) if blob else UserState()
        prior = st.records
        hidden = st.hidden if st.model_tag == tag else None
        outcome = st.accept(ev, featurizer, lateness_ms)
        if outcome is Accept.DUPLICATE:
            return None
        if outcome is Accept.TOO_LATE:
            return _reject(TOO_LATE, key, value, now_ms)
        # What stream/engine.py builds for a user with one event in the batch.
        batch = UserBatch(prior=prior, hidden=hidden)
        if outcome is Accept.INSERTED:
            batch.rescore_window = st.records
        else:
            batch.new = st.records[-1:]  # the window's tail, as the engine passes it
        scores = score_batch(model, [batch], device)[0]
        p = scores.probs[-1].tolist()
        st.hidden, st.model_tag = scores.hidden, tag
        st.score, st.churn_risk = p[0], p[1]
        band = emit.band_of(st.score, thresholds)
        out = contract.intent_record(
            user_id=ev.user_id,
            score=st.score,
            band=BANDS[band],
            order_value_if_purchase=p[2],
            model_name=name,
            model_version=version,
            event_id=ev.event_id,
            event_ts=ev.ts,
            produced_at_ms=timestamp,
            scored_at_ms=int(time.time() * 1000),
            reasons=emit.intent_reasons(st.records),
        )
        st.last_score, st.last_band, st.last_emit_ts = st.score, band, ev.ts
        state.set_bytes(STATE_KEY, st.to_bytes())
        return out

    return handle


def build_app(settings: Settings, system: str) -> Any:
    """The Quix Streams Application of ``system``, configured from ``settings`` (INTENTSTREAM_*)."""
    from quixstreams import Application

    loglevel: Any = settings.log_level  # one of Quix's level names (Settings checks it)
    app = Application(
        broker_address=settings.kafka_bootstrap,
        consumer_group=settings.app_id,
        auto_offset_reset="earliest",
        processing_guarantee="at-least-once",
        state_dir=str(settings.state_dir),
        loglevel=loglevel,
    )

    def raw(name: str) -> Any:  # bytes in, bytes out: the handlers decode and encode with the engine's code
        return app.topic(
            name, key_deserializer="bytes", value_deserializer="bytes", key_serializer="bytes", value_serializer="bytes"
        )

    clicks, out, dlq = raw(settings.topic_clickstream), raw(settings.topic_intent), raw(settings.topic_dlq)
    handler = passthrough_handler(settings) if system == "quix_passthrough" else model_handler(settings)
    sdf = app.dataframe(clicks)
    sdf = sdf.apply(handler, stateful=True, metadata=True)
    sdf = sdf.filter(lambda value: value is not None)  # duplicates give no output, as in the engine
    sdf.to_topic(lambda value, key, timestamp, headers: dlq if type(value) is Rejected else out)
    return app


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m load_tests.peer",
        description="One Quix Streams system of `python -m load_tests peer` (settings from INTENTSTREAM_*). "
        "Runs until SIGTERM.",
    )
    parser.add_argument("--system", choices=QUIX_SYSTEMS, required=True, help="which Quix system to run")
    args = parser.parse_args(argv)
    app = build_app(Settings.from_env(), args.system)
    app.run()  # SIGTERM/SIGINT: Quix commits its checkpoint and returns
    return 0


# ---- the benchmark (parent process) --------------------------------------------------------------------


@dataclass
class Config:
    out: Path
    events: int = 100_000
    users: int = 10_000
    turns: int = 3
    partitions: int = 4
    systems: tuple[str, ...] = SYSTEMS
    model_dir: Path | None = None
    timeout_s: float = 1200.0
    seed: int = 11
    bad_fraction: float = 0.0
    keep_topics: bool = False
    json_path: Path | None = None
    runtime: str = "torch"  # the scoring runtime of the worker and of Quix's per-message app (models/runtime.py)


def turn_order(systems: tuple[str, ...], turn: int) -> list[str]:
    """A B C, then C B A, then A B C, ...: no system always runs first or right after the same one."""
    return list(systems) if turn % 2 == 0 else list(reversed(systems))


def cpu_rss(proc: Proc) -> tuple[float, float] | None:
    """(user + system CPU seconds, resident MB) of a process and its children; None once it has gone."""
    try:
        procs = [proc.ps, *proc.ps.children(recursive=True)]
        cpu = rss = 0.0
        for p in procs:
            t = p.cpu_times()
            cpu += t.user + t.system
            rss += p.memory_info().rss
    except psutil.Error:
        return None
    return cpu, rss / 1e6


def process_cpu(ps: psutil.Process | None) -> float | None:
    if ps is None:
        return None
    try:
        t = ps.cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


def busy_window(samples: list[dict[str, Any]], n: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The first and last sample of the drain: from the first sample with output to the first with all of it.
    A drain shorter than two samples (a tiny backlog) reaches back to the last sample without output."""
    with_output = [i for i, s in enumerate(samples) if s["outputs"] > 0]
    if not with_output:
        return None
    first = with_output[0]
    last = next((i for i, s in enumerate(samples) if s["outputs"] >= n), len(samples) - 1)
    if samples[last]["outputs"] - samples[first]["outputs"] < 0.5 * n and first > 0:
        first -= 1
    return (samples[first], samples[last]) if last > first else None


def run_figures(samples: list[dict[str, Any]], times_ms: list[int], n: int, started: float) -> dict[str, Any]:
    """Rate (from the output timestamps) and CPU per event (over the busy window) of one run."""
    out: dict[str, Any] = {"outputs_counted": len(times_ms)}
    span = (times_ms[-1] - times_ms[0]) / 1000 if len(times_ms) >= 2 else 0.0
    out["span_s"] = round(span, 3)
    out["eps"] = round(len(times_ms) / span, 1) if span > 0 else None
    out["startup_s"] = round(times_ms[0] / 1000 - started, 2) if times_ms else None
    out["drain_s"] = round(times_ms[-1] / 1000 - started, 2) if times_ms else None
    window = busy_window(samples, n)
    if window is not None:
        a, b = window
        events = b["outputs"] - a["outputs"]
        cpu = b["cpu_s"] - a["cpu_s"]
        out["cpu_window_s"] = round(b["t"] - a["t"], 2)
        out["cpu_window_events"] = events
        out["cpu_s_window"] = round(cpu, 3)
        out["cpu_us_per_event"] = round(1e6 * cpu / events, 1) if events > 0 else None
        out["cpu_pct_mean"] = round(100 * cpu / (b["t"] - a["t"]), 1) if b["t"] > a["t"] else None
        if a.get("broker_cpu_s") is not None and b.get("broker_cpu_s") is not None and events > 0:
            out["broker_cpu_us_per_event"] = round(1e6 * (b["broker_cpu_s"] - a["broker_cpu_s"]) / events, 1)
    out["cpu_s_total"] = round(samples[-1]["cpu_s"], 2) if samples else None
    out["rss_mb_max"] = round(max((s["rss_mb"] for s in samples), default=0.0), 1)
    return out


def _median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(float(statistics.median(kept)), 1) if kept else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return float(f"{a / b:.4g}") if a is not None and b else None


class Peer:
    def __init__(self, cfg: Config):
        from load_tests.run import Progress

        self.cfg = cfg
        self.base = Settings.from_env(partitions=cfg.partitions)
        self.tag = f"lt-{uuid.uuid4().hex[:8]}"
        self.backlog_topic = f"{self.tag}-backlog"
        self.progress = Progress()
        self.logs = cfg.out / "logs"
        self.model_dir = cfg.model_dir or cfg.out / "model"
        self.state_root = Path(tempfile.mkdtemp(prefix=f"peer-{self.tag}-"))
        self.report: dict[str, Any] = {}
        self.procs: list[Proc] = []

    def say(self, text: str) -> None:
        self.progress.say(f"peer: {text}")

    def settings(self, name: str) -> Settings:
        """Settings of one run: the shared backlog as input, outputs, group and state of its own, on the CPU."""
        return Settings.from_env(
            partitions=self.cfg.partitions,
            topic_clickstream=self.backlog_topic,
            topic_intent=f"{name}-out",
            topic_dlq=f"{name}-dlq",
            topic_churn=f"{name}-churn",
            app_id=name,
            state_dir=str(self.state_root / name),
            model_dir=str(self.model_dir),
            emit_policy="every_event",
            device="cpu",
            runtime=self.cfg.runtime,
        )

    def ensure_model(self) -> dict[str, Any]:
        from load_tests.untrained import untrained_artifact
        from models.artifact import load_newest

        model, refused = load_newest(self.model_dir, expect_window=self.base.window_size)
        if model is None:
            if self.cfg.model_dir is not None:
                raise RuntimeError(f"no usable model in {self.cfg.model_dir}: {'; '.join(refused) or 'none there'}")
            model = untrained_artifact(self.model_dir, "untrained-load-test", window=self.base.window_size)
        if self.cfg.runtime != "torch" and self.cfg.runtime not in model.manifest.get("exports", {}):
            from models.export import export_onnx

            self.say(f"exporting {model.version} for {self.cfg.runtime}")
            export_onnx(model.path, int8=self.cfg.runtime == "onnx-int8")
        return {
            "name": model.name,
            "version": model.version,
            "arch": model.config.arch,
            "path": str(model.path),
            "runtime": self.cfg.runtime,
        }

    async def produce_backlog(self) -> dict[str, Any]:
        from load_tests.traffic import Traffic
        from stream.traffic.replay import replay

        cfg = self.cfg
        await P.create_topics(self.base, {self.backlog_topic: cfg.partitions})
        t0 = time.perf_counter()
        traffic = Traffic(users=cfg.users, seed=cfg.seed)
        simulated_s = time.perf_counter() - t0
        self.say(f"producing a backlog of {cfg.events:,} events of {cfg.users:,} users to {self.backlog_topic}")
        # replay() creates the settings' topics when missing: naming them all the backlog topic creates none.
        s = Settings.from_env(
            partitions=cfg.partitions,
            topic_clickstream=self.backlog_topic,
            topic_intent=self.backlog_topic,
            topic_dlq=self.backlog_topic,
            topic_churn=self.backlog_topic,
        )
        records = itertools.islice(traffic.records(), cfg.events)
        stats = await replay(s, records, bad_fraction=cfg.bad_fraction, seed=cfg.seed)
        users = len(traffic.sent_users)
        return {
            "topic": self.backlog_topic,
            "events": stats.sent,
            "bad": stats.bad,
            "users": users,
            "events_per_user": round((stats.sent - stats.bad) / users, 1) if users else None,
            "window": self.base.window_size,
            "partitions": cfg.partitions,
            "producer_eps": round(stats.rate, 1),
            "simulated_s": round(simulated_s, 1),
        }

    async def measure(self, system: str, turn: int, position: int, n: int) -> dict[str, Any]:
        """One system drains the backlog from its start; stopped once every input has its output."""
        cfg = self.cfg
        name = f"{self.tag}-{system.replace('_', '-')}-t{turn}"
        s = self.settings(name)
        outputs = [s.topic_intent, s.topic_dlq]
        # Output topics stamped by the broker on append (stream.topics.new_topic): the clock common to the systems
        topics = [*outputs, s.topic_churn] if system == "worker" else outputs
        await P.create_topics(s, {t: s.partitions for t in topics})
        if system == "worker":
            kind, argv = "engine", None
        else:
            kind, argv = system, [sys.executable, "-m", "load_tests.peer", "--system", system]
        broker = P.broker_process(self.base)
        started = time.time()
        proc = P.start(kind, s, self.logs, argv=argv)
        self.procs.append(proc)
        samples: list[dict[str, Any]] = []
        complete = False
        label = f"[turn {turn + 1}/{cfg.turns} {system}]"
        try:
            while True:
                now = time.time()
                done = await self.offsets.end(outputs)
                usage = cpu_rss(proc)
                if usage is None or not proc.alive():
                    raise RuntimeError(f"{system} (pid {proc.pid}) exited (code {proc.popen.poll()}):\n{proc.tail()}")
                prev = samples[-1] if samples else None
                samples.append(
                    {
                        "t": round(now, 3),
                        "outputs": done,
                        "cpu_s": round(usage[0], 3),
                        "rss_mb": round(usage[1], 1),
                        "broker_cpu_s": process_cpu(broker),
                    }
                )
                rate = (done - prev["outputs"]) / (now - prev["t"]) if prev and now > prev["t"] else 0.0
                cpu_pct = 100 * (usage[0] - prev["cpu_s"]) / (now - prev["t"]) if prev and now > prev["t"] else 0.0
                self.progress.show(
                    f"{label} out {done:>9,}/{n:,} {rate:>8,.0f}/s cpu {cpu_pct:4.0f}% rss {usage[1]:5.0f} MB "
                    f"{now - started:5.0f} s load {os.getloadavg()[0]:.1f}"
                )
                if done >= n:
                    complete = True
                    break
                if now - started > cfg.timeout_s:
                    self.say(f"{system}: {n - done:,} inputs without output after {cfg.timeout_s:.0f} s; stopped")
                    break
                await asyncio.sleep(INTERVAL_S)
        finally:
            P.stop([proc])
        # Read after the stop: reading 100,000 records would take CPU from the system under test.
        from load_tests.run import output_times

        times = (await output_times(s, outputs)).tolist()
        dlq = await self.offsets.end([s.topic_dlq])
        result = {
            "system": system,
            "turn": turn,
            "position": position,
            "outputs": len(times) - dlq,
            "dlq": dlq,
            "processed": len(times),
            "complete": complete and len(times) >= n,
            **run_figures(samples, times, n, started),
            "log": str(proc.log_path),
        }
        self.say(
            f"{label} {result['eps'] or 0:,.0f} events/s, {result.get('cpu_us_per_event') or 0:,.0f} us CPU/event, "
            f"start-up {result['startup_s']} s{'' if result['complete'] else ', INCOMPLETE'}"
        )
        shutil.rmtree(self.state_root / name, ignore_errors=True)  # RocksDB folders: not needed after the run
        return result

    async def main(self) -> dict[str, Any]:
        from load_tests.run import code_version, machine

        cfg = self.cfg
        cfg.out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        self.report = {
            "schema": 1,
            "tag": self.tag,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "machine": machine(),
            "code": code_version(),
            "config": {
                "events": cfg.events,
                "users": cfg.users,
                "turns": cfg.turns,
                "partitions": cfg.partitions,
                "systems": list(cfg.systems),
                "timeout_s": cfg.timeout_s,
                "seed": cfg.seed,
                "bad_fraction": cfg.bad_fraction,
                "device": "cpu",
                "torch_threads": self.base.torch_threads,
                "worker": {
                    "emit_policy": "every_event",
                    "batch_max_events": self.base.batch_max_events,
                    "batch_max_ms": self.base.batch_max_ms,
                    "batch_backlog_events": self.base.batch_backlog_events,
                    "processing_guarantee": self.base.processing_guarantee,
                },
                "quix": {
                    "version": _quix_version(),
                    "processing_guarantee": "at-least-once",
                    "auto_offset_reset": "earliest",
                    "state": "RocksDB with changelog (Quix defaults)",
                    "commit_interval_s": 5.0,
                },
            },
        }
        self.report["model"] = self.ensure_model()
        self.say(f"model {self.report['model']['name']} {self.report['model']['version']}; topics {self.tag}-*")
        self.offsets = Offsets(self.base)
        await self.offsets.start()
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cfg.systems}
        self.report["runs"] = runs
        try:
            backlog = await self.produce_backlog()
            self.report["backlog"] = backlog
            n = backlog["events"]
            self.report["turn_order"] = [turn_order(cfg.systems, t) for t in range(cfg.turns)]
            for turn in range(cfg.turns):
                for position, system in enumerate(turn_order(cfg.systems, turn)):
                    try:
                        result = await self.measure(system, turn, position, n)
                    except RuntimeError as exc:  # a crashed system: the others' figures still count
                        self.say(f"{system}: {exc}")
                        result = {"system": system, "turn": turn, "position": position, "complete": False}
                        result |= {"eps": None, "error": str(exc)[-4000:]}
                    runs[system].append(result)
            self.summarize()
        finally:
            self.report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.report["seconds"] = round(time.time() - started, 1)
            self.report["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
            P.stop([p for p in self.procs if p.alive()])
            await self.offsets.stop()
            if not cfg.keep_topics:
                for prefix in (self.tag, f"changelog__{self.tag}"):  # ours, then Quix's state changelogs
                    with contextlib.suppress(Exception):
                        await P.delete_topics(self.base, prefix)
            shutil.rmtree(self.state_root, ignore_errors=True)
        return self.report

    def summarize(self) -> None:
        r = self.report
        systems: dict[str, Any] = {}
        for name, results in r["runs"].items():
            systems[name] = {
                "eps": _median([x["eps"] for x in results]),
                "cpu_us_per_event": _median([x.get("cpu_us_per_event") for x in results]),
                "broker_cpu_us_per_event": _median([x.get("broker_cpu_us_per_event") for x in results]),
                "startup_s": _median([x.get("startup_s") for x in results]),
                "rss_mb_max": max((x["rss_mb_max"] for x in results if "rss_mb_max" in x), default=None),
                "eps_runs": [x["eps"] for x in results],
                "cpu_us_per_event_runs": [x.get("cpu_us_per_event") for x in results],
                "complete": all(x["complete"] for x in results),
            }
        r["systems"] = systems
        for name in SYSTEMS:
            r[f"{name}_eps"] = systems.get(name, {}).get("eps")
        # From the rounded medians as reported, so each ratio is exactly the quotient of the figures beside it.
        worker = r["worker_eps"]
        r["worker_vs_quix_passthrough"] = _ratio(worker, r["quix_passthrough_eps"])
        r["worker_vs_quix_model"] = _ratio(worker, r["quix_model_eps"])
        worker_cpu = systems.get("worker", {}).get("cpu_us_per_event")
        r["cpu_per_event_vs_worker"] = {
            name: _ratio(systems[name]["cpu_us_per_event"], worker_cpu) for name in QUIX_SYSTEMS if name in systems
        }
        r["complete"] = all(s["complete"] for s in systems.values())

    def execute(self) -> dict[str, Any]:
        from stream import broker

        started_broker = False
        if not broker.answers_metadata(self.base.kafka_bootstrap):
            if "INTENTSTREAM_KAFKA_BOOTSTRAP" in os.environ:
                raise broker.BrokerError(f"no broker answers at the configured {self.base.kafka_bootstrap}")
            self.say("starting the local Kafka broker")
            broker.start(self.base)
            started_broker = True
        try:
            return asyncio.run(self.main())
        finally:
            if started_broker:
                broker.stop(self.base)


def _quix_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quixstreams")
    except PackageNotFoundError:
        return None


# ---- outputs -------------------------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}" if isinstance(x, int | float) else str(x)


def markdown(r: dict[str, Any]) -> str:
    m, cfg, b = r.get("machine", {}), r.get("config", {}), r.get("backlog", {})
    model = r.get("model", {})
    lines = [
        f"# Peer benchmark {r.get('tag', '')} ({r.get('started_at', '')}): the worker beside Quix Streams",
        "",
        f"Machine: {m.get('cpus')} CPUs ({m.get('cpu_model')}), {m.get('memory_gb')} GB; load average "
        f"{m.get('load_avg_start')} at the start, {m.get('load_avg_end')} at the end. Python {m.get('python')}, "
        f"torch {m.get('torch')}, Quix Streams {cfg.get('quix', {}).get('version')}; code {r.get('code', {}).get('commit')}"
        f" (modified: {', '.join(r.get('code', {}).get('modified', [])) or 'none'}).",
        f"Backlog: {_fmt(b.get('events'))} records ({_fmt(b.get('bad'))} malformed) of {_fmt(b.get('users'))} users "
        f"({b.get('events_per_user')} events per "
        f"user; window {b.get('window')}) on {b.get('partitions')} partitions. Model: {model.get('name')} "
        f"{model.get('version')} ({model.get('arch')}), on the CPU, {cfg.get('torch_threads')} torch thread(s). "
        f"One process per system, at least once; {cfg.get('turns')} turn(s), order alternating.",
        "",
    ]
    if r.get("interrupted"):
        lines += ["**Interrupted: partial figures.**", ""]
    if r.get("error"):
        lines += [f"**Failed: {r['error']}**", ""]
    systems = r.get("systems", {})
    if systems:
        lines += [
            "## Medians over the turns",
            "",
            "| system | events/s | CPU us/event | broker CPU us/event | start-up s | RSS MB max | events/s per turn |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for name, s in systems.items():
            lines.append(
                f"| {name} | {_fmt(s['eps'])} | {_fmt(s['cpu_us_per_event'])} | {_fmt(s['broker_cpu_us_per_event'])}"
                f" | {_fmt(s['startup_s'], 1)} | {_fmt(s['rss_mb_max'])} | "
                f"{', '.join(_fmt(x) for x in s['eps_runs'])} |"
            )
        lines += [
            "",
            f"worker_vs_quix_passthrough = {r.get('worker_vs_quix_passthrough')}; "
            f"worker_vs_quix_model = {r.get('worker_vs_quix_model')} (median events/s of the worker over Quix's).",
            f"CPU per event relative to the worker: {r.get('cpu_per_event_vs_worker')}.",
            "",
        ]
    runs = [x for results in r.get("runs", {}).values() for x in results]
    if runs:
        lines += [
            "## Every turn",
            "",
            "| turn | # | system | events/s | span s | CPU us/event | CPU % | start-up s | outputs | DLQ | complete |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|:-:|",
        ]
        for x in sorted(runs, key=lambda x: (x["turn"], x["position"])):
            lines.append(
                f"| {x['turn'] + 1} | {x['position'] + 1} | {x['system']} | {_fmt(x['eps'])} | {_fmt(x.get('span_s'), 1)}"
                f" | {_fmt(x.get('cpu_us_per_event'))} | {_fmt(x.get('cpu_pct_mean'))} | {_fmt(x.get('startup_s'), 1)} |"
                f" {_fmt(x.get('outputs'))} | {_fmt(x.get('dlq'))} | {'yes' if x['complete'] else 'no'} |"
            )
        lines.append("")
        for x in runs:
            if x.get("error"):
                lines += [f"Turn {x['turn'] + 1}, {x['system']} failed:", "", "```", x["error"], "```", ""]
    lines += [
        "events/s: inputs processed over the seconds from the first to the last output record (broker append "
        "times). CPU: the process's user + system seconds over the samples in which it produced output, per "
        "output. Quix runs validate -> window state (RocksDB) [-> one GRU forward pass per record] -> output; "
        "the worker also closes sessions and checks churn. Plot: peer.png.",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = r.get("systems", {})
    names = list(systems)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (("eps", "eps_runs", "events/s (median, dots: turns)"), ("cpu_us_per_event", "cpu_us_per_event_runs", ""))
    for ax, (key, runs_key, title) in zip(axes, panels, strict=True):
        values = [systems[n][key] or 0 for n in names]
        bars = ax.bar(names, values, color=[COLORS[n] for n in names])
        for i, n in enumerate(names):
            pts = [v for v in systems[n][runs_key] if v is not None]
            ax.scatter([i] * len(pts), pts, color="black", s=12, zorder=3)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=9, padding=6)
        ax.margins(y=0.12)
        ax.set_title(title or "CPU us per event (median, dots: turns)")
        ax.grid(axis="y", alpha=0.3)
    b = r.get("backlog", {})
    fig.suptitle(
        f"Worker vs Quix Streams: {b.get('events', 0):,} events, {b.get('users', 0):,} users; "
        f"worker/quix_model {r.get('worker_vs_quix_model')}, worker/quix_passthrough "
        f"{r.get('worker_vs_quix_passthrough')} (load avg {r.get('machine', {}).get('load_avg_start', ['?'])[0]})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out: Path, json_path: Path | None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    blob = orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    files = [out / "peer_report.json"]
    files[0].write_bytes(blob)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_bytes(blob)
        files.append(json_path)
    (out / "peer_summary.md").write_text(markdown(report))
    files.append(out / "peer_summary.md")
    if report.get("systems"):
        try:
            plot(report, out / "peer.png")
            files.append(out / "peer.png")
        except Exception as exc:  # a plot must never cost the figures
            print(f"peer: plot failed: {exc!r}", file=sys.stderr)
    return files


def summary_line(r: dict[str, Any]) -> str:
    keys = (
        "worker_eps",
        "quix_passthrough_eps",
        "quix_model_eps",
        "worker_vs_quix_passthrough",
        "worker_vs_quix_model",
    )
    return "summary: " + " ".join(f"{k}={r.get(k)}" for k in keys)


# ---- command line --------------------------------------------------------------------------------------


def _systems(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [x for x in names if x not in SYSTEMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"systems: a comma list of {', '.join(SYSTEMS)} (got {text!r})")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, required=True, help="report folder (peer_report.json, peer_summary.md, peer.png)"
    )
    parser.add_argument("--json", type=Path, help="also write the report JSON to this path")
    parser.add_argument("--events", type=int, default=100_000, help="events in the backlog (default 100,000)")
    users = parser.add_mutually_exclusive_group()
    users.add_argument(
        "--users",
        type=int,
        default=10_000,
        help="distinct users in the backlog (default 10,000); events/users is how full the windows get: "
        "about 10 events per user by default, --users 1000 fills the 64-event windows",
    )
    users.add_argument(
        "--events-per-user", type=float, help="instead of --users: users = events / this (64 or more fills the windows)"
    )
    parser.add_argument(
        "--turns", type=int, default=3, help="turns of every system, order alternating A B C, C B A, ... (default 3)"
    )
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the backlog and output topics (4)")
    parser.add_argument(
        "--systems",
        type=_systems,
        default=SYSTEMS,
        help=f"comma list of the systems to run, a subset of {','.join(SYSTEMS)} (default all three)",
    )
    parser.add_argument(
        "--model-dir", type=Path, help="serve this model (default: an untrained GRU saved in DIR/model; same cost)"
    )
    parser.add_argument(
        "--timeout", type=float, default=1200.0, help="seconds one system may take to drain the backlog (default 1200)"
    )
    parser.add_argument("--seed", type=int, default=11, help="simulator seed (default 11)")
    parser.add_argument(
        "--bad-fraction",
        type=float,
        default=0.0,
        help="share of malformed records mixed into the backlog, for the dead-letter path (default 0); "
        "--events counts the valid ones",
    )
    parser.add_argument("--keep-topics", action="store_true", help="leave the lt-<tag>-* topics on the broker")
    parser.add_argument(
        "--runtime",
        choices=("torch", "onnx", "onnx-int8"),
        default="torch",
        help="scoring runtime of the worker and of Quix's per-message app (default torch; the model is exported "
        "when it needs to be)",
    )


def main(args: argparse.Namespace) -> int:
    if any(s in QUIX_SYSTEMS for s in args.systems) and _quix_version() is None:
        print(
            f"peer: Quix Streams is not installed: pip install 'quixstreams=={QUIX_VERSION}' (or -e '.[bench]')",
            file=sys.stderr,
        )
        return 2
    if args.events < 1 or args.turns < 1 or args.partitions < 1:
        print("peer: --events, --turns and --partitions must be at least 1", file=sys.stderr)
        return 2
    if not 0.0 <= args.bad_fraction < 1.0:
        print("peer: --bad-fraction must be in [0, 1)", file=sys.stderr)
        return 2
    users = args.users if args.events_per_user is None else max(1, math.ceil(args.events / args.events_per_user))
    cfg = Config(
        out=args.out,
        events=args.events,
        users=users,
        turns=args.turns,
        partitions=args.partitions,
        systems=args.systems,
        model_dir=args.model_dir,
        timeout_s=args.timeout,
        seed=args.seed,
        bad_fraction=args.bad_fraction,
        keep_topics=args.keep_topics,
        json_path=args.json,
        runtime=args.runtime,
    )
    peer = Peer(cfg)
    try:
        report = peer.execute()
    except KeyboardInterrupt:
        print("peer: interrupted", file=sys.stderr)
        report = peer.report
        report["interrupted"] = True
    except Exception as exc:
        report = peer.report
        report["error"] = f"{type(exc).__name__}: {exc}"
        print(f"peer: {report['error']}", file=sys.stderr)
    files = write_outputs(report, cfg.out, cfg.json_path)
    print(f"peer: wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    print(summary_line(report))
    return 0 if report.get("complete") and not report.get("interrupted") else 1


if __name__ == "__main__":
    sys.exit(child_main())
