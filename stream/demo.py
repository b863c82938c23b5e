"""`intentstream demo`: the whole product in one command, ending with one summary line.

Local broker (started if none is configured), topics, a model (trained if the model directory has none),
a worker process, simulated traffic with malformed records mixed in, a few intent events and churn
alerts printed as they arrive, a clean stop, then:
``summary: events=N scored=N intents=N churn_alerts=N dlq=N p50_ms=X p99_ms=Y``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from stream.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=10_000, help="events to replay (default 10000)")
    parser.add_argument("--rate", type=float, default=500.0, help="replay rate, events/s (default 500)")
    parser.add_argument("--bad-fraction", type=float, default=0.02, help="malformed records mixed in (default 0.02)")
    parser.add_argument("--seed", type=int, default=7, help="simulator seed of the replayed traffic")
    parser.add_argument("--show", type=int, default=5, help="intent events and churn alerts to print (each)")
    parser.add_argument("--json", metavar="PATH", help="also write the summary figures as JSON")


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def _ensure_broker(settings: Settings) -> bool:
    """Start the local broker unless a configured one answers. Returns True if we started it."""
    from stream import broker

    if broker.answers_metadata(settings.kafka_bootstrap):
        return False
    if "INTENTSTREAM_KAFKA_BOOTSTRAP" in os.environ:
        raise broker.BrokerError(
            f"no broker answers at the configured {settings.kafka_bootstrap}; start it, or unset "
            "INTENTSTREAM_KAFKA_BOOTSTRAP to let the demo run a local one"
        )
    _say("starting the local Kafka broker (first run resolves the jars from Maven Central)")
    broker.start(settings)
    return True


def _ensure_model(settings: Settings) -> None:
    from models.artifact import load_newest

    model, _ = load_newest(settings.model_dir, expect_window=settings.window_size)
    if model is not None:
        _say(f"serving {model.name} {model.version} from {settings.model_dir}")
        return
    from stream.simulator import write_simulation
    from training.train import train_small

    data = settings.state_dir / "demo" / "train.jsonl.gz"
    data.parent.mkdir(parents=True, exist_ok=True)
    _say(f"no model in {settings.model_dir}: simulating training data and training a small GRU (~2 min)")
    write_simulation(data, users=2_000, days=21, seed=1)
    path = train_small([data], settings.model_dir, max_minutes=2.0, progress=True)
    _say(f"trained {path.name}")


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


def run(args: argparse.Namespace, settings: Settings) -> int:
    from stream import broker
    from stream.topics import ensure_topics

    started_broker = _ensure_broker(settings)
    worker = None
    try:
        ensure_topics(settings)
        _ensure_model(settings)
        log_path = settings.state_dir / "demo" / "worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        _say(f"starting a worker (log: {log_path})")
        with open(log_path, "ab") as log:
            worker = subprocess.Popen([sys.executable, "-m", "stream.cli", "worker"], stdout=log, stderr=log)
        url = f"http://127.0.0.1:{settings.web_port}"
        _wait_ready(url, worker, log_path)
        summary = asyncio.run(_traffic(args, settings, url))
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
        if started_broker:
            broker.stop(settings)
    line = " ".join(f"{k}={v}" for k, v in summary.items())
    print(f"summary: {line}", flush=True)
    if args.json:
        Path(args.json).write_text(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    return 0


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
    from stream.replay import replay
    from stream.simulator import simulate

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
    return {
        "events": stats.sent,
        "scored": int(_metric(text, "intentstream_events_scored_total")),
        "intents": len(seen[settings.topic_intent]),
        "churn_alerts": len(seen[settings.topic_churn]),
        "dlq": len(seen[settings.topic_dlq]),
        "p50_ms": round(float(p50), 1),
        "p99_ms": round(float(p99), 1),
    }
