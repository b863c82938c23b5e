"""stream/topics.py without a broker: what the worker asks of it, and how it waits for its topics' leaders (the same
calls on a real broker: tests/test_topics.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from stream.settings import Settings
from stream.topics import TopicLayoutError, TopicsNotReadyError, changelog_topic, wait_for_leaders
from tests.helpers import create_app_offline


def test_the_worker_creates_faust_s_changelog_and_keeps_its_app_id_whatever_app_version_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The worker creates the changelog under the name Faust gives it, before Faust starts; Faust's app id (and so
    the changelog's and the group's names) is INTENTSTREAM_APP_ID even when the environment sets APP_VERSION."""
    monkeypatch.setenv("APP_VERSION", "2")
    s = Settings.from_env({}, state_dir=str(tmp_path / "state"), model_dir=str(tmp_path / "models"))
    calls: list[dict[str, Any]] = []
    app = create_app_offline(s, monkeypatch, calls)
    assert calls == [{"changelog": True}]
    assert app.conf.id == s.app_id
    assert app.tables["users"].changelog_topic.get_topic_name() == changelog_topic(s)


class FakeAdmin:
    """``describe_topics`` answering from a script, one answer a call (the last one repeated)."""

    def __init__(self, answers: list[dict[str, tuple[int, list[int]]]]) -> None:
        self.answers, self.calls = answers, 0

    async def describe_topics(self, names: list[str]) -> list[dict[str, Any]]:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return [
            {
                "topic": name,
                "error_code": error,
                "partitions": [{"partition": i, "leader": x} for i, x in enumerate(leaders)],
            }
            for name, (error, leaders) in answer.items()
        ]


def _wanted(s: Settings) -> dict[str, int]:
    return {s.topic_clickstream: s.partitions, changelog_topic(s): s.partitions}


def test_the_wait_ends_once_every_partition_has_a_leader():
    s = Settings.from_env({}, partitions=2)
    inp, log = s.topic_clickstream, changelog_topic(s)
    admin = FakeAdmin(
        [
            {inp: (0, [1, 1]), log: (3, [])},  # the changelog not known yet
            {inp: (0, [1, 1]), log: (5, [-1, 1])},  # known, a partition without a leader
            {inp: (0, [1, 1]), log: (0, [1, 1])},
        ]
    )
    asyncio.run(wait_for_leaders(admin, s, _wanted(s), within_s=10))
    assert admin.calls == 3


def test_a_final_error_or_a_wrong_partition_count_stops_at_once_and_missing_leaders_after_the_wait():
    s = Settings.from_env({}, partitions=2)
    inp, log = s.topic_clickstream, changelog_topic(s)
    denied = FakeAdmin([{inp: (0, [1, 1]), log: (29, [])}])
    with pytest.raises(TopicLayoutError, match="TopicAuthorizationFailedError"):
        asyncio.run(wait_for_leaders(denied, s, _wanted(s), within_s=10))
    assert denied.calls == 1
    one = FakeAdmin([{inp: (0, [1, 1]), log: (0, [1])}])
    with pytest.raises(TopicLayoutError, match="has 1 partitions, the input 2"):
        asyncio.run(wait_for_leaders(one, s, _wanted(s), within_s=10))
    leaderless = FakeAdmin([{inp: (0, [1, -1]), log: (0, [1, 1])}])
    with pytest.raises(TopicsNotReadyError, match=f"after 0.3 s: {inp}"):
        asyncio.run(wait_for_leaders(leaderless, s, _wanted(s), within_s=0.3))
    assert leaderless.calls >= 2
