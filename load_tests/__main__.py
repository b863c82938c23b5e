"""Load tests and benchmarks of the engine.

    python -m load_tests run [--workers K] [--rates R1,R2,...] [--duration S] --out DIR
        capacity of the engine beside a ceiling and a naive agent, rate steps, latency, CPU and memory
    python -m load_tests model [--out DIR]
        scores/s against batch size for each architecture, on CPU and on CUDA when present
    python -m load_tests profile [--seconds S] --out DIR
        py-spy profile of one engine worker at its maximum rate, summarised by function and by area
    python -m load_tests ab --variant NAME [--rate EPS] --out DIR
        the engine against proposed changes (load_tests/variants.py), in alternating time slices
    python -m load_tests chaos [--guarantee at_least_once|exactly_once] [--short] --out DIR
        crashes, a rebalance, a broker restart, a paused worker and a model swap; every input matched to its outcome
    python -m load_tests peer [--events N] [--users U] [--turns T] [--systems S1,S2] --out DIR
        the worker beside Quix Streams (a passthrough with state, and per-message GRU scoring) on one backlog

The bench_*.py modules beside this one are single-purpose benchmarks with their own entry points.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from load_tests import ab, chaos, model_bench, peer, profile, run

    modules = {"run": run, "model": model_bench, "profile": profile, "ab": ab, "chaos": chaos, "peer": peer}
    for name, module in modules.items():
        doc = (module.__doc__ or "").strip().split("\n")[0]
        module.add_arguments(sub.add_parser(name, help=doc, description=doc))
    args = parser.parse_args(argv)
    return int(modules[args.command].main(args))


if __name__ == "__main__":
    sys.exit(main())
