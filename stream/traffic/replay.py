"""Publish clickstream to Kafka: `intentstream replay FILE` and the ``replay()`` library function.

Records go to ``settings.topic_clickstream`` keyed by user_id (UTF-8). The partition of each key is
computed here with Kafka's murmur2 (the Java client's and Faust's default partitioner), so a user's
events land where every other client expects them and stay in order: one partition per user, records
appended to that partition's batch in input order, batches of a partition delivered one after the
other by an idempotent producer (acks=all). Whole batches go to aiokafka's ``send_batch`` because
``send()`` per message costs tens of microseconds of Python; every batch's delivery is awaited before
``replay`` returns, and a batch that fails raises ``ReplayError`` naming how many records were lost.

Pacing: ``rate`` (records/s, malformed ones included), ``speedup`` (sleep by the gaps of event time / X),
or neither (as fast as possible). Paced, what has come due goes out every ``PACING_TICK_S`` (a producer's
linger), and each record's Kafka timestamp is the time it came due, so the load tests' end-to-end latency
(measured from it) includes the wait in the producer; unpaced, it is the time the record was handed over.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from stream.contract import Event, validate
from stream.settings import Settings
from stream.topics import check_access, ensure_topics_async, kafka_client_kwargs

# 256 KiB per partition batch: big enough that per-batch costs vanish, and a produce request for 4
# partitions stays within the broker's default 1 MiB message.max.bytes per batch.
DEFAULT_BATCH_BYTES = 256 * 1024
# Partially filled batches wait at most this long (s) for more records when the source is slow.
DEFAULT_LINGER_S = 0.02
# Paced, the records that have come due are sent this often, as a producer with Kafka 4.0's default
# linger.ms (5 ms, KIP-1030) would. At 35,000 records/s a 1-ms tick made up to 4,000 record batches a second of
# about 9 records: the replay took 34% of a core and the broker 20%, against 17% and 12% at 5 ms, CPU that a load
# test's worker on the same machine did not get (`python -m load_tests.bench_replay --paced 35000`;
# docs/performance.md, fourteenth pass).
PACING_TICK_S = 0.005
_PARTITION_CACHE_MAX = 1_000_000

# What ``replay`` accepts per item: an Event; a pre-encoded record (key, value) or (key, value, event_ts_ms);
# or the value bytes of a contract event alone (its key is read from its user_id).
ReplayItem = Event | tuple[Any, ...] | bytes


class ReplayError(RuntimeError):
    """Records were not delivered (the message says how many), or a record cannot be sent at all."""


@dataclass
class ReplayStats:
    sent: int  # records acknowledged by the broker, malformed ones included
    bad: int  # malformed records mixed in (``bad_fraction``)
    seconds: float  # from the first record to the last acknowledgement
    rate: float  # sent / seconds
    skipped: int = 0  # input lines or rows that were not events (file replay; reported, not sent)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kafka_partition(key: bytes, num_partitions: int) -> int:
    """Partition of a key under Kafka's default partitioner (Java client, aiokafka, Faust): murmur2."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % num_partitions


def _as_record(item: ReplayItem) -> tuple[bytes | None, bytes | None, int | None]:
    """(key, value, event time in ms or None) of one input item."""
    if isinstance(item, tuple):  # (key, value[, ts]), a BadRecord too
        return item[0], item[1], item[2] if len(item) > 2 and type(item[2]) is int else None
    if type(item) is Event:
        return item.user_id.encode(), item.to_json(), item.ts
    if isinstance(item, bytes | bytearray | memoryview):
        value = bytes(item)
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError:
            obj = None
        if type(obj) is not dict:
            return None, value, None
        user_id, ts = obj.get("user_id"), obj.get("ts")
        return user_id.encode() if type(user_id) is str else None, value, ts if type(ts) is int else None
    raise TypeError(f"replay: cannot send a {type(item).__name__} (Event, bytes or (key, value[, ts]) expected)")


def _mixed(
    items: Iterable[ReplayItem], bad_fraction: float, seed: int
) -> Iterator[tuple[bytes | None, bytes | None, int | None, bool]]:
    """(key, value, event ts, is_bad): the input records with malformed ones mixed in.

    Before each input record, further malformed records follow one another with probability
    ``bad_fraction``: a geometric count with mean F/(1-F) per good record, i.e. a fraction F of all records."""
    if not bad_fraction:
        for item in items:
            key, value, ts = _as_record(item)
            yield key, value, ts, False
        return
    from stream.traffic.badrecords import iter_bad_records

    rng = random.Random(seed)
    bad_records = iter_bad_records(seed)
    for item in items:
        while rng.random() < bad_fraction:
            bad = next(bad_records)
            yield bad.key, bad.value, None, True
        key, value, ts = _as_record(item)
        yield key, value, ts, False


async def replay(
    settings: Settings,
    records: Iterable[ReplayItem],
    *,
    rate: float | None = None,
    speedup: float | None = None,
    bad_fraction: float = 0.0,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
    topic: str | None = None,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    linger_s: float = DEFAULT_LINGER_S,
    tick_s: float = PACING_TICK_S,
) -> ReplayStats:
    """Publish ``records`` to ``topic`` (default: the clickstream topic, created if missing) and wait until
    the broker has acknowledged every one. ``on_progress(n)``: called now and then with the number of
    records handed to the producer so far, and at the end with the number delivered. ``tick_s``: paced, how often
    what has come due is sent (default ``PACING_TICK_S``)."""
    if rate is not None and speedup is not None:
        raise ValueError("replay: give rate or speedup, not both")
    if rate is not None and not rate > 0:
        raise ValueError(f"replay: rate must be positive, got {rate}")
    if speedup is not None and not speedup > 0:
        raise ValueError(f"replay: speedup must be positive, got {speedup}")
    if not 0.0 <= bad_fraction < 1.0:
        raise ValueError(f"replay: bad_fraction must be in [0, 1), got {bad_fraction}")
    from aiokafka import AIOKafkaProducer

    topic = topic or settings.topic_clickstream
    # A topic created here may answer its first produce requests with NotLeaderForPartition for a few ms
    # (the broker is still taking leadership): the producer retries them, in order, with a logged warning.
    await ensure_topics_async(settings, {topic: settings.partitions})
    producer = AIOKafkaProducer(
        **kafka_client_kwargs(settings),
        acks="all",
        enable_idempotence=True,
        max_batch_size=batch_bytes,
        linger_ms=0,
    )
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        return await _produce(
            producer,
            topic,
            partitions,
            _mixed(records, bad_fraction, seed),
            rate,
            speedup,
            seed,
            on_progress,
            linger_s,
            tick_s,
        )
    finally:
        await producer.stop()


async def _produce(
    producer: Any,
    topic: str,
    partitions: list[int],
    records: Iterator[tuple[bytes | None, bytes | None, int | None, bool]],
    rate: float | None,
    speedup: float | None,
    seed: int,
    on_progress: Callable[[int], None] | None,
    linger_s: float,
    tick_s: float,
) -> ReplayStats:
    from aiokafka.partitioner import murmur2

    n_partitions = len(partitions)
    builders: list[Any] = [None] * n_partitions
    partition_of: dict[bytes, int] = {}
    keyless_rng = random.Random(seed ^ 0x5EED)  # records without a key (malformed ones) spread reproducibly
    in_flight: deque[tuple[asyncio.Future[Any], int]] = deque()
    delivered = queued = bad = 0
    open_since: float | None = None  # when a record first went into a batch since the last full flush
    first_ts: int | None = None
    target_s = 0.0
    perf_counter = time.perf_counter

    def settle_done() -> None:
        """Count delivered batches in order; a failed one stops the replay."""
        nonlocal delivered
        while in_flight and in_flight[0][0].done():
            future, count = in_flight.popleft()
            exc = future.exception()
            if exc is not None:
                raise ReplayError(f"replay: a batch of {count} records to {topic} was not delivered: {exc!r}")
            delivered += count

    async def submit(p: int) -> None:
        builder, builders[p] = builders[p], None
        count = builder.record_count()
        future = await producer.send_batch(builder, topic, partition=partitions[p])
        in_flight.append((future, count))
        settle_done()
        if on_progress is not None:
            on_progress(queued)
        await asyncio.sleep(0)  # let the sender task pick the batch up while we fill the next ones

    async def submit_all() -> None:
        nonlocal open_since
        for p in range(n_partitions):
            if builders[p] is not None and builders[p].record_count():
                await submit(p)
        open_since = None

    paced = rate is not None or speedup is not None
    if paced:  # behind its schedule (nothing to sleep for), a paced replay still sends at every tick
        linger_s = min(linger_s, tick_s)
    due_ms: int | None = None  # a paced record's Kafka timestamp: when it came due (None: when handed over)
    start = perf_counter()
    start_ms = time.time() * 1000.0
    for i, (key, value, ts, is_bad) in enumerate(records):
        if paced:
            if rate is not None:
                target_s = i / rate
            elif ts is not None:  # malformed records keep the previous record's time
                if first_ts is None:
                    first_ts = ts
                target_s = (ts - first_ts) / 1000.0 / speedup  # type: ignore[operator]
            now = perf_counter()
            if start + target_s > now:  # not due yet: what is due goes out; we wake when this one is due, a tick on
                wake = start + max(target_s, now - start + tick_s)
                await submit_all()  # may wait for the batches before (aiokafka): not added to the pause
                delay = wake - perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if rate is not None or first_ts is not None:  # a speedup replay's records before the first time: as sent
                due_ms = round(start_ms + target_s * 1000.0)
        if key is None:
            p = keyless_rng.randrange(n_partitions)
        else:
            p = partition_of.get(key)  # type: ignore[assignment]
            if p is None:
                if len(partition_of) >= _PARTITION_CACHE_MAX:
                    partition_of.clear()
                p = partition_of[key] = (murmur2(key) & 0x7FFFFFFF) % n_partitions
        builder = builders[p]
        if builder is None:
            builder = builders[p] = producer.create_batch()
        if open_since is None:
            open_since = perf_counter()
        if builder.append(key=key, value=value, timestamp=due_ms) is None:  # full: send it, start the next
            await submit(p)
            builder = builders[p] = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=due_ms) is None:
                raise ReplayError(f"replay: a record of {len(value or b'')} bytes does not fit in a batch")
        queued += 1
        bad += is_bad
        if perf_counter() - open_since > linger_s:  # a slow source must not hold records back
            await submit_all()
    await submit_all()
    if in_flight:
        await asyncio.wait([future for future, _ in in_flight])
    settle_done()
    seconds = perf_counter() - start
    if on_progress is not None:
        on_progress(delivered)
    if delivered != queued:  # cannot happen unless aiokafka resolves a batch without sending it
        raise ReplayError(f"replay: {queued - delivered} of {queued} records were not acknowledged")
    return ReplayStats(sent=delivered, bad=bad, seconds=seconds, rate=delivered / seconds if seconds > 0 else 0.0)


# ---- files ---------------------------------------------------------------------------------------------


def detect_format(path: Path | str) -> str:
    return "rees46" if str(path).endswith((".csv", ".csv.gz")) else "jsonl"


def iter_file_events(path: Path | str, fmt: str | None, rejected: list[tuple[int, str]]) -> Iterator[Event]:
    """Events of a JSON-lines (.gz ok) or REES46 CSV file in file order. Lines or rows that are not valid
    contract events go to ``rejected`` as (line or row, reason). JSON lines are re-encoded from the
    validated Event, so fields outside the contract (a simulator's ground truth) never reach the topic."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if (fmt or detect_format(path)) == "rees46":
        from stream.traffic import rees46

        yield from rees46.iter_events(path, rejected)
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as lines:
        for line_number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line:
                continue
            event = validate(line, check_key=False, max_bytes=1 << 20)
            if type(event) is Event:
                yield event
            else:
                rejected.append((line_number, event))  # type: ignore[arg-type]


# ---- command line --------------------------------------------------------------------------------------


def _positive(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text!r}")
    return value


def _count(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return value


def add_arguments(parser: Any) -> None:
    parser.add_argument("file", type=Path, help="JSON lines of contract events (.gz ok) or REES46 CSV (.csv, .csv.gz)")
    parser.add_argument(
        "--format", choices=("jsonl", "rees46"), help="input format (default: from the extension; .csv = rees46)"
    )
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=_positive, metavar="EPS", help="fixed rate, records per second")
    pace.add_argument("--speedup", type=_positive, metavar="X", help="follow event time, X times faster")
    pace.add_argument("--max", action="store_true", help="as fast as possible (the default)")
    parser.add_argument(
        "--bad-fraction", type=_fraction, default=0.0, metavar="F", help="mix in malformed records at this fraction"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the malformed records (default 0)")
    parser.add_argument("--limit", type=_count, metavar="N", help="send at most N events from the file")
    parser.add_argument("--json", type=Path, metavar="PATH", help='write {"sent","bad","seconds","rate"} here')


def run(args: Any, settings: Settings) -> int:
    from aiokafka.errors import KafkaConnectionError
    from tqdm import tqdm

    from stream.traffic.rees46 import Rees46Error

    if not args.file.is_file():
        raise FileNotFoundError(f"{args.file}: no such file")
    check_access(settings)
    rejected: list[tuple[int, str]] = []
    events: Iterable[Event] = iter_file_events(args.file, args.format, rejected)
    if args.limit is not None:
        events = itertools.islice(events, args.limit)
    # The bar counts records sent, malformed ones included: --limit is its total only without them.
    total = args.limit if not args.bad_fraction else None
    bar = tqdm(desc="replay", unit="rec", unit_scale=True, file=sys.stderr, mininterval=0.5, total=total)
    try:
        stats = asyncio.run(
            replay(
                settings,
                events,
                rate=args.rate,
                speedup=args.speedup,
                bad_fraction=args.bad_fraction,
                seed=args.seed,
                on_progress=lambda n: bar.update(n - bar.n),
            )
        )
    except KafkaConnectionError as exc:
        print(f"intentstream: cannot reach Kafka at {settings.kafka_bootstrap}: {exc}", file=sys.stderr)
        return 2
    except (Rees46Error, ReplayError) as exc:
        print(f"intentstream: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    stats.skipped = len(rejected)
    if rejected:
        first = "; ".join(f"{row}: {reason}" for row, reason in rejected[:3])
        print(f"replay: skipped {len(rejected)} invalid lines/rows of {args.file} ({first})", file=sys.stderr)
    print(
        f"replay: {stats.sent:,} records ({stats.bad:,} malformed) to {settings.topic_clickstream} "
        f"in {stats.seconds:.2f} s: {stats.rate:,.0f} records/s"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(stats.to_dict(), option=orjson.OPT_INDENT_2))
    return 0
