"""Profile of one engine worker at its maximum rate (py-spy), summarised by function and by area.

    python -m load_tests profile --out DIR [--events N] [--seconds S] [--rate-hz HZ] [--variant NAME]

A backlog of simulator traffic goes into fresh topics; one engine worker drains it while
``py-spy record --threads -r HZ -f raw`` samples it (attached once the worker owns its partitions, so
imports and startup stay out of the profile). The raw collapsed stacks are kept in DIR/profile.txt (open
them with any flame-graph tool); DIR/profile_summary.{json,md} hold:

- *areas*: each sample is charged to the innermost frame of our own code (stream/, models/) on its stack,
  named by function (``Engine.process``, ``UserState.accept``, ``score_batch``...), or, when the stack
  holds none of our code, to the library it is in (Faust and mode, aiokafka, asyncio, torch...);
- the functions with the most *self* time (the leaf frames) and the most *inclusive* time;
- the worker's throughput while it was profiled (py-spy's sampling slows it a little: compare ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from load_tests import procs as P
from load_tests.traffic import Traffic
from stream.settings import Settings

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
OURS = ("stream/", "models/")
ENTRY = ("stream/cli.py", "stream/worker.py", "load_tests/variants.py")  # at the root of every stack: not an area
LIBRARIES = (  # (path prefix, area), first match wins; py-spy shortens site-packages paths to "faust/..."
    ("faust/", "faust"),
    ("mode/", "faust (mode services)"),
    ("aiokafka/", "aiokafka"),
    ("kafka/", "aiokafka"),
    ("torch/", "torch"),
    ("numpy/", "numpy"),
    ("rocksdict/", "rocksdb"),
    ("prometheus_client/", "prometheus_client"),
    ("aiohttp/", "aiohttp"),
    ("asyncio/", "asyncio event loop"),
    ("selectors.py", "asyncio event loop"),
    ("concurrent/", "threads"),
    ("threading.py", "threads"),
)


def parse_frame(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    return (m.group("func"), m.group("file")) if m else (frame.strip(), "")


def area_of(stack: list[tuple[str, str]]) -> str:
    """The innermost frame of our own code names the area; else the innermost library frame. Only frames below
    the event loop's dispatch (``Handle._run``) count: above it every stack is the same runner. Socket writes
    and other asyncio calls made by a library are charged to that library; what is left (polling,
    scheduling callbacks and tasks) is the event loop's own cost."""
    cut = 0
    for i, (func, _path) in enumerate(stack):
        if func in ("Handle._run", "BaseEventLoop._run_once"):
            cut = i + 1
    inner = stack[cut:]
    for func, path in reversed(inner):
        if path.endswith(ENTRY):
            continue
        if path.startswith(OURS) or any(f"/{o}" in path for o in OURS):
            return f"{path.split('/')[-1]}:{func}"
    for _func, path in reversed(inner):
        for prefix, area in LIBRARIES:
            if area != "asyncio event loop" and (path.startswith(prefix) or f"/{prefix}" in path):
                return area
    return "asyncio event loop" if cut or any("asyncio/" in p or "selectors" in p for _, p in stack) else stack[-1][0]


def component_of(thread: str, stack: list[tuple[str, str]]) -> str:
    """Where a sample's time goes, in the worker's own terms (the README's performance section uses these)."""
    if thread and "MainThread" not in thread:
        return (
            "stall-watchdog thread (GIL waits)" if "watchdog" in thread else "Faust consumer thread (aiokafka fetches)"
        )
    cut = 0
    for i, (func, _path) in enumerate(stack):
        if func in ("Handle._run", "BaseEventLoop._run_once"):
            cut = i + 1
    inner = stack[cut:]
    funcs = {func for func, _path in inner}
    if "Engine.process" in funcs:
        return "Engine.process (validate, state, score, emit: stream/engine.py and below)"
    if "create_app.<locals>.write_batch" in funcs:
        if "create_app.<locals>.send_output" in funcs:
            return "app.py write_batch: one Faust Topic.send per output"
        return "app.py write_batch: RocksDB writes, changelog sends, waiting for acks"
    if "create_app.<locals>.score" in funcs:
        return "app.py agent loop (take_events, acks, records, metrics)"
    paths = [path for _func, path in inner]
    if any("aiokafka/" in path or path.startswith("kafka/") for path in paths):
        return "aiokafka in the event loop (producer sender, client)"
    if any(path.startswith(("faust/", "mode/")) or "/faust/" in path or "/mode/" in path for path in paths):
        return "Faust and mode services (stream plumbing, conductor, commits, timers)"
    return "asyncio event loop (select, callbacks)"


def summarise(raw: str, top: int = 25) -> dict[str, Any]:
    """Areas, self and inclusive time from py-spy's raw output ("frame;frame;... count" per line)."""
    areas: collections.Counter[str] = collections.Counter()
    components: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack_text.split(";")
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else ""
        if thread:
            frames = frames[1:]
        if frames and frames[0].startswith("process"):
            frames = frames[1:]
        stack = [parse_frame(f) for f in frames]
        if not stack:
            continue
        total += count
        threads[thread or "?"] += count
        areas[area_of(stack)] += count
        components[component_of(thread, stack)] += count
        func, path = stack[-1]
        self_time[f"{func} ({path.split('site-packages/')[-1]})"] += count
        for name in {f"{f} ({p.split('site-packages/')[-1]})" for f, p in stack}:
            inclusive[name] += count

    def share(c: collections.Counter[str], n: int) -> list[dict[str, Any]]:
        return [{"name": k, "samples": v, "pct": round(100.0 * v / total, 2)} for k, v in c.most_common(n)]

    return {
        "samples": total,
        "threads": share(threads, 10),
        "components": share(components, top),
        "areas": share(areas, top),
        "self": share(self_time, top),
        "inclusive": share(inclusive, top),
    }


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# Engine profile",
        "",
        f"py-spy at {meta['rate_hz']} Hz for {meta['seconds']} s on one worker draining a backlog; "
        f"{summary['samples']:,} samples (active threads only). Throughput while profiled: "
        f"{meta.get('eps', 0):,.0f} events/s; load average {meta.get('load_avg')}.",
        "",
    ]
    for title, key in (
        ("Components", "components"),
        ("Areas (innermost own frame)", "areas"),
        ("Self time", "self"),
        ("Inclusive time", "inclusive"),
    ):
        lines += [f"## {title}", "", "| % | samples | where |", "|---:|---:|---|"]
        lines += [f"| {r['pct']} | {r['samples']:,} | `{r['name']}` |" for r in summary[key]]
        lines.append("")
    return "\n".join(lines)


async def _backlog(settings: Settings, events: int, users: int) -> int:
    from stream.traffic.replay import replay

    traffic = Traffic(users=users)
    await P.create_topics(
        settings, {t: settings.partitions for t in (settings.topic_clickstream, *settings.output_topics)}
    )
    stats = await replay(settings, itertools.islice(traffic.records(), events))
    return stats.sent


async def _outputs(settings: Settings) -> int:
    offsets = P.Offsets(settings)
    await offsets.start()
    try:
        return await offsets.end([settings.topic_intent, settings.topic_dlq])
    finally:
        await offsets.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder of profile.txt and profile_summary.*")
    parser.add_argument("--events", type=int, default=100_000, help="backlog events (default 100,000)")
    parser.add_argument("--users", type=int, default=1_000_000, help="population of the traffic (1,000,000)")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of profiling (default 30)")
    parser.add_argument("--rate-hz", type=int, default=200, help="py-spy samples per second (default 200)")
    parser.add_argument("--variant", help="profile a proposed engine change (load_tests/variants.py)")
    parser.add_argument(
        "--suggestions",
        choices=("on", "off"),
        default="off",
        help="item suggestions in the intent events (on: an item model trained on the traffic's template, as the "
        "load test's; default off)",
    )


def main(args: argparse.Namespace) -> int:
    import os
    import shutil

    from load_tests.run import Config, Run

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if shutil.which("py-spy") is None:
        raise SystemExit("load_tests profile: py-spy not found (pip install py-spy)")
    run = Run(Config(out=out, suggestions=[args.suggestions]))
    started_broker = run.ensure_broker()
    run.ensure_model()
    run.ensure_items(Traffic(users=args.users))
    s = run.settings("profile", f"{run.tag}-profile-in")
    worker = None
    try:
        sent = asyncio.run(_backlog(s, args.events, args.users))
        argv = None if args.variant is None else P.variant_argv(args.variant)
        worker = P.start("engine", s, out / "logs", argv=argv)

        async def ready() -> None:
            client = P.Http()
            try:
                await P.wait_ready([worker], client, s.partitions)
            finally:
                await client.close()

        asyncio.run(ready())
        before, t0 = asyncio.run(_outputs(s)), time.time()
        raw_path = out / "profile.txt"
        cmd = ["py-spy", "record", "--threads", "-r", str(args.rate_hz), "-f", "raw", "-o", str(raw_path)]
        cmd += ["-d", str(int(args.seconds)), "--pid", str(worker.pid)]
        print(f"load_tests profile: {' '.join(cmd)}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        after, t1 = asyncio.run(_outputs(s)), time.time()
        eps = (after - before) / (t1 - t0)
        if after >= sent:
            print("load_tests profile: the backlog ran out while profiling; raise --events", file=sys.stderr)
        summary = summarise(raw_path.read_text())
        meta = {
            "rate_hz": args.rate_hz,
            "seconds": args.seconds,
            "events_backlog": sent,
            "processed_while_profiled": after - before,
            "eps": round(eps, 1),
            "backlog_ran_out": after >= sent,
            "load_avg": [round(x, 2) for x in os.getloadavg()],
            "variant": args.variant,
            "suggestions": args.suggestions,
        }
        (out / "profile_summary.json").write_bytes(orjson.dumps({**meta, **summary}, option=orjson.OPT_INDENT_2))
        (out / "profile_summary.md").write_text(markdown(summary, meta))
        print(markdown(summary, meta))
    finally:
        if worker is not None:
            P.stop([worker])
        asyncio.run(P.delete_topics(s, run.tag))
        shutil.rmtree(run.state_root, ignore_errors=True)
        if started_broker:
            from stream import broker

            broker.stop(run.base)
    return 0
