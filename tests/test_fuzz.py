"""Fuzz: thousands of generated bad records and a flood of events for one user through a live worker.

The worker must not crash, must put every bad record in the DLQ with the reason its kind expects (and the
original bytes), must score every flood event, and its resident memory must stay bounded. The suite sends
5,000 bad records; the 100,000-record run is the same code from the command line:

    python -m tests.test_fuzz --records 100000 --out DIR      (writes DIR/fuzz.json; docs/reliability.md)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from stream.contract import DEFAULT_MAX_RECORD_BYTES
from stream.memory import CHECK_S, MAX_BACKOFF_S
from stream.settings import Settings
from stream.traffic.badrecords import BadRecord, generate
from tests.helpers import BASE_TS, Worker, consume, encode, make_events, produce, wait_assigned, write_model

FLOOD_USER = "flooder"


def hostile_extras() -> list[BadRecord]:
    """Cases beyond the generator's one-broken-field kinds: a record far over the size limit, nesting at and far
    past the parser's depth limit, a 1 MB-ish string, every JSON literal orjson refuses, binary noise."""
    base = {"event_id": "x", "user_id": "hostile", "type": "search", "ts": BASE_TS}
    key = b"hostile"
    values = [
        (orjson.dumps({**base, "pad": "p" * 900_000}), "record:"),  # 14x the limit, under the broker's 1 MB
        (b'{"a":"' + b"p" * (DEFAULT_MAX_RECORD_BYTES - 7) + b'"}', "record:"),  # one byte over the limit
        (
            b'{"event_id":"x","user_id":"hostile","type":"search","ts":1,"n":' + b"[" * 100_000 + b"]" * 100_000,
            "record:",
        ),
        (b'{"a":' * 2000 + b"1" + b"}" * 2000, "json:"),
        (b"[" * 1025 + b"]" * 1025, "json:"),
        (b'{"event_id":"x","user_id":"hostile","type":"search","ts":-Infinity}', "json:"),
        (
            b'{"event_id":"x","user_id":"hostile","type":"search","ts":' + b"9" * 400 + b"}",
            "json:",
        ),  # a 400-digit number
        (b'{"event_id":"x","user_id":"hostile","type":"search","ts":1e308}', "ts:"),
        (b"\x00" * 64, "json:"),
        (bytes(range(256)), "json:"),
        (b'{"event_id":"x","user_id":"hostile","type":"search","ts":1767600000000}\xff', "json:"),
    ]
    out = [BadRecord(key, v, expected, f"hostile_{i}") for i, (v, expected) in enumerate(values)]
    out.append(BadRecord(b"\xc3\x28", orjson.dumps({**base, "user_id": "\ufffd("}), "key:", "hostile_non_utf8_key"))
    return out


def flood(n: int) -> list[tuple[bytes | None, bytes]]:
    """``n`` valid events of one user, a few milliseconds apart."""
    return [
        (
            FLOOD_USER.encode(),
            orjson.dumps(
                {"event_id": f"flood-{i}", "user_id": FLOOD_USER, "type": "product_view", "ts": BASE_TS + i * 7}
            ),
        )
        for i in range(n)
    ]


class RssSampler:
    """Peak resident memory of a process, sampled in the background."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


def run_fuzz(settings: Settings, log_dir: Path, n_bad: int, n_flood: int, seed: int = 11) -> dict[str, Any]:
    """Send ``n_bad`` generated bad records, the hostile extras and ``n_flood`` events of one user to a fresh
    worker; return what came out and the worker's memory before, at its peak and after."""
    write_model(settings.model_dir)
    worker = Worker(settings, log_dir, emit_policy="every_event").start()
    try:
        wait_assigned([worker], settings.partitions)
        warmup = make_events(n_users=20, sessions=1, seed=seed)  # the model and every buffer in use once
        produce(settings, encode(warmup))
        consume(settings, [settings.topic_intent], until=lambda g: len(g[settings.topic_intent]) >= len(warmup))
        rss_before = psutil.Process(worker.proc.pid).memory_info().rss
        sampler = RssSampler(worker.proc.pid)
        bad = generate(n_bad, seed=seed) + hostile_extras()
        started = time.monotonic()
        produce(settings, [(b.key, b.value) for b in bad] + flood(n_flood))
        got = consume(
            settings,
            [settings.topic_dlq, settings.topic_intent],
            until=lambda g: (
                len(g[settings.topic_dlq]) >= len(bad) and len(g[settings.topic_intent]) >= len(warmup) + n_flood
            ),
            timeout=max(120.0, n_bad / 200),
        )
        seconds = time.monotonic() - started
        time.sleep(2.0)  # anything extra (a duplicate) would show up now
        time.sleep(CHECK_S + MAX_BACKOFF_S)  # and the worker's trim of its heaps after the burst (stream/memory.py)
        peak = sampler.close()
        rss_after = psutil.Process(worker.proc.pid).memory_info().rss
        alive = worker.alive()
        flood_state = worker.get(f"/users/{FLOOD_USER}/score")
    finally:
        worker.stop()
    expected = {b.value: b.expected for b in bad}
    by_sha256 = {hashlib.sha256(b.value).hexdigest(): b.value for b in bad if b.value is not None}
    wrong: list[dict[str, Any]] = []
    reasons: dict[str, int] = {}
    for m in got[settings.topic_dlq]:
        d = orjson.loads(m.value)
        original = base64.b64decode(d["value_b64"]) if d["value_b64"] is not None else None
        if "value" in d.get("truncated", {}):  # cut to fit the DLQ record: matched by its sha256
            original = by_sha256.get(d["truncated"]["value"]["sha256"])
        field = d["reason"].split(":", 1)[0]
        reasons[field] = reasons.get(field, 0) + 1
        if original not in expected or not d["reason"].startswith(expected[original]):
            wrong.append({"reason": d["reason"], "value_head": (original or b"")[:60].decode(errors="replace")})
    flood_intents = sum(1 for m in got[settings.topic_intent] if m.key == FLOOD_USER.encode())
    return {
        "bad_records": len(bad),
        "dlq_records": len(got[settings.topic_dlq]),
        "dlq_wrong_reason": len(wrong),
        "wrong_examples": wrong[:5],
        "dlq_by_field": dict(sorted(reasons.items())),
        "flood_events": n_flood,
        "flood_intents": flood_intents,
        "flood_state": {k: flood_state.get(k) for k in ("events", "window")},
        "worker_alive": alive,
        "seconds": round(seconds, 1),
        "records_per_s": round((len(bad) + n_flood) / seconds, 1),
        "rss_mb": {"before": rss_before >> 20, "peak": peak >> 20, "after": rss_after >> 20},
    }


def check(result: dict[str, Any]) -> None:
    assert result["worker_alive"]
    assert result["dlq_records"] == result["bad_records"], result
    assert result["dlq_wrong_reason"] == 0, result["wrong_examples"]
    assert result["flood_intents"] == result["flood_events"]
    assert result["flood_state"] == {"events": result["flood_events"], "window": 64}
    # Bounded: what the worker holds does not grow with the records it has seen (the queues are bounded in
    # events, so a backlog of 65 KB records may take some hundreds of MB while it lasts, which the allocator keeps
    # until the worker's trim gives it back: stream/memory.py).
    assert result["rss_mb"]["after"] - result["rss_mb"]["before"] < 150, result["rss_mb"]
    assert result["rss_mb"]["peak"] - result["rss_mb"]["before"] < 400, result["rss_mb"]


@pytest.mark.kafka
@pytest.mark.slow
def test_fuzz_5000_bad_records_and_a_flood_through_a_live_worker(fresh: Settings, tmp_path: Path):
    result = run_fuzz(fresh, tmp_path, n_bad=5_000, n_flood=2_000)
    check(result)


def main(argv: list[str] | None = None) -> int:
    from stream import broker

    parser = argparse.ArgumentParser(prog="python -m tests.test_fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="generated bad records (default 100,000)")
    parser.add_argument("--flood", type=int, default=20_000, help="events of one user (default 20,000)")
    parser.add_argument("--out", type=Path, required=True, help="folder for fuzz.json and the worker log")
    args = parser.parse_args(argv)
    tag = uuid.uuid4().hex[:8]
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env(
        topic_clickstream=f"fuzz-{tag}",
        topic_dlq=f"fuzz-dlq-{tag}",
        topic_intent=f"fuzz-intent-{tag}",
        topic_churn=f"fuzz-churn-{tag}",
        app_id=f"fuzz-{tag}",
        state_dir=str(args.out / "state"),
        model_dir=str(args.out / "models"),
    )
    if not broker.answers_metadata(settings.kafka_bootstrap):
        broker.start(settings)
    result = run_fuzz(settings, args.out, n_bad=args.records, n_flood=args.flood)
    (args.out / "fuzz.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(result).decode())
    try:
        check(result)
    except AssertionError as exc:
        print(f"fuzz: FAILED {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
