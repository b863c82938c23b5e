"""stream/topics.py on the real broker: the output topics time their records by the broker's clock.

End-to-end latency is an output record's timestamp minus its input record's (``input_ts``). With the default
CreateTime, the output's timestamp was set by the worker when it built the record, so the latency stopped there,
before the producer's queue and the broker (issue 14, item 5). The output topics are now created with
LogAppendTime: their records carry the time the broker appended them. Input topics keep CreateTime.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream.settings import Settings
from stream.topics import TopicLayoutError, admin_client, changelog_topic, ensure_topics_async, kafka_client_kwargs

pytestmark = pytest.mark.kafka

LOG_APPEND_TIME = 1  # aiokafka ConsumerRecord.timestamp_type: 0 CreateTime, 1 LogAppendTime
AN_HOUR_AGO_MS = int(time.time() * 1000) - 3_600_000


async def first_record(settings: Settings, topic: str) -> tuple[int, int]:
    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings), auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        for _ in range(30):  # the first fetches may come back empty while metadata settles
            got = (await consumer.getmany(tp, timeout_ms=1_000)).get(tp)
            if got:
                return got[0].timestamp, got[0].timestamp_type
        raise AssertionError(f"no record in {topic} within 30 s")
    finally:
        await consumer.stop()


def test_output_records_are_timed_by_the_broker_and_inputs_by_their_producer(fresh: Settings):
    async def run() -> dict[str, tuple[int, int]]:
        await ensure_topics_async(fresh)
        producer = AIOKafkaProducer(**kafka_client_kwargs(fresh))
        await producer.start()
        try:
            for topic in (fresh.topic_clickstream, *fresh.output_topics):
                await producer.send_and_wait(topic, b"{}", key=b"u", partition=0, timestamp_ms=AN_HOUR_AGO_MS)
        finally:
            await producer.stop()
        return {t: await first_record(fresh, t) for t in (fresh.topic_clickstream, *fresh.output_topics)}

    sent_after = int(time.time() * 1000)
    got = asyncio.run(run())
    assert got[fresh.topic_clickstream] == (AN_HOUR_AGO_MS, 0)  # the producer's time, kept
    for topic in fresh.output_topics:
        ts, kind = got[topic]
        assert kind == LOG_APPEND_TIME and ts >= sent_after - 5_000, topic  # the broker's time of the append


async def _describe(settings: Settings, name: str) -> tuple[list[dict], dict[str, str]]:
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    async with admin_client(settings) as admin:
        (topic,) = await admin.describe_topics([name])
        (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
        configs = {entry[0]: entry[1] for entry in response.resources[0][4]}
        return topic["partitions"], configs


def test_the_worker_creates_its_changelog_before_faust_subscribes_and_waits_for_its_leaders(fresh: Settings):
    """A worker whose consumer subscribed before the broker had the changelog (Faust creates it then) left it out of
    the assignment, and its first changelog send had the broker create it with its default partition count: the
    worker left at its first commit, or hung there. create_app now creates it first, compacted, with the input's
    partitions, and returns once each partition has a leader."""
    name = changelog_topic(fresh)
    created = asyncio.run(ensure_topics_async(fresh, changelog=True))
    assert name in created and fresh.topic_clickstream in created
    partitions, configs = asyncio.run(_describe(fresh, name))
    assert sorted(p["partition"] for p in partitions) == list(range(fresh.partitions))
    assert all(p["leader"] >= 0 for p in partitions)
    assert configs["cleanup.policy"] == "compact"
    assert asyncio.run(ensure_topics_async(fresh, changelog=True)) == []  # idempotent: nothing created again


def test_a_changelog_with_another_partition_count_than_the_input_is_refused(fresh: Settings):
    name = changelog_topic(fresh)
    asyncio.run(ensure_topics_async(fresh, {name: 1}))  # as the broker's auto-creation made it
    with pytest.raises(TopicLayoutError, match=f"{name} .* has 1 partitions, the input {fresh.partitions}"):
        asyncio.run(ensure_topics_async(fresh, changelog=True))


def test_a_topic_the_broker_refuses_to_create_stops_the_worker_instead_of_being_auto_created(fresh: Settings):
    """Three replicas on a one-broker cluster: the broker refuses the topics. Nothing may then ask for their
    metadata, or the broker would create them with its defaults (one partition, CreateTime)."""
    three = dataclasses.replace(fresh, replication_factor=3)
    with pytest.raises(TopicLayoutError, match="InvalidReplicationFactorError"):
        asyncio.run(ensure_topics_async(three, changelog=True))

    async def listed() -> set[str]:
        async with admin_client(fresh) as admin:
            return set(await admin.list_topics())

    assert not {fresh.topic_clickstream, changelog_topic(fresh)} & asyncio.run(listed())
