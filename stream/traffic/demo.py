"""`intentstream demo`: the whole product in one command, ending with one summary line.

Local broker (started if none is configured), a model (trained if the model directory has none), topics and a
worker of the run's own, simulated traffic with malformed records mixed in, a few intent events and churn alerts
printed as they arrive, a clean stop, then:
``summary: events=N scored=N duplicates=N late=N dlq=N intents=N churn_alerts=N p50_ms=X p99_ms=Y
score_p50_ms=X score_p99_ms=Y``.

Every run has its own topics, consumer group and worker state (``demo-<8 hex>``), deleted at the end unless
``--keep``: a second run gives the same kind of result as the first (the same seeded events replayed into the
first run's state would all be duplicates), and records already in the configured topics are none of its business.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from stream.contract import TOO_LATE_REASON
from stream.settings import Settings
from stream.topics import KafkaAccessError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=10_000, help="events to replay (default 10000)")
    parser.add_argument("--rate", type=float, default=500.0, help="replay rate, events/s (default 500)")
    parser.add_argument("--bad-fraction", type=float, default=0.02, help="malformed records mixed in (default 0.02)")
    parser.add_argument("--seed", type=int, default=7, help="simulator seed of the replayed traffic")
    parser.add_argument("--show", type=int, default=5, help="intent events and churn alerts to print (each)")
    parser.add_argument("--json", metavar="PATH", help="also write the summary figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the run's topics and worker state at the end")


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def _ensure_broker(settings: Settings) -> bool:
    """Start the local broker unless a configured one answers. Returns True if we started it. A broker that
    answers but refuses our credentials or certificate stops the demo (``KafkaAccessError``, one line)."""
    from stream import broker
    from stream.topics import check_access

    try:
        check_access(settings, timeout_s=3.0)
        return False
    except KafkaAccessError as exc:
        if not exc.unreachable:
            raise
    if "INTENTSTREAM_KAFKA_BOOTSTRAP" in os.environ:
        raise broker.BrokerError(
            f"no broker answers at the configured {settings.kafka_bootstrap}; start it, or unset "
            "INTENTSTREAM_KAFKA_BOOTSTRAP to let the demo run a local one"
        )
    _say("starting the local Kafka broker (first run resolves the jars from Maven Central)")
    broker.start(settings)
    return True


def _ensure_model(settings: Settings) -> dict[str, Any]:
    """The serving model's expected churn alert volume (its manifest), after training one if none is served."""
    from models.artifact import load_newest

    def served() -> Any:
        model, _ = load_newest(
            settings.model_dir, expect_window=settings.window_size, expect_session_gap_s=settings.session_gap_s
        )
        return model

    model = served()
    if model is None:
        from stream.traffic.simulator import write_simulation
        from training.train import train_small

        data = settings.state_dir / "demo" / "train.jsonl.gz"
        data.parent.mkdir(parents=True, exist_ok=True)
        _say(f"no model in {settings.model_dir}: simulating training data and training a small GRU (~2 min)")
        write_simulation(data, users=2_000, days=21, seed=1)
        path = train_small([data], settings.model_dir, max_minutes=2.0, progress=True, settings=settings)
        _say(f"trained {path.name}")
        model = served()
        if model is None:  # trained with these settings: only a broken folder could refuse it
            raise SystemExit(
                f"intentstream demo: the model just trained in {path} is refused; see `intentstream worker`"
            )
    _say(f"serving {model.name} {model.version} from {settings.model_dir}")
    return dict(model.manifest.get("metrics", {}).get("expected", {}).get("churn_alert") or {})


def _metric(text: str, name: str) -> float:
    total = 0.0
    for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M):
        total += float(m.group(1))
    return total


def _fmt_intent(v: dict[str, Any]) -> str:
    return (
        f"intent  {v['user_id']:<10} {v['band']:<6} p={v['score']:.2f} "
        f"eov={v['expected_order_value'] or 0:.0f} {v['model']['version']}  {'; '.join(v['reasons'])}"
    )


def _fmt_alert(v: dict[str, Any]) -> str:
    return f"churn   {v['user_id']:<10} risk={v['risk']:.2f} {v['model']['version']}  {'; '.join(v['reasons'])}"


async def _watch(settings: Settings, stop: asyncio.Event, show: int, seen: dict[str, list]) -> None:
    """Read the output topics from their current end; print the first few of each kind."""
    from aiokafka import AIOKafkaConsumer

    from stream.topics import kafka_client_kwargs

    consumer = AIOKafkaConsumer(
        settings.topic_intent,
        settings.topic_churn,
        settings.topic_dlq,
        **kafka_client_kwargs(settings),
        auto_offset_reset="latest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=300)
            for tp, msgs in batch.items():
                for m in msgs:
                    value = orjson.loads(m.value)
                    seen[tp.topic].append((m.timestamp, value))
                    n = len(seen[tp.topic])
                    if tp.topic == settings.topic_intent and n <= show:
                        print(_fmt_intent(value), flush=True)
                    elif tp.topic == settings.topic_churn and n <= show:
                        print(_fmt_alert(value), flush=True)
    finally:
        await consumer.stop()


def run_settings(settings: Settings, run_id: str) -> Settings:
    """The settings of one demo run: topics, consumer group (app id) and worker state of its own."""
    return dataclasses.replace(
        settings,
        topic_clickstream=f"{run_id}-clickstream",
        topic_dlq=f"{run_id}-clickstream-dlq",
        topic_intent=f"{run_id}-purchase-intent",
        topic_churn=f"{run_id}-churn-alerts",
        app_id=run_id,
        state_dir=settings.state_dir / "demo" / run_id,
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from stream import broker
    from stream.topics import ensure_topics

    started_broker = _ensure_broker(settings)
    worker = None
    run_id = f"demo-{secrets.token_hex(4)}"
    own = run_settings(settings, run_id)
    try:
        expected = _ensure_model(settings)
        ensure_topics(own)
        _say(f"run {run_id}: topics {own.topic_clickstream}, {own.topic_intent}, {own.topic_churn}, {own.topic_dlq}")
        log_path = own.state_dir / "worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        _say(f"starting a worker (log: {log_path})")
        with open(log_path, "ab") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "stream.cli", "worker"], stdout=log, stderr=log, env=own.child_env()
            )
        url = f"http://127.0.0.1:{own.web_port}"
        _wait_ready(url, worker, log_path)
        summary = asyncio.run(_traffic(args, own, url))
        # The CRM's budget the model was trained for, and what its threshold gave on validation.
        summary["alert_budget"] = expected.get("target", "n/a").split(" ")[0]
        validation = expected.get("alerts_per_1k_users_day")  # null in the manifest when it could not be measured
        summary["expected_alerts_per_1k_users_day"] = "n/a" if validation is None else round(float(validation), 2)
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
        if not args.keep:
            _remove_run(own, settings)
        if started_broker:
            broker.stop(settings)
    line = " ".join(f"{k}={v}" for k, v in summary.items())
    print(f"summary: {line}", flush=True)
    if args.json:
        Path(args.json).write_text(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    return 0


def _remove_run(own: Settings, settings: Settings) -> None:
    """The run's topics (its changelog included) and worker state; a broker already gone is left alone."""
    from stream.topics import admin_client

    async def delete_topics() -> None:
        async with admin_client(settings) as admin:
            names = [t for t in await admin.list_topics() if t.startswith(f"{own.app_id}-")]
            if names:
                await admin.delete_topics(names)

    try:
        asyncio.run(delete_topics())
    except Exception as exc:  # the summary matters more than the clean-up; say what is left
        _say(f"could not delete the topics of {own.app_id} ({type(exc).__name__}: {exc})")
    shutil.rmtree(own.state_dir, ignore_errors=True)


def _wait_ready(url: str, worker: subprocess.Popen, log_path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited (code {worker.returncode}); see {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                health = orjson.loads(r.read())
            if health.get("ready") and health.get("partitions"):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the worker was not ready within {timeout:.0f} s; see {log_path}")


async def _traffic(args: argparse.Namespace, settings: Settings, url: str) -> dict[str, Any]:
    from stream.traffic.replay import replay
    from stream.traffic.simulator import simulate
    from training.metrics import active_user_days, per_1k_user_days

    users = max(50, args.events // 6)  # about 10 events per user in 14 days: enough to cut at --events
    sim = simulate(users=users, days=14, seed=args.seed)
    events = sim.events[: args.events]
    _say(f"simulated {len(events)} events of {len({e.user_id for e in events})} users (seed {args.seed})")
    seen: dict[str, list] = {settings.topic_intent: [], settings.topic_churn: [], settings.topic_dlq: []}
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch(settings, stop, args.show, seen))
    await asyncio.sleep(1.0)  # the watcher has its partitions before the first output
    _say(f"replaying at {args.rate:.0f} events/s with {args.bad_fraction:.0%} malformed records")
    stats = await replay(settings, events, rate=args.rate, bad_fraction=args.bad_fraction, seed=args.seed)

    def metrics() -> str:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
            return r.read().decode()

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the worker has consumed everything we sent
        if _metric(await asyncio.to_thread(metrics), "intentstream_events_in_total") >= stats.sent:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(2.0)  # outputs of the last batch reach the watcher
    text = await asyncio.to_thread(metrics)
    stop.set()
    await watcher
    latencies = [ts - v["input_ts"] for ts, v in seen[settings.topic_intent] if v.get("input_ts")]
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (float("nan"), float("nan"))
    buckets = _histogram(text, "intentstream_latency_seconds")
    late = sum(1 for _ts, v in seen[settings.topic_dlq] if v.get("reason") == TOO_LATE_REASON)
    user_days = active_user_days(
        np.unique([e.user_id for e in events], return_inverse=True)[1], np.array([e.ts for e in events])
    )
    return {
        "events": stats.sent,
        "scored": int(_metric(text, "intentstream_events_scored_total")),
        "duplicates": int(_metric(text, "intentstream_duplicates_total")),
        "late": late,
        "dlq": len(seen[settings.topic_dlq]),
        "intents": len(seen[settings.topic_intent]),
        "churn_alerts": len(seen[settings.topic_churn]),
        "alerts_per_1k_users_day": round(per_1k_user_days(len(seen[settings.topic_churn]), user_days), 2),
        # End to end, for the intent events emitted (one per event under every_event, fewer under on_change): from
        # the input record's timestamp to the intent record's, both set by the broker's clients at production.
        "p50_ms": round(float(p50), 1),
        "p99_ms": round(float(p99), 1),
        # Every scored event, from the worker's histogram (input record's timestamp to scoring), interpolated
        # within its buckets as Prometheus' histogram_quantile does.
        "score_p50_ms": round(1000 * _quantile(buckets, 0.50), 1),
        "score_p99_ms": round(1000 * _quantile(buckets, 0.99), 1),
    }


def _histogram(text: str, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of each bucket of a Prometheus histogram, in order."""
    out = []
    for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} ([0-9.eE+-]+)$', text, re.M):
        out.append((float(m.group(1)), float(m.group(2))))
    return sorted(out)


def _quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The q-quantile of a cumulative histogram, linear within the bucket it falls in; nan when empty. In the last,
    unbounded bucket, the largest finite bound (what histogram_quantile returns)."""
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = upper, count
    return lower
