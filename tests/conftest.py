"""Shared fixtures. Integration tests talk to the real local Kafka broker, started here if none answers."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from stream import broker
from stream.settings import Settings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def kafka() -> Settings:
    """Settings pointing at a running real broker (the local one is started if nothing answers)."""
    settings = Settings.from_env()
    if not broker.answers_metadata(settings.kafka_bootstrap):
        broker.start(settings)
    return settings


@pytest.fixture
def fresh(kafka: Settings, tmp_path: Path) -> Settings:
    """Settings with topics, consumer group and state of this test alone, on the real broker."""
    tag = uuid.uuid4().hex[:8]
    return Settings.from_env(
        topic_clickstream=f"clickstream-{tag}",
        topic_dlq=f"clickstream-dlq-{tag}",
        topic_intent=f"purchase-intent-{tag}",
        topic_churn=f"churn-alerts-{tag}",
        app_id=f"intentstream-test-{tag}",
        state_dir=str(tmp_path / "state"),
        model_dir=str(tmp_path / "models"),
        items_dir=str(tmp_path / "items"),  # none there: suggestions only where a test publishes an item model
    )


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: the real REES46 excerpt ships in ../shared/data beside the checkout")
    return SHARED_DATA
