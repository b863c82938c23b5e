"""What item suggestions cost the engine per event, in process: ``Engine.process`` under every_event on the load
test's traffic, without suggestions, with today's lookup, with the lookup as of a git revision and with one lookup
per user per batch (load_tests/variants.py, ``suggest-per-user``), the settings in turns batch by batch.

    python -m load_tests.bench_suggestions [--events 60000] [--users 1000] [--before 4ae7345]

The figure is the thread's CPU time per event (a busy machine inflates it less than wall time, but still does):
the difference to ``off`` is what the lookup adds; "fewer events/s" is 1 - off / setting. The broker, Faust and
the produce path are not in it: their cost would make the lookup's share of the worker smaller.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from load_tests import variants
from load_tests.traffic import Traffic
from load_tests.untrained import untrained_artifact
from models.items import ItemConfig
from stream import engine as E
from stream.settings import Settings
from training.train_items import ItemTrainConfig, clicks, fit


def _state(table: dict[str, bytes], user_id: str, rec: E.Record) -> bytes | None:
    return table.get(user_id)


def measure(events: int, users: int, before: str, batch: int = 256) -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)  # the worker's INTENTSTREAM_TORCH_THREADS (and thread_time counts this thread only)
    traffic = Traffic(users=users, seed=11)
    c = clicks(traffic.template.events)
    items, _ = fit(c, int(c.ts.max()) + 1, ItemTrainConfig(), progress=False)
    items.manifest = {"version": 1, "serving": ItemConfig().to_dict()}
    model = untrained_artifact(Path(tempfile.mkdtemp(prefix="bench-suggestions-")), "bench-suggestions")
    now = int(time.time() * 1000)
    source = itertools.islice(traffic.records(first_tile=traffic.tiles // 2, track=False), events)
    records = [E.InRecord(k, v, "clickstream", 0, i, now) for i, (k, v) in enumerate(source)]
    today, lookup = E.suggest_json, E.Engine._suggestions
    old = variants.as_flat(variants.items_module_at(before).suggest)
    variants.suggest_per_user()
    per_user = E.Engine._suggestions
    E.Engine._suggestions = lookup  # type: ignore[method-assign]
    settings = Settings.from_env({}, emit_policy="every_event")
    cases: dict[str, tuple[Any, Callable[..., Any], Callable[..., Any]]] = {
        "off": (None, today, lookup),
        "on": (items, today, lookup),
        f"on, as of {before}": (items, old, lookup),
        "on, one lookup per user per batch": (items, today, per_user),
    }
    engines = {name: E.Engine(settings, model, torch.device("cpu"), it) for name, (it, _, _) in cases.items()}
    tables: dict[str, dict[str, bytes]] = {name: {} for name in cases}
    cpu = dict.fromkeys(cases, 0.0)
    try:
        for b, start in enumerate(range(0, len(records), batch)):
            chunk = records[start : start + batch]
            for name in list(cases) if b % 2 == 0 else list(cases)[::-1]:
                _, E.suggest_json, E.Engine._suggestions = cases[name]  # type: ignore[method-assign]
                table = tables[name]
                c0 = time.thread_time()
                result = engines[name].process(chunk, partial(_state, table))
                cpu[name] += time.thread_time() - c0
                table.update({uid: blob for uid, (blob, _) in result.states.items()})
    finally:
        E.suggest_json, E.Engine._suggestions = today, lookup  # type: ignore[method-assign]
    n = len(records)
    return {
        name: {
            "cpu_us_per_event": round(cpu[name] / n * 1e6, 1),
            "added_us_per_event": round((cpu[name] - cpu["off"]) / n * 1e6, 1),
            "fewer_events_per_s_pct": round((1 - cpu["off"] / cpu[name]) * 100, 1),
        }
        for name in cases
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=60_000)
    p.add_argument("--users", type=int, default=1_000)
    p.add_argument("--before", default=variants.ITEMS_BEFORE, metavar="REV", help="the older lookup's revision")
    args = p.parse_args()
    got = measure(args.events, args.users, args.before)
    print(
        f"{args.events:,} events of {args.users:,} users, every_event, batches of 256; load average {os.getloadavg()}"
    )
    for name, r in got.items():
        print(
            f"  {name:36s} {r['cpu_us_per_event']:7.1f} µs CPU per event  +{r['added_us_per_event']:5.1f}  "
            f"{r['fewer_events_per_s_pct']:5.1f}% fewer events/s"
        )


if __name__ == "__main__":
    main()
