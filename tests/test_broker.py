"""The local broker: lifecycle on its own port and state folder, and a real produce/consume round trip."""

from __future__ import annotations

import asyncio
import os

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from load_tests.procs import free_port
from stream import broker
from stream.settings import Settings
from stream.topics import ensure_topics, kafka_client_kwargs


@pytest.mark.kafka
@pytest.mark.slow
def test_start_is_idempotent_status_reports_and_stop_stops(tmp_path):
    port, cport = free_port(), free_port()
    settings = Settings.from_env(
        kafka_bootstrap=f"127.0.0.1:{port}", kafka_controller_port=cport, state_dir=str(tmp_path)
    )
    assert not broker.status(settings).running
    try:
        first = broker.start(settings)
        assert first.running and first.pid
        again = broker.start(settings)  # a second start finds it running and returns at once
        assert again.running and again.pid == first.pid
        assert "running" in broker.status(settings).detail
        assert (tmp_path / "kafka" / "data" / "meta.properties").exists()  # storage formatted on first start
    finally:
        stopped = broker.stop(settings)
    assert not stopped.running and stopped.pid is None
    assert not broker.answers_metadata(settings.kafka_bootstrap, timeout_s=1)


def test_missing_java_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(broker.shutil, "which", lambda tool: None)
    settings = Settings.from_env(kafka_cache_dir=str(tmp_path / "empty-cache"))
    with pytest.raises(broker.BrokerError) as err:
        broker.ensure_artifacts(settings)
    assert str(err.value).startswith("`java` not found on PATH: install a Java 17+ runtime")
    assert "\n" not in str(err.value)


def test_cli_reports_a_missing_maven_in_one_line(tmp_path):
    import subprocess
    import sys

    env = {
        **os.environ,
        "PATH": str(tmp_path),  # neither java nor mvn
        "INTENTSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "INTENTSTREAM_KAFKA_CACHE_DIR": str(tmp_path / "cache"),
        "INTENTSTREAM_STATE_DIR": str(tmp_path / "state"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "stream.cli", "kafka", "start"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "not found on PATH" in proc.stderr


@pytest.mark.kafka
def test_produce_and_consume_on_the_real_broker(fresh: Settings):
    ensure_topics(fresh)
    records = [(f"user-{i % 7}".encode(), f'{{"n":{i}}}'.encode()) for i in range(500)]

    async def roundtrip() -> list[tuple[bytes, bytes]]:
        producer = AIOKafkaProducer(**kafka_client_kwargs(fresh), acks="all", enable_idempotence=True)
        await producer.start()
        try:
            for key, value in records:
                await producer.send(fresh.topic_clickstream, key=key, value=value)
            await producer.flush()
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            fresh.topic_clickstream,
            **kafka_client_kwargs(fresh),
            group_id=fresh.app_id,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        got: list[tuple[bytes, bytes]] = []
        try:
            async with asyncio.timeout(60):
                while len(got) < len(records):
                    batch = await consumer.getmany(timeout_ms=1000)
                    for msgs in batch.values():
                        got.extend((m.key, m.value) for m in msgs)
        finally:
            await consumer.stop()
        return got

    got = asyncio.run(roundtrip())
    assert sorted(got) == sorted(records)
    # Keyed records keep their order per key (same key -> same partition).
    for user in {k for k, _ in records}:
        assert [v for k, v in got if k == user] == [v for k, v in records if k == user]


def test_cluster_ids_never_look_like_an_option():
    # A leading '-' made the storage tool read the id as an option (one broker start in 64 failed).
    ids = [broker.new_cluster_id() for _ in range(5000)]
    assert not any(i.startswith("-") for i in ids)
    assert all(len(i) == 22 for i in ids) and len(set(ids)) == len(ids)
