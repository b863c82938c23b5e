"""Microseconds per record of ``stream.contract.validate``: valid events, and rejected records of every kind.

    python -m load_tests.bench_contract [--records N] [--repeat R] [--json PATH]

Records are encoded once up front (as they arrive from Kafka) and validated in a tight loop; the figure is
the best of R passes (the least disturbed by other work on a shared machine). Design target: well under
5 us per valid event.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from stream.contract import EVENT_TYPES, Event, validate
from stream.traffic import badrecords

TARGET_US = 5.0


def valid_records(n: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """(value, key) of realistic events: all optional fields in most, ids and categories of real lengths."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        user = f"{rng.randrange(500_000_000, 600_000_000)}"
        event = Event(
            event_id=f"evt-{i:012d}",
            user_id=user,
            type=rng.choice(EVENT_TYPES),
            ts=1_569_888_000_000 + rng.randrange(30 * 86_400_000),
            session_id=f"{rng.getrandbits(128):032x}" if rng.random() < 0.9 else None,
            item_id=str(rng.randrange(1_000_000, 99_999_999)),
            category=rng.choice(("electronics.smartphone", "appliances.kitchen.washer", "2053013555631882655")),
            price=round(rng.uniform(1, 2000), 2) if rng.random() < 0.95 else None,
            quantity=rng.randint(1, 3) if rng.random() < 0.2 else None,
            device=rng.choice(("mobile", "desktop", None)),
        )
        out.append((event.to_json(), user.encode()))
    return out


def per_record_us(records: Sequence[tuple[bytes, bytes | None]], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for value, key in records:
            validate(value, key)
        best = min(best, time.perf_counter() - start)
    return best / len(records) * 1e6


def parse_only_us(records: Sequence[tuple[bytes, bytes | None]], repeat: int) -> float:
    """orjson.loads alone over the same records: the floor under validate, and a gauge of machine load."""
    loads = orjson.loads
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for value, _key in records:
            loads(value)
        best = min(best, time.perf_counter() - start)
    return best / len(records) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench_contract", description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=50_000, help="records per pass (default 50,000)")
    parser.add_argument("--repeat", type=int, default=5, help="passes; the best one counts (default 5)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    valid = valid_records(args.records)
    assert all(isinstance(validate(v, k), Event) for v, k in valid[:1000])
    # Oversized records are cheap to reject but expensive to build: keep them at their share of the kinds.
    bad = [(r.value, r.key) for r in badrecords.generate(args.records // 5, seed=1)]
    assert all(isinstance(validate(v, k), str) for v, k in bad)
    by_kind: dict[str, list[tuple[bytes, bytes | None]]] = {}
    for r in badrecords.one_of_each(seed=2):
        by_kind.setdefault(r.kind, []).append((r.value, r.key))

    valid_us = per_record_us(valid, args.repeat)
    parse_us = parse_only_us(valid, args.repeat)
    rejected_us = per_record_us(bad, args.repeat)
    kind_us = {kind: per_record_us(recs * 200, 3) for kind, recs in by_kind.items()}
    result = {
        "valid_us_per_event": round(valid_us, 3),
        "rejected_us_per_record": round(rejected_us, 3),
        "valid_events_per_s": round(1e6 / valid_us),
        "json_parse_only_us": round(parse_us, 3),
        "mean_valid_bytes": round(sum(len(v) for v, _ in valid) / len(valid), 1),
        "slowest_rejections_us": dict(
            sorted(((k, round(v, 2)) for k, v in kind_us.items()), key=lambda kv: -kv[1])[:5]
        ),
        "records": args.records,
        "repeat": args.repeat,
        "target_us": TARGET_US,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print(
        f"validate: {valid_us:.2f} us per valid event ({1e6 / valid_us:,.0f}/s, target < {TARGET_US:g} us), "
        f"{rejected_us:.2f} us per rejected record (mix of {len(badrecords.KINDS)} kinds); "
        f"orjson.loads alone {parse_us:.2f} us"
    )
    print("slowest rejections: " + ", ".join(f"{k} {v} us" for k, v in result["slowest_rejections_us"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
