"""Producer throughput of ``stream.traffic.replay.replay`` into the local broker, with --max pacing (the default);
or, with ``--paced RATE``, what a paced replay costs the machine it shares with the worker it loads.

    python -m load_tests.bench_replay [--events N] [--users U] [--json PATH]
    python -m load_tests.bench_replay --paced 35000 [--ticks 0.001,0.005] [--turns 2] [--events N] [--json PATH]

Three runs into a fresh topic each: pre-encoded (key, value) records (the producer alone), Event objects
(plus JSON encoding), and Events with 1 % malformed records mixed in. Each run is checked afterwards: the
topic's end offsets must add up to the records reported sent. The topics are deleted at the end. Target:
at least 50,000 events/s on the 2-core development machine.

``--paced``: the load tests' traffic (``load_tests.traffic``, 1,000 users) replayed at RATE records/s with each
pacing tick of ``--ticks`` in turn (``replay(tick_s=...)``), ``--turns`` rounds: the replay's CPU
and the broker's, per record and as a share of a core, while nothing consumes the topic.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import random
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from stream.contract import EVENT_TYPES, Event
from stream.settings import Settings
from stream.topics import admin_client, kafka_client_kwargs
from stream.traffic.replay import replay

TARGET_EVENTS_PER_S = 50_000


def make_events(n: int, users: int, seed: int = 0) -> list[Event]:
    rng = random.Random(seed)
    return [
        Event(
            event_id=f"bench-{i:010d}",
            user_id=str(500_000_000 + rng.randrange(users)),
            type=rng.choice(EVENT_TYPES),
            ts=1_569_888_000_000 + i * 20,
            session_id=f"{rng.getrandbits(128):032x}",
            item_id=str(rng.randrange(1_000_000, 99_999_999)),
            category="electronics.smartphone",
            price=round(rng.uniform(1, 2000), 2),
            device="mobile",
        )
        for i in range(n)
    ]


def bench_settings(base: Settings, tag: str) -> Settings:
    return Settings.from_env(
        topic_clickstream=f"bench-replay-{tag}",
        topic_dlq=f"bench-replay-dlq-{tag}",
        topic_intent=f"bench-replay-intent-{tag}",
        topic_churn=f"bench-replay-churn-{tag}",
        kafka_bootstrap=base.kafka_bootstrap,
    )


async def topic_record_count(settings: Settings, topic: str) -> int:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        beginning, end = await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
        return sum(end[tp] - beginning[tp] for tp in tps)
    finally:
        await consumer.stop()


async def delete_topics(settings: Settings, topics: list[str]) -> None:
    async with admin_client(settings) as admin:
        await admin.delete_topics(topics)


async def one_run(settings: Settings, name: str, records: list, bad_fraction: float) -> dict:
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    stats = await replay(settings, records, bad_fraction=bad_fraction, seed=1)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    in_topic = await topic_record_count(settings, settings.topic_clickstream)
    if in_topic != stats.sent:
        raise SystemExit(f"{name}: {stats.sent} records reported sent but {in_topic} in the topic")
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "run": name,
        "records": stats.sent,
        "bad": stats.bad,
        "seconds": round(stats.seconds, 3),
        "events_per_s": round(stats.rate),
        "client_cpu_us_per_record": round(cpu_s / stats.sent * 1e6, 2),
    }


async def bench(n: int, users: int) -> list[dict]:
    base = Settings.from_env()
    events = make_events(n, users)
    pre_encoded = [(e.user_id.encode(), e.to_json()) for e in events]
    runs: list[tuple[str, list[Any], float]] = [
        ("pre-encoded (key, value)", pre_encoded, 0.0),
        ("Event objects", events, 0.0),
        ("Events + 1% bad", events, 0.01),
    ]
    results, created = [], []
    try:
        for name, records, bad_fraction in runs:
            settings = bench_settings(base, uuid.uuid4().hex[:8])
            created += [settings.topic_clickstream, *settings.output_topics]
            results.append(await one_run(settings, name, records, bad_fraction))
            r = results[-1]
            print(
                f"{name:26s} {r['records']:>9,} records in {r['seconds']:6.2f} s = {r['events_per_s']:>9,} /s "
                f"({r['client_cpu_us_per_record']} us client CPU per record)",
                flush=True,
            )
    finally:
        if created:
            await delete_topics(base, created)
    return results


async def paced(rate: float, ticks: list[float], turns: int, n: int) -> list[dict]:
    """Each tick in turn, ``turns`` rounds: the replay's and the broker's CPU at ``rate`` records/s."""
    from load_tests import procs
    from load_tests.traffic import Traffic

    base = Settings.from_env()
    broker = procs.broker_process(base)
    records = list(itertools.islice(Traffic(users=1000).records(), n))  # made before timing: the replay alone
    results, created = [], []
    try:
        for turn in range(turns):
            for tick in ticks:
                settings = bench_settings(base, uuid.uuid4().hex[:8])
                created += [settings.topic_clickstream, *settings.output_topics]
                b0 = broker.cpu_times() if broker else None
                c0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                stats = await replay(settings, records, rate=rate, tick_s=tick)
                c1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - w0
                b1 = broker.cpu_times() if broker else None
                own = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
                r: dict[str, Any] = {
                    "turn": turn,
                    "tick_s": tick,
                    "records": stats.sent,
                    "rate": round(stats.rate),
                    "replay_cpu_pct": round(100 * own / wall, 1),
                    "replay_cpu_us_per_record": round(own / stats.sent * 1e6, 2),
                }
                if b0 is not None and b1 is not None:
                    broker_s = (b1.user + b1.system) - (b0.user + b0.system)
                    r["broker_cpu_pct"] = round(100 * broker_s / wall, 1)
                    r["broker_cpu_us_per_record"] = round(broker_s / stats.sent * 1e6, 2)
                results.append(r)
                print(
                    f"tick {tick * 1000:g} ms: {r['rate']:,}/s, replay {r['replay_cpu_pct']}% of a core "
                    f"({r['replay_cpu_us_per_record']} us a record), broker {r.get('broker_cpu_pct', '-')}% "
                    f"({r.get('broker_cpu_us_per_record', '-')} us)",
                    flush=True,
                )
    finally:
        if created:
            await delete_topics(base, created)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench_replay", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per run (default 200,000)")
    parser.add_argument("--users", type=int, default=20_000, help="distinct users (default 20,000)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON here")
    parser.add_argument("--paced", type=float, metavar="RATE", help="measure a paced replay's CPU at RATE records/s")
    parser.add_argument(
        "--ticks", default="0.001,0.005", help="--paced: pacing ticks in seconds, taken in turn (0.001,0.005)"
    )
    parser.add_argument("--turns", type=int, default=2, help="--paced: rounds of the ticks (default 2)")
    args = parser.parse_args(argv)
    started = time.time()
    if args.paced is not None:
        ticks = [float(t) for t in args.ticks.split(",")]
        runs = asyncio.run(paced(args.paced, ticks, args.turns, args.events))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            report = {"paced": runs, "rate": args.paced, "events": args.events, "started_at": int(started)}
            args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        return 0
    results = asyncio.run(bench(args.events, args.users))
    producer_rate = results[0]["events_per_s"]
    verdict = "meets" if producer_rate >= TARGET_EVENTS_PER_S else "MISSES"
    print(f"producer alone: {producer_rate:,} events/s ({verdict} the {TARGET_EVENTS_PER_S:,}/s target)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "runs": results,
            "events": args.events,
            "users": args.users,
            "target_events_per_s": TARGET_EVENTS_PER_S,
            "started_at": int(started),
            "python": platform.python_version(),
        }
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
