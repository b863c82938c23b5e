"""docker-compose.yml cannot run here (no Docker engine); check that it agrees with the project."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import yaml

from stream.broker import kafka_version
from stream.settings import Settings

ROOT = Path(__file__).parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in COMPOSE["services"][service]["environment"].items()}


WORKERS = sorted(name for name in COMPOSE["services"] if name.startswith("worker"))


def test_services_are_kafka_two_workers_and_one_shot_trainer():
    services = COMPOSE["services"]
    assert {"kafka", "trainer"} <= set(services) and WORKERS == ["worker-1", "worker-2"]
    assert services["kafka"]["image"] == f"apache/kafka:{kafka_version()}"
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    for name in WORKERS:
        assert services[name]["command"] == ["worker"]
        assert "ports" not in services[name]  # reached inside the compose network only
    assert services["trainer"]["command"][0] == "train"
    assert services["trainer"]["restart"] == "no"


def test_every_intentstream_variable_is_a_valid_setting():
    for name in (*WORKERS, "trainer", "topics"):
        Settings.from_env(_env(name))  # raises on an unknown variable or a bad value


def test_topics_match_the_settings_defaults_everywhere():
    defaults = Settings.from_env({})
    for name in (*WORKERS, "trainer", "topics"):
        s = Settings.from_env(_env(name))
        assert (s.topic_clickstream, s.output_topics) == (defaults.topic_clickstream, defaults.output_topics)
        assert s.kafka_bootstrap == "kafka:9092"
        assert s.partitions == Settings.from_env(_env("worker-1")).partitions
        assert s.app_id == defaults.app_id  # one consumer group


def test_workers_and_trainer_share_the_model_volume():
    trainer = COMPOSE["services"]["trainer"]
    model_dir = str(Settings.from_env(_env("trainer")).model_dir)
    for name in WORKERS:
        assert str(Settings.from_env(_env(name)).model_dir) == model_dir
        assert f"models:{model_dir}:ro" in COMPOSE["services"][name]["volumes"]
    assert f"models:{model_dir}" in trainer["volumes"]
    assert trainer["command"][trainer["command"].index("--out") + 1] == model_dir
    assert "models" in COMPOSE["volumes"]


def test_broker_listener_matches_the_bootstrap_address():
    kafka_env = COMPOSE["services"]["kafka"]["environment"]
    assert kafka_env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://" + _env("worker-1")["INTENTSTREAM_KAFKA_BOOTSTRAP"]


def test_each_worker_advertises_its_own_url_and_port_and_keeps_its_own_state():
    """Bound to every interface of its container, each worker advertises the name and port the others reach it by
    (a worker advertising 0.0.0.0 would believe it owns every user); its state volume is its own; its health
    check asks its own port."""
    seen_urls, seen_ports, seen_volumes = set(), set(), set()
    for name in WORKERS:
        service = COMPOSE["services"][name]
        s = Settings.from_env(_env(name))
        url = urllib.parse.urlsplit(s.advertised_url)
        assert s.web_host == "0.0.0.0" and url.hostname == service["hostname"] == name and url.port == s.web_port
        assert str(s.web_port) in service["expose"]
        assert f"127.0.0.1:{s.web_port}/health" in " ".join(service["healthcheck"]["test"])
        state = [v for v in service["volumes"] if v.endswith(f":{s.state_dir}")]
        assert len(state) == 1 and state[0].split(":")[0] in COMPOSE["volumes"]
        seen_urls.add(s.advertised_url)
        seen_ports.add(s.web_port)
        seen_volumes.add(state[0])
    assert len(seen_urls) == len(seen_ports) == len(seen_volumes) == len(WORKERS)
