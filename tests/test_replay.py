"""Replay into the real local broker: exactly-once arrival, keys, partitions, per-user order, malformed records,
pacing, the CLI on JSON lines and on REES46. Topics are fresh per test (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import gzip
import random
import time
from collections import defaultdict

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2

from load_tests.procs import read_to_end
from stream.cli import main as cli_main
from stream.contract import EVENT_TYPES, Event, validate
from stream.settings import Settings
from stream.traffic import badrecords
from stream.traffic.replay import (
    ReplayStats,
    _as_record,
    _mixed,
    detect_format,
    iter_file_events,
    kafka_partition,
    replay,
)

OCT_1_2019_MS = 1_569_888_000_000


def make_events(n: int, users: int, seed: int = 0, gap_ms: int = 1000) -> list[Event]:
    """Events of ``users`` users interleaved at random; event_id carries the user's sequence number."""
    rng = random.Random(seed)
    seq: dict[str, int] = defaultdict(int)
    events = []
    for i in range(n):
        user = f"user-{rng.randrange(users)}"
        seq[user] += 1
        events.append(
            Event(
                event_id=f"{user}#{seq[user]}",
                user_id=user,
                type=rng.choice(EVENT_TYPES),
                ts=OCT_1_2019_MS + i * gap_ms,
                session_id=f"s-{user}",
                item_id=f"i{rng.randrange(500)}",
                price=round(rng.uniform(1, 500), 2),
            )
        )
    return events


async def read_topic(settings: Settings, topic: str, timeout_s: float = 60.0) -> list:
    """Every record of ``topic``, from the beginning to the end offsets at the time of the call."""
    return (await read_to_end(settings, [topic], timeout_s=timeout_s))[topic]


def replay_sync(settings: Settings, records, **kwargs) -> ReplayStats:
    return asyncio.run(replay(settings, records, **kwargs))


# ---- into the broker --------------------------------------------------------------------------------------


@pytest.mark.kafka
def test_replay_delivers_every_event_once_in_user_order_with_bad_records_mixed_in(fresh):
    events = make_events(4000, users=300, seed=1)
    before_ms = int(time.time() * 1000)
    stats = replay_sync(fresh, events, bad_fraction=0.05, seed=7)
    after_ms = int(time.time() * 1000)
    records = asyncio.run(read_topic(fresh, fresh.topic_clickstream))

    assert stats.sent == len(records) == len(events) + stats.bad
    assert 0 < stats.bad < len(records)
    assert stats.rate == pytest.approx(stats.sent / stats.seconds)

    good, bad = [], []
    for r in records:
        (good if isinstance(validate(r.value, r.key), Event) else bad).append(r)
    assert len(bad) == stats.bad
    # every good event arrived exactly once, unchanged, keyed by its user
    by_id = {e.event_id: e for e in events}
    assert sorted(validate(r.value, r.key).event_id for r in good) == sorted(by_id)
    for r in good:
        event = validate(r.value, r.key)
        assert event == by_id[event.event_id]
        assert r.key == event.user_id.encode()
    # where the Java client, aiokafka and Faust put the key, and in each user's order
    per_user: dict[str, list[int]] = defaultdict(list)
    for r in sorted(good, key=lambda r: (r.partition, r.offset)):
        assert r.partition == kafka_partition(r.key, fresh.partitions)
        event = validate(r.value, r.key)
        per_user[event.user_id].append(int(event.event_id.split("#")[1]))
    assert len(per_user) == len({e.user_id for e in events})
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in per_user.values())
    # the Kafka timestamp is the production time
    assert all(before_ms <= r.timestamp <= after_ms for r in records)


@pytest.mark.kafka
def test_malformed_records_are_the_generators_and_all_rejected(fresh):
    events = make_events(1000, users=50, seed=2)
    stats = replay_sync(fresh, events, bad_fraction=0.2, seed=3)
    records = asyncio.run(read_topic(fresh, fresh.topic_clickstream))
    rejected = [r for r in records if isinstance(validate(r.value, r.key), str)]
    assert len(rejected) == stats.bad > 100
    expected = [(key, value) for key, value, _, is_bad in _mixed(events, 0.2, 3) if is_bad]
    assert sorted((r.key or b"", r.value) for r in rejected) == sorted((k or b"", v) for k, v in expected)


@pytest.mark.kafka
def test_pre_encoded_records_bytes_and_events_can_be_mixed(fresh):
    events = make_events(30, users=5, seed=4)
    items = [
        *events[:10],
        *((e.user_id.encode(), e.to_json()) for e in events[10:20]),
        *(e.to_json() for e in events[20:]),
    ]
    stats = replay_sync(fresh, items)
    records = asyncio.run(read_topic(fresh, fresh.topic_clickstream))
    assert stats.sent == 30 and stats.bad == 0
    assert sorted(validate(r.value, r.key).event_id for r in records) == sorted(e.event_id for e in events)


@pytest.mark.kafka
def test_rate_mode_paces_and_reports_a_consistent_rate(fresh, tmp_path):
    n, rate = 400, 2000.0
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(e.to_json() for e in make_events(n, users=20, seed=5)) + b"\n")
    out = tmp_path / "stats.json"
    assert cli_main_with(fresh, ["replay", str(path), "--rate", str(rate), "--json", str(out)]) == 0
    stats = orjson.loads(out.read_bytes())
    assert stats["sent"] == n and stats["bad"] == 0
    assert stats["rate"] == pytest.approx(stats["sent"] / stats["seconds"])
    # Record i is not produced before i / rate seconds: the achieved rate can only fall short of the target, up to
    # the clocks' granularity at its two ends (one CI run measured 0.4% over the exact bound); unpaced it is >10x.
    assert stats["rate"] <= rate * n / (n - 1) * 1.02
    assert len(asyncio.run(read_topic(fresh, fresh.topic_clickstream))) == n


@pytest.mark.kafka
def test_paced_records_are_stamped_when_they_came_due_even_when_the_source_is_late(fresh):
    """A load test's latency counts from a record's Kafka timestamp: paced, that is the time the record came due
    (the replay's start, plus i / rate), so a source that falls behind is not left out of it (no coordinated
    omission)."""
    n, rate, late_at = 200, 1000.0, 100
    events = make_events(n, users=20, seed=7)

    def source():
        for i, event in enumerate(events):
            if i == late_at:
                time.sleep(0.2)  # the source stalls: records from here on go out 200 ms behind their time
            yield event

    before_ms = time.time() * 1000
    replay_sync(fresh, source(), rate=rate)
    after_ms = time.time() * 1000
    index = {e.event_id: i for i, e in enumerate(events)}
    stamp = {
        index[validate(r.value, r.key).event_id]: r.timestamp
        for r in asyncio.run(read_topic(fresh, fresh.topic_clickstream))
    }
    assert len(stamp) == n
    assert all(abs(stamp[i] - stamp[0] - i * 1000 / rate) <= 1 for i in range(n))
    assert before_ms - 1 <= stamp[0] and stamp[n - 1] <= after_ms  # anchored at the replay's start, not made up


@pytest.mark.kafka
def test_speedup_mode_follows_event_time(fresh):
    events = make_events(40, users=4, seed=6, gap_ms=500)  # 19.5 s of event time
    stats = replay_sync(fresh, events, speedup=100.0)  # -> 0.195 s at least
    assert stats.sent == 40
    assert stats.seconds >= (events[-1].ts - events[0].ts) / 1000 / 100


@pytest.mark.kafka
def test_cli_on_json_lines_with_bad_fraction_and_json_output(fresh, tmp_path):
    events = make_events(1500, users=100, seed=8)
    path = tmp_path / "sim.jsonl.gz"
    lines = [orjson.dumps({**orjson.loads(e.to_json()), "truth": {"will_buy": True}}) for e in events]
    lines.insert(10, b'{"event_id": "broken"')  # an invalid line: reported and skipped, not sent
    lines.insert(20, b"")
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    out = tmp_path / "out" / "stats.json"
    code = cli_main_with(fresh, ["replay", str(path), "--bad-fraction", "0.1", "--seed", "9", "--json", str(out)])
    assert code == 0
    stats = orjson.loads(out.read_bytes())
    assert set(stats) >= {"sent", "bad", "seconds", "rate"}
    assert stats["sent"] == 1500 + stats["bad"] and stats["bad"] > 0 and stats["skipped"] == 1
    records = asyncio.run(read_topic(fresh, fresh.topic_clickstream))
    assert len(records) == stats["sent"]
    good = [r for r in records if isinstance(validate(r.value, r.key), Event)]
    assert len(good) == 1500
    assert all(b"truth" not in r.value for r in good)  # fields outside the contract stay out of the topic


@pytest.mark.kafka
def test_cli_limit(fresh, tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"\n".join(e.to_json() for e in make_events(100, users=10)) + b"\n")
    out = tmp_path / "s.json"
    assert cli_main_with(fresh, ["replay", str(path), "--limit", "25", "--json", str(out)]) == 0
    assert orjson.loads(out.read_bytes())["sent"] == 25


@pytest.mark.kafka
def test_cli_on_the_real_rees46_excerpt(fresh, shared_data, tmp_path, capsys):
    out = tmp_path / "rees46.json"
    assert (
        cli_main_with(fresh, ["replay", str(shared_data / "rees46-2019-10-01-part1.csv.gz"), "--json", str(out)]) == 0
    )
    assert "3,517 records" in capsys.readouterr().out
    stats = orjson.loads(out.read_bytes())
    assert stats["sent"] == 3517 and stats["bad"] == 0 and stats["skipped"] == 0
    records = asyncio.run(read_topic(fresh, fresh.topic_clickstream))
    events = [validate(r.value, r.key) for r in records]
    assert all(isinstance(e, Event) for e in events)
    assert len({e.event_id for e in events}) == 3517
    assert sum(e.type == "purchase" for e in events) == 38


def test_cli_missing_file_is_one_line(tmp_path, capsys):
    assert cli_main_with(None, ["replay", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl: no such file" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(tmp_path):
    for args in (["--rate", "0"], ["--rate", "-5"], ["--bad-fraction", "1"], ["--rate", "10", "--speedup", "2"]):
        with pytest.raises(SystemExit) as exc:
            cli_main(["replay", str(tmp_path / "x.jsonl"), *args])
        assert exc.value.code == 2


def cli_main_with(settings: Settings | None, argv: list[str]) -> int:
    """Run the CLI with the topics of ``settings`` (the CLI reads its settings from the environment)."""
    env = {}
    if settings is not None:
        for name in ("topic_clickstream", "topic_dlq", "topic_intent", "topic_churn", "kafka_bootstrap"):
            env[f"INTENTSTREAM_{name.upper()}"] = str(getattr(settings, name))
    with pytest.MonkeyPatch.context() as mp:
        for var, value in env.items():
            mp.setenv(var, value)
        return cli_main(argv)


# ---- without a broker ------------------------------------------------------------------------------------


def test_partition_is_kafkas_murmur2():
    # org.apache.kafka.common.utils.UtilsTest.testMurmur2: the Java client's hashes (signed 32-bit)
    java = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for key, hashed in java.items():
        assert murmur2(key) == hashed & 0xFFFFFFFF
        for n in (1, 3, 4, 12):
            assert kafka_partition(key, n) == (hashed & 0x7FFFFFFF) % n
    rng = random.Random(0)
    for _ in range(1000):
        key = f"user-{rng.randrange(10**9)}".encode()
        assert kafka_partition(key, 4) == DefaultPartitioner()(key, [0, 1, 2, 3], [0, 1, 2, 3])


def test_bad_fraction_mixes_at_that_fraction_deterministically():
    events = make_events(20_000, users=100, seed=10)
    mixed = list(_mixed(events, 0.1, 42))
    bad = sum(is_bad for *_, is_bad in mixed)
    assert bad / len(mixed) == pytest.approx(0.1, abs=0.01)
    assert [e for e in mixed if not e[3]] == [(*_as_record(e), False) for e in events]  # good ones in order
    assert mixed == list(_mixed(events, 0.1, 42))
    assert mixed != list(_mixed(events, 0.1, 43))
    assert list(_mixed(events[:10], 0.0, 42)) == [(*_as_record(e), False) for e in events[:10]]


def test_as_record_accepts_events_tuples_and_bytes():
    event = make_events(1, users=1)[0]
    assert _as_record(event) == (event.user_id.encode(), event.to_json(), event.ts)
    assert _as_record((b"k", b"v")) == (b"k", b"v", None)
    assert _as_record((b"k", b"v", 123)) == (b"k", b"v", 123)
    assert _as_record(event.to_json()) == (event.user_id.encode(), event.to_json(), event.ts)
    assert _as_record(b"not json") == (None, b"not json", None)
    bad = badrecords.make("key_mismatch", random.Random(0))
    assert _as_record(bad)[:2] == (bad.key, bad.value)
    with pytest.raises(TypeError):
        _as_record(42)  # type: ignore[arg-type]


def test_replay_refuses_contradictory_or_out_of_range_options():
    settings = Settings.from_env()
    for kwargs in ({"rate": 10, "speedup": 2}, {"rate": 0}, {"speedup": -1}, {"bad_fraction": 1.0}):
        with pytest.raises(ValueError):
            asyncio.run(replay(settings, [], **kwargs))


def test_file_formats_are_detected_from_the_extension():
    assert [detect_format(p) for p in ("a.csv", "a.csv.gz", "a.jsonl", "a.jsonl.gz", "a.json", "x")] == [
        "rees46",
        "rees46",
        "jsonl",
        "jsonl",
        "jsonl",
        "jsonl",
    ]


def test_json_lines_are_validated_and_invalid_lines_reported(tmp_path):
    events = make_events(5, users=2)
    lines = [e.to_json() for e in events]
    lines[2:2] = [b"", b"not json", b'{"event_id": "x", "user_id": "u", "type": "view", "ts": 1569888000000}']
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rejected: list[tuple[int, str]] = []
    assert list(iter_file_events(path, None, rejected)) == events
    assert [line for line, _ in rejected] == [4, 5]
    assert rejected[1][1] == "type: unknown event type 'view'"


def test_format_can_be_forced(tmp_path):
    path = tmp_path / "rees46.txt"
    path.write_text(
        "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
        "2019-10-01 00:00:00 UTC,purchase,1,2,,,9.50,77,s1\n"
    )
    rejected: list[tuple[int, str]] = []
    (event,) = iter_file_events(path, "rees46", rejected)
    assert (event.type, event.user_id, event.price, rejected) == ("purchase", "77", 9.5, [])
