"""docker-compose.yml cannot run here (no Docker engine); check that it agrees with the project."""

from __future__ import annotations

from pathlib import Path

import yaml

from stream.broker import kafka_version
from stream.settings import Settings

ROOT = Path(__file__).parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in COMPOSE["services"][service]["environment"].items()}


def test_services_are_kafka_worker_and_one_shot_trainer():
    services = COMPOSE["services"]
    assert {"kafka", "worker", "trainer"} <= set(services)
    assert services["kafka"]["image"] == f"apache/kafka:{kafka_version()}"
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert services["worker"]["command"] == ["worker"]
    assert services["trainer"]["command"][0] == "train"
    assert services["trainer"]["restart"] == "no"
    # Scalable: nothing that pins a single instance.
    assert "container_name" not in services["worker"]
    assert "ports" not in services["worker"]


def test_every_intentstream_variable_is_a_valid_setting():
    for name in ("worker", "trainer", "topics"):
        Settings.from_env(_env(name))  # raises on an unknown variable or a bad value


def test_topics_match_the_settings_defaults_everywhere():
    defaults = Settings.from_env({})
    for name in ("worker", "trainer", "topics"):
        s = Settings.from_env(_env(name))
        assert (s.topic_clickstream, s.output_topics) == (defaults.topic_clickstream, defaults.output_topics)
        assert s.kafka_bootstrap == "kafka:9092"
        assert s.partitions == Settings.from_env(_env("worker")).partitions


def test_worker_and_trainer_share_the_model_volume():
    worker, trainer = COMPOSE["services"]["worker"], COMPOSE["services"]["trainer"]
    model_dir = str(Settings.from_env(_env("worker")).model_dir)
    assert str(Settings.from_env(_env("trainer")).model_dir) == model_dir
    assert f"models:{model_dir}:ro" in worker["volumes"]
    assert f"models:{model_dir}" in trainer["volumes"]
    assert trainer["command"][trainer["command"].index("--out") + 1] == model_dir
    assert "models" in COMPOSE["volumes"]


def test_broker_listener_matches_the_bootstrap_address():
    kafka_env = COMPOSE["services"]["kafka"]["environment"]
    assert kafka_env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://" + _env("worker")["INTENTSTREAM_KAFKA_BOOTSTRAP"]


def test_each_worker_replica_advertises_its_own_url():
    """Scaled replicas share one environment: a fixed INTENTSTREAM_WEB_URL would be every replica's, and the bind
    address 0.0.0.0 is nobody's. The advertised URL comes from each container's hostname."""
    env = _env("worker")
    assert "INTENTSTREAM_WEB_URL" not in env
    s = Settings.from_env(env)
    assert s.web_host == "0.0.0.0" and "0.0.0.0" not in s.advertised_url
