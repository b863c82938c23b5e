"""The scoring worker end to end, on the real local broker with real worker processes and RocksDB state."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from models.features import FeaturizerConfig
from models.items import save_items
from stream.app import GC_YOUNG_THRESHOLD
from stream.contract import validate
from stream.settings import Settings
from stream.state.user import UserState
from tests.helpers import (
    BASE_TS,
    Worker,
    consume,
    encode,
    item_model,
    make_events,
    produce,
    read_to_end,
    wait_assigned,
    wait_for,
    write_model,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

BAD_RECORDS: list[tuple[bytes | None, bytes]] = [
    (b"user-1", b"{not json"),
    (b"user-1", b"[1, 2]"),
    (b"user-2", orjson.dumps({"event_id": "x1", "user_id": "user-2", "type": "teleport", "ts": 1_767_600_000_000})),
    (b"user-2", orjson.dumps({"event_id": "x2", "user_id": "user-2", "type": "search", "ts": "yesterday"})),
    (b"user-3", orjson.dumps({"user_id": "user-3", "type": "search", "ts": 1_767_600_000_000})),
    (b"someone-else", orjson.dumps({"event_id": "x3", "user_id": "user-3", "type": "search", "ts": 1_767_600_000_000})),
    (b"\xff\xfe", orjson.dumps({"event_id": "x4", "user_id": "user-3", "type": "search", "ts": 1_767_600_000_000})),
    (b"user-4", b"x" * 70_000),
    (
        b"user-4",
        orjson.dumps({"event_id": "x5", "user_id": "user-4", "type": "purchase", "ts": 1_767_600_000_000, "price": -3}),
    ),
]


def expected_windows(events: list[dict], settings: Settings) -> dict[str, str]:
    """What each user's window must hold: the events through the same featurizer, offline."""
    config = FeaturizerConfig(window=settings.window_size)
    states: dict[str, UserState] = {}
    for e in events:
        ev = validate(orjson.dumps(e), check_key=False)
        assert not isinstance(ev, str)
        states.setdefault(ev.user_id, UserState()).accept(ev, config, int(settings.allowed_lateness_s * 1000))
    return {u: hashlib.sha256(st.records.tobytes()).hexdigest() for u, st in states.items()}


def worker_windows(worker: Worker, users: list[str]) -> dict[str, str]:
    return {u: worker.get(f"/users/{u}/score?window=1")["window"]["sha256"] for u in users}


def changelog_ends(settings: Settings) -> dict[int, int]:
    """partition -> end offset of the users table's changelog."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from stream.topics import kafka_client_kwargs

    async def ends() -> dict[int, int]:
        consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings))
        await consumer.start()
        try:
            tps = [TopicPartition(f"{settings.app_id}-users-changelog", p) for p in range(settings.partitions)]
            return {tp.partition: end for tp, end in (await consumer.end_offsets(tps)).items()}
        finally:
            await consumer.stop()

    return asyncio.run(ends())


def store_folders(datadir: Path) -> dict[int, Path]:
    """partition -> the RocksDB folder of its users table, under a worker's state folder."""
    return {int(path.stem.rpartition("-")[2]): path for path in sorted(datadir.rglob("users-*.db"))}


def wal_bytes(datadir: Path) -> dict[int, int]:
    """partition -> bytes in its store's write-ahead log files (readable while the worker runs)."""
    return {p: sum(f.stat().st_size for f in path.glob("*.log")) for p, path in store_folders(datadir).items()}


def persisted_offsets(datadir: Path) -> dict[int, int | None]:
    """partition -> the changelog offset its store says it holds, as on disk: opened read-only, a running worker's
    store shows what it has flushed (None where it could not be read, e.g. a file compacted away meanwhile)."""
    from rocksdict import AccessType, Options, Rdict

    from stream.app import OFFSET_KEY

    offsets: dict[int, int | None] = {}
    for partition, path in store_folders(datadir).items():
        try:
            db = Rdict(str(path), options=Options(raw_mode=True), access_type=AccessType.read_only())
        except Exception:
            offsets[partition] = None
            continue
        offset = db.get(OFFSET_KEY)
        db.close()
        offsets[partition] = None if offset is None else int(offset)
    return offsets


def test_intents_dlq_and_state_that_survives_restart_and_sigkill(fresh: Settings, tmp_path: Path):
    write_model(fresh.model_dir)
    events = make_events(n_users=30, seed=1)
    worker = Worker(fresh, tmp_path, emit_policy="every_event", state_flush_s=1).start()
    try:
        wait_assigned([worker], fresh.partitions)
        produce(fresh, encode(events) + BAD_RECORDS)
        got = consume(
            fresh,
            [fresh.topic_intent, fresh.topic_dlq],
            until=lambda g: len(g[fresh.topic_intent]) >= len(events) and len(g[fresh.topic_dlq]) >= len(BAD_RECORDS),
        )
        assert worker.alive(), worker.tail()
        intents = [orjson.loads(m.value) for m in got[fresh.topic_intent]]
        # every event scored exactly once, keyed by its user, with the contract's fields
        assert sorted(i["event_id"] for i in intents) == sorted(e["event_id"] for e in events)
        for m, i in zip(got[fresh.topic_intent], intents, strict=True):
            assert m.key == i["user_id"].encode()
            assert 0.0 <= i["score"] <= 1.0 and i["band"] in ("low", "medium", "high")
            assert i["model"] == {"name": "untrained-gru", "version": "v0001"}
            assert i["schema"] == 1 and i["latency_ms"] >= 0 and isinstance(i["reasons"], list) and i["reasons"]
        # every bad record in the DLQ with its reason, original bytes and source
        dlq = [orjson.loads(m.value) for m in got[fresh.topic_dlq]]
        assert len(dlq) == len(BAD_RECORDS)
        reasons = sorted(d["reason"] for d in dlq)
        assert any(r.startswith("json:") for r in reasons)
        assert "type: unknown event type 'teleport'" in reasons
        assert "key: does not match user_id" in reasons and "key: not valid UTF-8" in reasons
        assert "record: 70000 bytes exceeds the 65536-byte limit" in reasons
        assert all(d["source"]["topic"] == fresh.topic_clickstream for d in dlq)
        # once running, the startup objects are frozen and the youngest generation collected less often: logged after
        # the first batch is handed over and a full collection, which may end after its outputs have been read here
        frozen = f"young_threshold={GC_YOUNG_THRESHOLD}"
        wait_for(lambda: frozen in worker.log_path.read_text(errors="replace"), 60, "the startup objects frozen")

        users = sorted({e["user_id"] for e in events})
        expected = expected_windows(events, fresh)
        assert worker_windows(worker, users) == expected

        # The stores write no write-ahead log (the changelog is their durable copy) ...
        datadir = fresh.state_dir / f"worker-{worker.port}"
        wal = wal_bytes(datadir)
        assert len(wal) == fresh.partitions and not any(wal.values()), wal
        worker.stop(signal.SIGTERM)  # clean stop, then a restart on the same state folder (the same port)
        # ... and a clean stop flushed them before Faust let go of them: each holds its partition's changelog to the
        # end, so a restart on this folder reads nothing back
        assert f"event=stores_flushed reason=stop partitions={fresh.partitions}" in worker.log_path.read_text()
        first_wave = {p: end - 1 for p, end in changelog_ends(fresh).items()}
        assert persisted_offsets(datadir) == first_wave
        worker = Worker(fresh, tmp_path, worker.port, emit_policy="every_event", state_flush_s=1).start()
        wait_assigned([worker], fresh.partitions)
        assert worker_windows(worker, users) == expected

        more = make_events(n_users=30, seed=2, start_ts=BASE_TS + 40 * 86_400_000)  # later events, then SIGKILL
        produce(fresh, encode(more))
        wait_for(lambda: worker.get("/users/user-0/score").get("events", 0) >= 36, 60, "the second wave scored")

        # a running worker flushes its stores every state_flush_s: what it wrote is on disk before any stop (the
        # second wave's changelog records go out at a commit after they are scored: wait for the ends to move)
        def flushed_to_the_end() -> bool:
            ends = {p: end - 1 for p, end in changelog_ends(fresh).items()}
            return ends != first_wave and persisted_offsets(datadir) == ends

        wait_for(flushed_to_the_end, 60, "the stores flushed while running")
        worker.stop(signal.SIGKILL)
        worker = Worker(fresh, tmp_path, worker.port, emit_policy="every_event").start()  # on its own stores
        wait_assigned([worker], fresh.partitions)
        expected = expected_windows(events + more, fresh)
        wait_for(lambda: worker_windows(worker, users) == expected, 60, "windows equal to a run without a crash")
    finally:
        worker.stop()


def test_two_workers_share_partitions_and_each_answers_for_any_user(fresh: Settings, tmp_path: Path):
    write_model(fresh.model_dir)
    events = make_events(n_users=20, sessions=1, seed=3)
    a = Worker(fresh, tmp_path).start()
    b = Worker(fresh, tmp_path).start()
    try:
        wait_assigned([a, b], fresh.partitions, timeout=120)
        assert set(a.partitions()).isdisjoint(b.partitions())
        produce(fresh, encode(events))
        users = sorted({e["user_id"] for e in events})
        wait_for(lambda: all(a.get(f"/users/{u}/score").get("events") == 6 for u in users), 60, "all scored")
        for u in users:
            from_a, from_b = a.get(f"/users/{u}/score"), b.get(f"/users/{u}/score")
            assert from_a == from_b  # the non-owner forwards the request to the owner (table routing)
    finally:
        a.stop()
        b.stop()


def test_workers_bound_to_every_interface_route_by_their_advertised_urls(fresh: Settings, tmp_path: Path):
    """Bound to 0.0.0.0 (as in a container), each worker advertises its own INTENTSTREAM_WEB_URL to the group, and a
    request to the worker that does not own a user is forwarded there. (Faust used to advertise the bind address,
    http://0.0.0.0:6066 for every container of docker-compose: each believed it owned every user and answered 404.)"""
    write_model(fresh.model_dir)
    events = make_events(n_users=20, sessions=1, seed=4)
    a = Worker(fresh, tmp_path, web_host="0.0.0.0")
    b = Worker(fresh, tmp_path, web_host="0.0.0.0")
    urls = {a: f"http://127.0.0.1:{a.port}", b: f"http://localhost:{b.port}"}  # two names of this machine
    for w in (a, b):
        w.env["INTENTSTREAM_WEB_URL"] = urls[w]
        w.start()
    try:
        wait_assigned([a, b], fresh.partitions, timeout=120)
        produce(fresh, encode(events))
        users = sorted({e["user_id"] for e in events})
        wait_for(lambda: all(a.get(f"/users/{u}/score").get("events") == 6 for u in users), 60, "all scored")
        owners = set()
        for u in users:
            from_a, from_b = a.get(f"/users/{u}/score"), b.get(f"/users/{u}/score")
            assert from_a == from_b and from_a["served_by"] in urls.values()  # answered by the owner, either way
            owners.add(from_a["served_by"])
        assert owners == set(urls.values())  # both own some of the users
    finally:
        a.stop()
        b.stop()


def test_churn_alerts_are_the_same_at_two_replay_speeds(kafka: Settings, tmp_path: Path):
    import uuid

    events = make_events(n_users=25, sessions=4, seed=4)
    runs = []
    for speed in ("max", "slow"):
        tag = uuid.uuid4().hex[:8]
        s = Settings.from_env(
            topic_clickstream=f"cs-{tag}",
            topic_dlq=f"dlq-{tag}",
            topic_intent=f"pi-{tag}",
            topic_churn=f"ca-{tag}",
            app_id=f"churn-{tag}",
            state_dir=str(tmp_path / tag),
            model_dir=str(tmp_path / tag / "models"),
        )
        write_model(s.model_dir, churn_alert=0.0)
        runs.append((speed, s, Worker(s, tmp_path, churn_cooldown_s=0, batch_max_events=512).start()))
    try:
        for _, _, w in runs:  # two separate consumer groups: each owns every partition
            wait_assigned([w], kafka.partitions)
        threads = [
            threading.Thread(target=produce, args=(s, encode(events), None if speed == "max" else 250.0))
            for speed, s, _ in runs
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alerts = []
        for _, s, w in runs:
            wait_for(lambda w=w: w.get("/users/user-0/score").get("events") == 24, 90, "all events scored")
            time.sleep(3)  # the last batch's alerts are flushed with its commit
            got = read_to_end(s, [s.topic_churn])
            alerts.append(sorted((m.key, orjson.loads(m.value)["last_seen"]) for m in got[s.topic_churn]))
        fast, slow = alerts
        assert fast, "sessions closed by the watermark must raise alerts at threshold 0"
        assert fast == slow
        assert len(fast) == len(set(fast))  # one alert per closed session
    finally:
        for _, _, w in runs:
            w.stop()


def traffic_across_a_swap(
    settings: Settings, worker: Worker, events: list[dict], publish: Callable[[], object], swapped: Callable[[], bool]
) -> list[dict]:
    """Traffic flows while ``publish`` puts a new artifact out; the second half is sent only once ``swapped()``,
    so both versions must serve some events whatever the machine's speed. Returns the intent events, one per input
    event (every_event), checked to be neither lost nor repeated."""
    half = len(events) // 2
    done = threading.Event()

    def traffic() -> None:
        produce(settings, encode(events[:half]), 120.0)
        done.wait(120)
        produce(settings, encode(events[half:]), 120.0)

    producer = threading.Thread(target=traffic)
    producer.start()
    time.sleep(1.0)
    publish()
    wait_for(swapped, 60, "the worker to swap")
    done.set()
    producer.join()
    got = consume(settings, [settings.topic_intent], until=lambda g: len(g[settings.topic_intent]) >= len(events))
    intents = [orjson.loads(m.value) for m in got[settings.topic_intent]]
    assert sorted(i["event_id"] for i in intents) == sorted(e["event_id"] for e in events)
    assert worker.alive()
    return intents


def assert_versions_only_move_forward(intents: list[dict], version_of: Callable[[dict], str]) -> None:
    """Both versions served, and once a user is served by the new one, never again by the old."""
    by_user: dict[str, list[str]] = {}
    for i in sorted(intents, key=lambda i: i["event_ts"]):
        by_user.setdefault(i["user_id"], []).append(version_of(i))
    assert {v for seq in by_user.values() for v in seq} == {"v0001", "v0002"}
    for seq in by_user.values():
        assert seq == sorted(seq)


def test_model_swap_during_traffic_loses_and_repeats_nothing(fresh: Settings, tmp_path: Path):
    write_model(fresh.model_dir, seed=0)
    events = make_events(n_users=30, seed=5)
    worker = Worker(fresh, tmp_path, emit_policy="every_event").start()
    try:
        wait_assigned([worker], fresh.partitions)
        intents = traffic_across_a_swap(
            fresh,
            worker,
            events,
            lambda: write_model(fresh.model_dir, "transformer", seed=1),  # v0002, another architecture
            lambda: worker.get("/health")["model"]["version"] == "v0002",
        )
        assert {i["model"]["name"] for i in intents} == {"untrained-gru", "untrained-transformer"}
        assert_versions_only_move_forward(intents, lambda i: i["model"]["version"])

        bad = write_model(fresh.model_dir, seed=2)  # v0003 with corrupted weights: refused, v0002 keeps serving
        weights = bad / "weights.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
        wait_for(lambda: "model_refused" in worker.log_path.read_text(errors="replace"), 30, "the refusal log line")
        assert worker.get("/health")["model"]["version"] == "v0002"
        assert worker.alive()
    finally:
        worker.stop()


def test_item_model_swap_during_traffic_loses_and_repeats_nothing(fresh: Settings, tmp_path: Path):
    """Every intent event carries suggestions, from v0001 of the item model and then from v0002, which names other
    items: each event's suggestions tell which version made them."""
    write_model(fresh.model_dir, seed=0)
    names = [f"item-{i}" for i in range(20)]  # make_events' items
    first = item_model({x: [(names[(i + 1) % 20], 0.5)] for i, x in enumerate(names)}, popular=names)
    save_items(first, fresh.items_dir, {})
    # v0002: each item's only neighbour is a new one, and items do not count for themselves (serving config), so
    # its suggestions are all new-* items
    second = item_model(
        {**{x: [(f"new-{i}", 0.9)] for i, x in enumerate(names)}, **{f"new-{i}": [] for i in range(20)}},
        popular=[f"new-{i}" for i in range(20)],
    )
    second.manifest["serving"]["self_weight"] = 0.0
    events = make_events(n_users=30, seed=6)
    worker = Worker(fresh, tmp_path, emit_policy="every_event", suggestions_k=3).start()

    def logged(what: str) -> bool:
        return what in worker.log_path.read_text(errors="replace")

    def version_of(intent: dict) -> str:
        made = {s["item_id"].split("-")[0] for s in intent["suggestions"]}
        assert made in ({"item"}, {"new"}) and len(intent["suggestions"]) == 3, intent
        return "v0001" if made == {"item"} else "v0002"

    try:
        wait_assigned([worker], fresh.partitions)
        assert logged("event=items_loaded version=v0001")
        intents = traffic_across_a_swap(
            fresh,
            worker,
            events,
            lambda: save_items(second, fresh.items_dir, {"serving": second.manifest["serving"]}),
            lambda: logged("event=items_swapped version=v0002"),
        )
        assert worker.get("/health")["items"]["version"] == "v0002"  # and /metrics: tests/test_suggestions.py
        reasons = {s["reason"].rsplit(" ", 1)[0] for i in intents for s in i["suggestions"]}
        assert reasons <= {"seen", "viewed together with", "popular"} and "viewed together with" in reasons
        assert_versions_only_move_forward(intents, version_of)

        # v0003 names neighbours it does not hold: refused, v0002 keeps serving (broken before it is published, so
        # no poll can catch it whole)
        save_items(dataclasses.replace(first, neighbours=first.neighbours + 1000), fresh.items_dir, {})
        wait_for(lambda: logged("event=items_refused"), 30, "the refusal log line")
        more = make_events(n_users=3, seed=7, start_ts=BASE_TS + 30 * 86_400_000)
        produce(fresh, encode(more))
        got = consume(
            fresh, [fresh.topic_intent], until=lambda g: len(g[fresh.topic_intent]) >= len(events) + len(more)
        )
        ids = {e["event_id"] for e in more}
        later = [i for i in map(orjson.loads, (m.value for m in got[fresh.topic_intent])) if i["event_id"] in ids]
        assert {version_of(i) for i in later} == {"v0002"} and worker.alive()
    finally:
        worker.stop()


def metrics_of(worker: Worker) -> dict[str, float]:
    """The worker's /metrics as {series with labels: value}."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_every_documented_metric_has_a_value_that_moves_with_traffic(fresh: Settings, tmp_path: Path):
    write_model(fresh.model_dir)
    worker = Worker(fresh, tmp_path, emit_policy="every_event").start()
    try:
        wait_assigned([worker], fresh.partitions)
        before = metrics_of(worker)
        # the model being served is reported from the start, not only after a hot swap
        assert before['intentstream_model_info{name="untrained-gru",version="v0001"}'] == 1.0
        events = make_events(n_users=20, seed=3)
        produce(fresh, encode(events) + BAD_RECORDS[:3])
        consume(fresh, [fresh.topic_intent], until=lambda g: len(g[fresh.topic_intent]) >= len(events))

        def moved() -> bool:
            after = metrics_of(worker)
            lag = [v for k, v in after.items() if k.startswith("intentstream_consumer_lag{")]
            return (
                after.get("intentstream_events_in_total", 0) >= len(events) + 3
                and len(lag) == fresh.partitions  # one gauge per owned input partition, set by the lag timer
                and all(v == 0 for v in lag)  # and it saw the partitions drained
                and after.get("intentstream_latency_seconds_count", 0) >= len(events)
            )

        wait_for(moved, 30, "the metrics to take the traffic in")
        after = metrics_of(worker)
        assert after["intentstream_events_in_total"] - before.get("intentstream_events_in_total", 0) == len(events) + 3
        assert after["intentstream_events_scored_total"] == len(events)
        assert after["intentstream_intents_emitted_total"] == len(events)
        assert sum(v for k, v in after.items() if k.startswith("intentstream_dlq_total{")) == 3
        assert after["intentstream_batch_size_count"] > 0 and after["intentstream_batch_size_sum"] == len(events) + 3
        assert after["intentstream_model_seconds_count"] > 0 and after["intentstream_model_seconds_sum"] > 0
        assert after["intentstream_latency_seconds_count"] == len(events)
        assert after['intentstream_latency_seconds_bucket{le="+Inf"}'] == len(events)
        assert "intentstream_duplicates_total" in after and "intentstream_churn_alerts_total" in after
    finally:
        worker.stop()


def test_compressed_clickstream_in_and_compressed_outputs_out(fresh: Settings, tmp_path: Path):
    """Producers of clickstream often compress (a Java producer's lz4 or zstd): the worker reads every codec Kafka
    has, and what it writes with INTENTSTREAM_PRODUCER_COMPRESSION=zstd is read back whole (that the setting reaches
    its producers: tests/test_delivery.py)."""
    write_model(fresh.model_dir)
    codecs = ["gzip", "snappy", "lz4", "zstd"]
    events = make_events(n_users=16, sessions=1, seed=7)
    worker = Worker(fresh, tmp_path, emit_policy="every_event", producer_compression="zstd").start()
    try:
        wait_assigned([worker], fresh.partitions)
        users = sorted({e["user_id"] for e in events})
        for i, codec in enumerate(codecs):  # a quarter of the users each, every user's events in order
            mine = set(users[i::4])
            produce(fresh, encode([e for e in events if e["user_id"] in mine]), compression=codec)
        got = consume(fresh, [fresh.topic_intent], until=lambda g: len(g[fresh.topic_intent]) >= len(events))
        assert worker.alive(), worker.tail()
        assert sorted(orjson.loads(m.value)["event_id"] for m in got[fresh.topic_intent]) == sorted(
            e["event_id"] for e in events
        )
    finally:
        worker.stop()
