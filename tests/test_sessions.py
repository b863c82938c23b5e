"""Session closing by the partition's watermark, and what one record from a skewed clock may do to it.

A churn alert goes out when a session closes, and sessions close when the partition's watermark (its largest event
time) passes their last event by the session gap. One producer with a clock hours ahead used to move the watermark
with one record and close every open session of the partition at once (issue 14, item 7: 300 users in open
sessions, one record 23 h ahead, 72 churn alerts). The watermark is now capped at the wall clock plus
``max_watermark_lead_s``; the record itself is scored.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
import torch

from models.artifact import load_newest
from stream.engine import Engine, InRecord
from stream.settings import Settings
from tests.helpers import write_model

MIN = 60_000
HOUR = 60 * MIN


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    write_model(tmp_path, "gru", seed=3, churn_alert=0.0)  # every closed session alerts: the count is the closings
    model, _ = load_newest(tmp_path, expect_window=64)
    assert model is not None
    return Engine(Settings.from_env({}, emit_policy="every_event"), model, torch.device("cpu"))


def record(user: str, ts: int, offset: int, n: int = 0) -> InRecord:
    value = orjson.dumps({"event_id": f"{user}-{ts}-{n}", "user_id": user, "type": "product_view", "ts": ts})
    return InRecord(user.encode(), value, "clickstream", 0, offset, ts)


def run(engine: Engine, table: dict[str, bytes], records: list[InRecord]) -> tuple[int, int]:
    """(churn alerts, events scored) of one batch; the states go to ``table``."""
    result = engine.process(records, lambda uid, rec: table.get(uid))
    table.update({uid: blob for uid, (blob, _rec) in result.states.items()})
    return result.alerts, result.scored


def open_sessions(now_ms: int, users: int = 300) -> list[InRecord]:
    """Each user's last event between 1 and 20 minutes ago: every session still open (gap 30 min)."""
    return [record(f"u{i}", now_ms - MIN - (i % 20) * MIN, i) for i in range(users)]


def test_one_record_from_a_clock_hours_ahead_closes_no_session(engine: Engine, monkeypatch: pytest.MonkeyPatch):
    now = int(time.time() * 1000)
    monkeypatch.setattr(time, "time", lambda: now / 1000)
    table: dict[str, bytes] = {}
    assert run(engine, table, open_sessions(now)) == (0, 300)
    alerts, scored = run(engine, table, [record("skewed", now + 23 * HOUR, 300)])
    assert (alerts, scored) == (0, 1)  # scored, and nobody's session closed by it
    assert engine.sessions[0].watermark <= now + engine.watermark_lead_ms
    # The wall clock moves on: 40 minutes later every session of the 300 has been quiet for over 30 minutes, and
    # the next record (of a live clock) closes them all.
    later = now + 40 * MIN
    monkeypatch.setattr(time, "time", lambda: later / 1000)
    assert run(engine, table, [record("fresh", later, 301)]) == (300, 1)


def test_a_restart_does_not_take_the_skewed_event_time_as_the_watermark(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
):
    now = int(time.time() * 1000)
    monkeypatch.setattr(time, "time", lambda: now / 1000)
    table: dict[str, bytes] = {}
    run(engine, table, [*open_sessions(now, users=50), record("skewed", now + 23 * HOUR, 50)])
    engine.restore_partition(0, table.items())  # what a restarted worker rebuilds from its table
    assert engine.sessions[0].watermark <= now + engine.watermark_lead_ms
    assert run(engine, table, [record("fresh", now, 51)]) == (0, 1)


def test_event_time_in_the_past_closes_sessions_as_before(engine: Engine):
    """A replay of last month: the cap (wall clock + lead) is far ahead, and the watermark is the largest event time,
    record by record, as always."""
    past = int(time.time() * 1000) - 30 * 24 * HOUR
    table: dict[str, bytes] = {}
    assert run(engine, table, open_sessions(past, users=10)) == (0, 10)
    assert run(engine, table, [record("next-day", past + 24 * HOUR, 10)]) == (10, 1)
