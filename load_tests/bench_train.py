"""Training speed: simulate about N events, then time `intentstream train`'s steps with its default settings.

    python -m load_tests.bench_train --events 1000000 --json var/bench_train.json

Target: the default model (gru) trains on 1 million simulator events in under 10 minutes on a 2-core CPU.
The clock covers what `intentstream train` does after the file exists: read and validate the events,
featurize, label, split, train (with validation every epoch), calibrate, score val/test and write the
artifact. Simulating the file is timed separately and not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from models.model import ARCHS

PILOT_USERS = 2000  # a small simulation first measures events per user (the simulator's rates change)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench_train", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="about this many events (30 simulated days)")
    parser.add_argument("--arch", default="gru", choices=ARCHS)
    parser.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=None, help="use this events file instead of simulating")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = parser.parse_args(argv)

    from models.artifact import resolve_device
    from stream.traffic.simulator import write_simulation
    from training.data import DataConfig, load_dataset
    from training.train import TrainConfig, publish, train_model

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        sim_s = 0.0
        data = args.data
        if data is None:
            t0 = time.perf_counter()
            pilot = write_simulation(Path(tmp) / "pilot.jsonl", users=PILOT_USERS, days=30, seed=args.seed)
            users = math.ceil(1.05 * args.events / (pilot["events"] / PILOT_USERS))  # at least N events
            data = Path(tmp) / "events.jsonl"
            write_simulation(data, users=users, days=30, seed=args.seed)
            sim_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = load_dataset([data], DataConfig())
        load_s = time.perf_counter() - t0
        overrides = {"epochs": args.epochs} if args.epochs else {}
        cfg = TrainConfig(arch=args.arch, device=args.device, seed=args.seed, **overrides)
        t1 = time.perf_counter()
        result = train_model(ds, cfg, progress=sys.stderr.isatty())
        train_s = time.perf_counter() - t1
        path = publish(result, ds, cfg, Path(tmp) / "models")
        total_s = time.perf_counter() - t0
        summary = {
            "events": len(ds),
            "users": ds.n_users,
            "arch": args.arch,
            "device": str(resolve_device(args.device)),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "simulate_seconds": round(sim_s, 1),
            "load_seconds": round(load_s, 1),
            "train_seconds": round(train_s, 1),
            "total_seconds": round(total_s, 1),
            "target_seconds": 600,
            "under_target": total_s < 600,
            "epochs_run": result.metrics["epochs_run"],
            "best_epoch": result.metrics["best_epoch"],
            "train_chunks": result.metrics["train_chunks"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "test": {
                h: {k: result.metrics["test"][h][k] for k in ("roc_auc", "pr_auc")} for h in ("purchase", "churn")
            },
            "artifact": path.name,
            "config": asdict(cfg),
        }
    print(
        f"{summary['events']} events ({summary['users']} users): load {load_s:.0f} s + train {train_s:.0f} s "
        f"({summary['epochs_run']} epochs) = {total_s:.0f} s on {summary['device']} "
        f"({summary['torch_threads']} threads) -> {'under' if summary['under_target'] else 'OVER'} the 600 s target"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
