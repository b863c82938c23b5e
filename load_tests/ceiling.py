"""The ceiling of the load test: raw aiokafka consume -> orjson decode -> produce passthrough.

    python -m load_tests.ceiling     (settings from INTENTSTREAM_*; one process of the consumer group APP_ID)

No state, no model, no Faust: what one Python process can move through Kafka on this machine, the upper
bound for any stream processor written in Python. It reads ``topic_clickstream`` as consumer group
``app_id`` from the earliest offset and writes every record unchanged (after decoding it, as every real
processor must) to the same partition of ``topic_intent``. Output records go out as whole batches
(``send_batch``, like stream/traffic/replay.py): the fastest path aiokafka offers, so the ceiling is a real
ceiling. Offsets are committed once the outputs of what was consumed are acknowledged (at least once,
like the engine). SIGTERM stops it cleanly.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from typing import Any

import orjson

from stream.settings import Settings
from stream.topics import kafka_client_kwargs

COMMIT_INTERVAL_S = 1.0  # like the engine's broker_commit_interval
MAX_RECORDS = 4_096  # per getmany: large enough that per-call costs vanish (the engine's backlog batch)


async def passthrough(settings: Settings, stop: asyncio.Event) -> int:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(
        settings.topic_clickstream,
        **kafka_client_kwargs(settings),
        group_id=settings.app_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    producer = AIOKafkaProducer(
        **kafka_client_kwargs(settings),
        acks="all",  # Faust's default (the engine's producer): same durability for both
        linger_ms=5,
        max_batch_size=settings.producer_max_batch_bytes,  # the engine's record batches (1 MB by default)
    )
    await producer.start()
    await consumer.start()
    loads = orjson.loads
    out_topic = settings.topic_intent
    pending: list[asyncio.Future[Any]] = []
    moved = 0
    last_commit = time.monotonic()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=MAX_RECORDS)
            for tp, messages in batches.items():
                builder = producer.create_batch()
                for m in messages:
                    loads(m.value)
                    if builder.append(key=m.key, value=m.value, timestamp=None) is None:
                        pending.append(await producer.send_batch(builder, out_topic, partition=tp.partition))
                        builder = producer.create_batch()
                        builder.append(key=m.key, value=m.value, timestamp=None)
                if builder.record_count():
                    pending.append(await producer.send_batch(builder, out_topic, partition=tp.partition))
                moved += len(messages)
            if pending and time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                await asyncio.gather(*pending)  # outputs acknowledged before their inputs are committed
                pending.clear()
                await consumer.commit()
                last_commit = time.monotonic()
        if pending:
            await asyncio.gather(*pending)
            await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()
    return moved


def main() -> int:
    settings = Settings.from_env()

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await passthrough(settings, stop)

    moved = asyncio.run(run())
    print(f"ceiling: moved {moved} records", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
