"""Interleaved A/B of the engine against proposed changes: same traffic, same rate, alternating time slices.

    python -m load_tests ab --variant NAME [--variant NAME ...] [--rate EPS] [--slices N] [--slice-s S] --out DIR

On a machine shared with other work, two measurements taken minutes apart see different loads, and the
difference between them says more about the machine than about the engine. Here every system (the engine
and each variant of load_tests/variants.py) has its own workers running all along, on its own topics; the
traffic goes to one system at a time, for ``--slice-s`` seconds each, in rounds whose order alternates
(A B, then B A, ...), so a change of load hits every system alike. Per system: end-to-end latency
percentiles over all its slices and the median of its per-slice p99, throughput, CPU. Writes
DIR/ab_report.json and DIR/ab_summary.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from load_tests import procs as P
from load_tests.run import Config, Run, Target, Watcher, percentiles, read_latencies
from load_tests.traffic import Traffic


async def ab(run: Run, variants: list[str], rate: float, slices: int, slice_s: float, users: int) -> dict[str, Any]:
    run.http = P.Http()
    run.offsets = P.Offsets(run.base)
    await run.offsets.start()
    run.watcher = Watcher(run.offsets, run.http, run.progress, P.broker_process(run.base))
    systems: list[tuple[str, list[str] | None]] = [("engine", None)]
    systems += [(v, P.variant_argv(v)) for v in variants]
    groups: dict[str, dict[str, Any]] = {}
    try:
        for name, argv in systems:
            s = run.settings(f"ab-{name.replace('+', '-')}", f"{run.tag}-ab-{name.replace('+', '-')}-in")
            await P.create_topics(s, {t: s.partitions for t in (s.topic_clickstream, *s.output_topics)})
            procs = [P.start("engine", s, run.logs, argv=argv)]
            run.procs += procs
            groups[name] = {
                "settings": s,
                "target": Target(s.topic_clickstream, [s.topic_intent, s.topic_dlq], s.app_id, procs),
                "slices": [],
                "sent": 0,
            }
        for g in groups.values():
            await P.wait_ready(g["target"].procs, run.http, g["settings"].partitions)
        traffic = Traffic(users=users)
        # Every system gets the same records: its own iterator over the same traffic.
        streams = {name: traffic.records(track=False) for name in groups}
        order = list(groups)
        for round_no in range(slices):
            for name in order if round_no % 2 == 0 else list(reversed(order)):
                g = groups[name]
                n = int(rate * slice_s)
                run.say(f"round {round_no + 1}/{slices}: {name} at {rate:,.0f} events/s for {slice_s:.0f} s")
                phase = f"ab:{name}:{round_no}"
                t0 = time.time()
                stats = await run.produce(g["settings"], itertools.islice(streams[name], n), rate, g["target"], phase)
                t1 = time.time()
                g["sent"] += stats.sent
                drain_s = await run.drain(f"{phase}:drain", g["target"], g["sent"], timeout=120)
                cpu = [sum(x["cpu_pct"]) for x in run.watcher.samples if x["phase"] == phase][1:]
                g["slices"].append(
                    {
                        "round": round_no,
                        "t_start": t0,
                        "t_end": t1,
                        "offered_eps": round(stats.rate, 1),
                        "drain_s": drain_s,
                        "cpu_pct_mean": round(float(np.mean(cpu)), 1) if cpu else None,
                        "load1": run.watcher.samples[-1]["load1"],
                    }
                )
        out: dict[str, Any] = {}
        for name, g in groups.items():
            # The traffic is all valid: a record in the DLQ is one the latencies miss (a slice then has fewer of them)
            dlq = await run.offsets.end([g["settings"].topic_dlq])
            lat = await read_latencies(run.base, g["settings"].topic_intent)
            warm = min(2.0, 0.1 * slice_s)
            for sl in g["slices"]:
                sl["latency_ms"] = percentiles(lat, (sl["t_start"] + warm) * 1000, sl["t_end"] * 1000)
            masks = [
                (lat[:, 0] >= (sl["t_start"] + warm) * 1000) & (lat[:, 0] <= sl["t_end"] * 1000) for sl in g["slices"]
            ]
            pooled = lat[np.logical_or.reduce(masks)] if masks else lat[:0]
            p99s = [sl["latency_ms"].get("p99") for sl in g["slices"] if sl["latency_ms"].get("n")]
            out[name] = {
                "pooled_latency_ms": percentiles(pooled, -np.inf, np.inf),
                "median_slice_p99_ms": float(np.median(p99s)) if p99s else None,
                "slice_p99_ms": p99s,
                "dlq_records": dlq,
                "cpu_pct_mean": round(
                    float(np.mean([sl["cpu_pct_mean"] for sl in g["slices"] if sl["cpu_pct_mean"]])), 1
                ),
                "slices": g["slices"],
            }
        return out
    finally:
        P.stop([p for p in run.procs if p.alive()])
        await run.offsets.stop()
        await run.http.close()
        with contextlib.suppress(Exception):
            await P.delete_topics(run.base, run.tag)
        shutil.rmtree(run.state_root, ignore_errors=True)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Interleaved A/B at {report['rate']:,.0f} events/s ({report['slices']} rounds of {report['slice_s']:.0f} s)",
        "",
        f"Load average {report['load_avg_start']} at the start, {report['load_avg_end']} at the end; "
        f"engine files {report['code']['engine_sha256']}.",
        "",
        "| system | p50 ms | p95 ms | p99 ms | max ms | median of slice p99 | slice p99s | CPU % | DLQ |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    notes: list[str] = []
    for name, r in report["systems"].items():
        p = r["pooled_latency_ms"]
        lines.append(
            f"| {name} | {p.get('p50')} | {p.get('p95')} | {p.get('p99')} | {p.get('max')} | "
            f"{r['median_slice_p99_ms']} | {', '.join(f'{x:.0f}' for x in r['slice_p99_ms'])} | {r['cpu_pct_mean']} | "
            f"{r.get('dlq_records', 0):,} |"
        )
        if len(r["slice_p99_ms"]) < report["slices"] or r.get("dlq_records"):
            notes.append(
                f"**{name}: {len(r['slice_p99_ms'])} of {report['slices']} slices have latencies, "
                f"{r.get('dlq_records', 0):,} records went to the DLQ** (the traffic is valid: read the worker's log "
                "for the reasons before comparing)."
            )
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder of ab_report.json and ab_summary.md")
    parser.add_argument("--variant", action="append", required=True, help="variant of load_tests/variants.py")
    parser.add_argument("--rate", type=float, default=300.0, help="events/s during each slice (default 300)")
    parser.add_argument("--slices", type=int, default=4, help="rounds (default 4)")
    parser.add_argument("--slice-s", type=float, default=30.0, help="seconds per slice (default 30)")
    parser.add_argument("--users", type=int, default=1_000_000, help="population of the traffic (1,000,000)")


def main(args: argparse.Namespace) -> int:
    import os

    from load_tests.run import code_version

    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(Config(out=args.out))
    started_broker = run.ensure_broker()
    try:
        run.ensure_model()
        load_start = [round(x, 2) for x in os.getloadavg()]
        systems = asyncio.run(ab(run, args.variant, args.rate, args.slices, args.slice_s, args.users))
    finally:
        if started_broker:
            from stream import broker

            broker.stop(run.base)
    report = {
        "rate": args.rate,
        "slices": args.slices,
        "slice_s": args.slice_s,
        "load_avg_start": load_start,
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "code": code_version(),
        "systems": systems,
    }
    (args.out / "ab_report.json").write_bytes(
        orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    (args.out / "ab_summary.md").write_text(markdown(report))
    print(markdown(report))
    return 0
