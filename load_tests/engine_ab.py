"""CPU cost of ``Engine.process`` per event, in process: the engine of a git revision against the working tree.

    python -m load_tests.engine_ab [--rev REV] [--events N] [--batch B] [--turns T] [--users U]

No Kafka, no Faust: both engines (stream/engine.py and stream/emit.py of ``--rev``, and those of the working tree)
process the same simulator batches (every_event policy, a dict as the table, one untrained GRU model), taking
turns (A B, B A, ...) so that a change in the machine's load hits both alike. Reported: CPU microseconds per
event (``time.process_time``, which counts this process only) per turn and their medians, and whether both
produced the same output records (``scored_at`` and ``latency_ms`` aside: they hold the wall clock).

It isolates the part of a worker that stream/engine.py owns: on a busy shared machine an end-to-end A/B of a
change worth a few percent of a worker's time is lost in the noise (docs/performance.md).
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

ROOT = Path(__file__).resolve().parents[1]


ENGINE_MODULES = [  # the modules of the engine's hot path, in import order
    ("stream.contract", "stream/contract.py"),  # the records it writes
    ("stream.state.user", "stream/state/user.py"),
    ("stream.churn", "stream/churn.py"),
    ("stream.emit", "stream/emit.py"),
    ("stream.scoring", "stream/scoring.py"),
    ("stream.engine", "stream/engine.py"),
]


class NoRevision(LookupError):
    pass


def engine_at(rev: str) -> types.ModuleType:
    """stream.engine as it was at ``rev``, importing the other engine modules of that revision, in modules of its
    own (sys.modules is put back afterwards). NoRevision when git or the revision is not there."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        raise NoRevision("needs git and a clone of the repository")
    saved = {name: sys.modules.get(name) for name, _ in ENGINE_MODULES}
    parents = {name: getattr(sys.modules[name.rpartition(".")[0]], name.rpartition(".")[2]) for name in saved}
    loaded: dict[str, types.ModuleType] = {}
    try:
        for name, path in ENGINE_MODULES:
            got = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True)
            if got.returncode != 0:
                raise NoRevision(f"git has no {rev}:{path} here (a shallow clone?)")
            module = types.ModuleType(name)
            module.__file__ = f"{rev}:{path}"
            sys.modules[name] = module  # dataclasses look their module up
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, module)
            exec(compile(got.stdout, module.__file__, "exec"), module.__dict__)
            loaded[name] = module
    finally:
        for name, prior in saved.items():
            if prior is not None:
                sys.modules[name] = prior
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, parents[name])
    return loaded["stream.engine"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.engine_ab", description=__doc__.split("\n")[0])
    parser.add_argument("--rev", default="HEAD", help="git revision of the engine to compare with (default HEAD)")
    parser.add_argument("--events", type=int, default=24_000, help="events per turn (default 24,000)")
    parser.add_argument("--batch", type=int, default=135, help="events per batch (default 135: the worker's mean)")
    parser.add_argument("--turns", type=int, default=6, help="turns per engine (default 6)")
    parser.add_argument(
        "--warm",
        type=float,
        default=0.0,
        help="share of the events that fills the table before the timed part (default 0; 0.8 with --users 1000: "
        "every timed event finds a full window)",
    )
    parser.add_argument(
        "--users", type=int, default=1_000_000, help="traffic population (default 1,000,000; 1,000 fills windows)"
    )
    args = parser.parse_args(argv)

    from load_tests.traffic import Traffic
    from load_tests.untrained import untrained_artifact
    from stream import engine as current
    from stream.settings import Settings

    old = engine_at(args.rev)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = untrained_artifact(Path(tmp), data_hash="engine-ab")
    settings = Settings.from_env(emit_policy="every_event")
    records = list(itertools.islice(Traffic(users=args.users).records(), args.events))
    now = int(time.time() * 1000)
    batches = [
        [current.InRecord(k, v, "clickstream", hash(k) % 4, i, now) for i, (k, v) in enumerate(chunk, start=j)]
        for j, chunk in ((j, records[j : j + args.batch]) for j in range(0, len(records), args.batch))
    ]

    def process(engine: Any, table: dict[str, bytes], todo: list[list[Any]], outputs: list[Any]) -> None:
        for batch in todo:
            result = engine.process(batch, lambda uid, rec: table.get(uid))
            for uid, (blob, _rec) in result.states.items():
                table[uid] = blob
            outputs.append([(o.topic, o.key, o.value) for o in result.outputs])

    # --warm: the first share of the batches fills the table once (with the working tree's engine); every turn then
    # starts from a copy of that table and of the partitions' sessions, and only the rest is timed.
    n_warm = int(len(batches) * args.warm)
    warm_engine = current.Engine(settings, model, torch.device("cpu"))
    warm_table: dict[str, bytes] = {}
    process(warm_engine, warm_table, batches[:n_warm], [])
    timed = batches[n_warm:]
    n_timed = sum(len(b) for b in timed)
    gc.collect()
    # as the worker does once running (stream/app.py freeze_startup_objects): without the young generation's
    # threshold, collections walking a batch's live objects counted here and not in a worker
    from stream.app import GC_YOUNG_THRESHOLD

    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

    def turn(module: Any) -> tuple[float, list[Any]]:
        engine = module.Engine(settings, model, torch.device("cpu"))
        engine.sessions = copy.deepcopy(warm_engine.sessions)
        table = dict(warm_table)
        outputs: list[Any] = []
        started = time.process_time()
        process(engine, table, timed, outputs)
        return time.process_time() - started, outputs

    systems = {f"rev {args.rev}": old, "working tree": current}
    us: dict[str, list[float]] = {name: [] for name in systems}
    outs: dict[str, list[Any]] = {}
    load_start = [round(x, 2) for x in os.getloadavg()]
    for t in range(args.turns):
        for name in list(systems) if t % 2 == 0 else list(reversed(systems)):
            seconds, outs[name] = turn(systems[name])
            us[name].append(1e6 * seconds / n_timed)

    def comparable(batches_out: list[Any]) -> list[Any]:
        drop = ("scored_at", "latency_ms")
        return [
            [(topic, key, {k: v for k, v in orjson.loads(value).items() if k not in drop}) for topic, key, value in b]
            for b in batches_out
        ]

    a, b = (comparable(o) for o in outs.values())
    same = close(a, b)
    print(
        f"engine_ab: {n_timed:,} events timed (after {len(records) - n_timed:,} to warm the table) in batches of "
        f"{args.batch}, {args.turns} turns each; load {load_start}"
    )
    print(
        f"same outputs (scored_at, latency_ms aside; floats within 2e-5 or 1e-4 relative): {same} ({sum(map(len, b)):,} records)"
    )
    for name, values in us.items():
        print(
            f"{name:>14}: median {np.median(values):6.1f}, minimum {min(values):6.1f} us/event CPU; "
            f"turns {', '.join(f'{x:.1f}' for x in values)}"
        )
    ratio = np.median(us["working tree"]) / np.median(us[f"rev {args.rev}"])
    print(f"working tree / rev {args.rev} (minimum): {min(us['working tree']) / min(us[f'rev {args.rev}']):.3f}")
    print(f"working tree / rev {args.rev}: {ratio:.3f}")
    return 0 if same else 1


def close(a: Any, b: Any) -> bool:
    """Equal, but for floats within 2e-5 or 1e-4 relative (the model's float noise: see tests/test_engine_reference.py)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= max(2e-5, 1e-4 * abs(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


if __name__ == "__main__":
    sys.exit(main())
