"""Micro-benchmark of ``models.items.suggest``: microseconds per user at a batch size, on real windows.

    python -m load_tests.bench_items --model var/items --data var/sim.jsonl.gz [--batch 256] [--min-window 64]
        [--before REV]    (suggest as of a git revision too, call for call in turns, same results checked)

The windows are the engine's (each user's last 64 events, of any type) at the users' last events in the data
(``--min-window N``: only the users with at least N events there; 64: full windows, as in the load test); the
figures are medians over repeated calls of one batch after another, single-threaded: wall time, and the thread's
CPU time (what a busy shared machine inflates less: time spent waiting for a core is not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from load_tests.variants import items_module_at
from models.features import FeaturizerConfig
from models.items import select_items, suggest
from training.data import read_events
from training.train_items import clicks


def windows(path: list[str], window: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    c = clicks(read_events(path))
    ends = np.r_[np.flatnonzero(c.user[1:] != c.user[:-1]), len(c) - 1]  # each user's last event
    starts = np.maximum(np.searchsorted(c.user, c.user[ends]), ends - window + 1)
    return (
        [c.item[s : e + 1] for s, e in zip(starts, ends, strict=True)],
        [c.type[s : e + 1] for s, e in zip(starts, ends, strict=True)],
        [c.ts[s : e + 1] for s, e in zip(starts, ends, strict=True)],
    )


def bench(
    model_path: Path, data: list[str], batch: int, rounds: int, k: int, min_window: int = 0, before: str | None = None
) -> dict:
    """``before``: a git revision whose ``suggest`` is timed too, call for call in turns with today's (its results
    must be the same)."""
    model = select_items(model_path)
    items, types, ts = windows(data, FeaturizerConfig().window)
    chosen = [i for i, x in enumerate(items) if len(x) >= min_window]
    items, types, ts = [items[i] for i in chosen], [types[i] for i in chosen], [ts[i] for i in chosen]
    n_batches = max(1, min(rounds, len(items) // batch))
    old = None if before is None else items_module_at(before).suggest
    per_user: list[float] = []
    cpu_per_user: list[float] = []
    old_per_user: list[float] = []
    old_cpu_per_user: list[float] = []
    for r in range(n_batches):
        a = r * batch
        args = (model, items[a : a + batch], types[a : a + batch], ts[a : a + batch])
        turns = [(suggest, per_user, cpu_per_user)] + ([] if old is None else [(old, old_per_user, old_cpu_per_user)])
        outs = []
        for fn, wall, cpu in turns if r % 2 else turns[::-1]:
            t0, c0 = time.perf_counter(), time.thread_time()
            outs.append(fn(*args, k=k))
            cpu.append((time.thread_time() - c0) / len(outs[-1]) * 1e6)
            wall.append((time.perf_counter() - t0) / len(outs[-1]) * 1e6)
        if len(outs) == 2 and outs[0] != outs[1]:
            raise SystemExit(f"suggest differs from {before}'s on batch {r}")
    lengths = [len(x) for x in items]
    result = {
        "model": str(model.path),
        "batch": batch,
        "k": k,
        "batches": n_batches,
        "us_per_user_median": round(statistics.median(per_user), 1),
        "us_per_user_p90": round(float(np.percentile(per_user, 90)), 1),
        "cpu_us_per_user_median": round(statistics.median(cpu_per_user), 1),
        "min_window": min_window,
        "mean_window": round(float(np.mean(lengths)), 1),
        "neighbours_used": model.config.neighbours,
    }
    if old is not None:
        result["before"] = {
            "rev": before,
            "us_per_user_median": round(statistics.median(old_per_user), 1),
            "cpu_us_per_user_median": round(statistics.median(old_cpu_per_user), 1),
        }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="item artifacts directory or one artifact")
    p.add_argument("--data", nargs="+", required=True, help="events whose users' windows are looked up")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=50, help="batches timed (at most the data's users / batch)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--min-window", type=int, default=0, metavar="N", help="only users with at least N window events")
    p.add_argument("--before", metavar="REV", help="also time suggest as of this git revision, in turns")
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = p.parse_args()
    result = bench(args.model, args.data, args.batch, args.rounds, args.k, args.min_window, args.before)
    print(
        f"suggest: {result['us_per_user_median']} µs per user (median; p90 {result['us_per_user_p90']}; CPU "
        f"{result['cpu_us_per_user_median']}) at batch {result['batch']}, k {result['k']}, mean window "
        f"{result['mean_window']} events, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    if "before" in result:
        b = result["before"]
        print(
            f"  as of {b['rev']}: {b['us_per_user_median']} µs per user (CPU {b['cpu_us_per_user_median']}), same results"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
