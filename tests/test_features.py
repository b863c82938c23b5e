"""No training/serving skew: the trainer's vectorised featurizer and the engine's table encoding agree."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from models.features import RECORD_DTYPE, FeaturizerConfig, encode_events, model_inputs
from stream.contract import EVENT_TYPES, Event
from stream.state.user import Accept, UserState

CONFIG = FeaturizerConfig(window=16)


def random_events(n_users: int = 6, n_events: int = 400, seed: int = 1) -> list[Event]:
    rng = random.Random(seed)
    clock = {f"u{i}": 1_767_600_000_000 + rng.randrange(10**7) for i in range(n_users)}
    sessions = dict.fromkeys(clock, 0)
    events = []
    for k in range(n_events):
        user = rng.choice(sorted(clock))
        gap = rng.choice([0, 500, 20_000, 300_000, 4_000_000, 90_000_000])
        if gap > 1_800_000:
            sessions[user] += 1
        clock[user] += gap
        events.append(
            Event(
                event_id=f"e{k}",
                user_id=user,
                type=rng.choice(EVENT_TYPES),
                ts=clock[user],
                session_id=rng.choice([None, f"{user}-s{sessions[user]}"]),
                item_id=rng.choice([None, "i1", "i2", f"i{k % 5}"]),
                category=rng.choice([None, "shoes", "books", "toys"]),
                price=rng.choice([None, 0.0, 9.99, 1234.5]),
                quantity=rng.choice([None, 1, 3, 400]),
            )
        )
    events.sort(key=lambda e: e.ts)  # the stream arrives in event-time order here
    return events


def online_windows(events: list[Event]) -> dict[str, bytes]:
    table: dict[str, bytes] = {}
    for e in events:
        state = UserState.from_bytes(table[e.user_id]) if e.user_id in table else UserState()
        assert state.accept(e, CONFIG, allowed_lateness_ms=3_600_000) is Accept.APPENDED
        table[e.user_id] = state.to_bytes()  # through the engine's binary encoding every time
    return table


def offline_windows(events: list[Event]) -> dict[str, np.ndarray]:
    records, order = encode_events(events, CONFIG)
    users = np.array([events[i].user_id for i in order])
    return {u: records[users == u][-CONFIG.window :] for u in dict.fromkeys(users)}


def test_offline_and_online_paths_give_identical_tensors():
    events = random_events()
    online, offline = online_windows(events), offline_windows(events)
    assert online.keys() == offline.keys()
    for user, blob in online.items():
        on = UserState.from_bytes(blob).records
        off = offline[user]
        assert on.tobytes() == off.tobytes(), user
        a, b = model_inputs(on, CONFIG), model_inputs(off, CONFIG)
        for key in a:
            assert torch.equal(a[key], b[key]), (user, key)


def test_features_depend_on_order_and_gaps():
    events = random_events(n_users=1, n_events=10)
    rec, _ = encode_events(events, CONFIG)
    inputs = model_inputs(rec, CONFIG)
    assert inputs["numeric"].shape == (10, 10)
    assert (rec["gap_s"][1:] >= 0).all() and rec["gap_s"][0] == 0
    assert rec["count"].tolist() == list(range(10))


def test_window_keeps_the_last_n_and_counts_all():
    events = random_events(n_users=1, n_events=50)
    state = UserState.from_bytes(online_windows(events)["u0"])
    assert len(state.records) == CONFIG.window
    assert state.count == 50
    assert state.records["ts"].tolist() == sorted(e.ts for e in events)[-CONFIG.window :]


def test_duplicate_event_ids_do_not_enter_twice():
    e = random_events(n_users=1, n_events=3)
    state = UserState()
    for ev in e:
        state.accept(ev, CONFIG, 3_600_000)
    assert state.accept(e[1], CONFIG, 3_600_000) is Accept.DUPLICATE
    assert len(state.records) == 3 and state.count == 3


def test_late_events_are_inserted_in_order_within_the_lateness_bound():
    base = 1_767_600_000_000
    mk = lambda i, ts: Event(f"e{i}", "u", "page_view", base + ts, session_id="s")  # noqa: E731
    state = UserState()
    for i, ts in enumerate([0, 10_000, 20_000, 30_000]):
        state.accept(mk(i, ts), CONFIG, 60_000)
    assert state.accept(mk(9, 15_000), CONFIG, 60_000) is Accept.INSERTED
    assert state.records["ts"].tolist() == [base + t for t in (0, 10_000, 15_000, 20_000, 30_000)]
    assert state.records["gap_s"].tolist() == [0, 10, 5, 5, 10]
    assert state.records["count"].tolist() == [0, 1, 2, 3, 4]
    # Matches what the offline path computes for the same events in time order.
    offline = offline_windows([mk(i, t) for i, t in enumerate([0, 10_000, 20_000, 30_000])] + [mk(9, 15_000)])
    assert offline["u"].tobytes() == state.records.tobytes()
    assert state.accept(mk(10, -5_000), CONFIG, 60_000) is Accept.TOO_LATE  # before the window's first event
    assert state.accept(mk(11, 31_000 - 120_000), CONFIG, 60_000) is Accept.TOO_LATE


@pytest.mark.parametrize("hidden", [None, np.arange(64, dtype=np.float32)])
def test_state_codec_round_trip(hidden):
    state = UserState(
        records=np.zeros(3, dtype=RECORD_DTYPE),
        count=7,
        session_start=5,
        last_score=0.25,
        last_band=2,
        last_emit_ts=9,
        churn_risk=0.5,
        closed_ts=10,
        churn_alert_ts=11,
        model_tag="0123456789abcdef",
        hidden=hidden,
    )
    back = UserState.from_bytes(state.to_bytes())
    assert back.to_bytes() == state.to_bytes()
    assert back.model_tag == "0123456789abcdef" and back.count == 7 and back.last_band == 2
