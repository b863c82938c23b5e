"""training/labels.py: the purchase/churn label definition on hand-made sequences and against brute force."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from training.labels import compute_labels

H = 3_600_000  # 1 h
D = 14 * 86_400_000  # 14 days
T0 = 1_767_571_200_000  # 2026-01-05


def labels(events: list[tuple[str, int, bool, float]], end_ms: int, horizon_ms: int = H, churn_ms: int = D):
    """events: (user, ts, is_purchase, value); returns lists with None for NaN."""
    users = np.array([e[0] for e in events])
    ts = np.array([e[1] for e in events], dtype=np.int64)
    buy = np.array([e[2] for e in events])
    value = np.array([e[3] for e in events], dtype=np.float64)
    out = compute_labels(users, ts, buy, value, horizon_ms, churn_ms, end_ms)
    return tuple([None if math.isnan(x) else x for x in arr.tolist()] for arr in out)


NAN = math.nan


def test_purchase_exactly_at_the_horizon_counts_one_ms_later_does_not():
    end = T0 + 10 * D
    p, _, v = labels([("a", T0, False, NAN), ("a", T0 + H, True, 50.0)], end)
    assert p == [1.0, 0.0] and v == [50.0, None]
    p, _, v = labels([("a", T0, False, NAN), ("a", T0 + H + 1, True, 50.0)], end)
    assert p == [0.0, 0.0] and v == [None, None]


def test_a_purchase_label_refers_to_a_later_purchase_not_the_event_itself():
    end = T0 + 10 * D
    p, _, v = labels([("a", T0, True, 10.0), ("a", T0 + 1000, True, 20.0), ("a", T0 + 2000, True, 30.0)], end)
    assert p == [1.0, 1.0, 0.0]
    assert v == [20.0, 30.0, None]  # the first later purchase, not the largest or the event's own


def test_order_value_is_the_first_purchase_within_the_horizon():
    end = T0 + 10 * D
    p, _, v = labels([("a", T0, False, NAN), ("a", T0 + 60_000, True, 5.0), ("a", T0 + 120_000, True, 500.0)], end)
    assert p[0] == 1.0 and v[0] == 5.0


def test_ties_in_time_follow_input_order():
    end = T0 + 10 * D
    # Same timestamp: the first in input order sees the second as later; the second does not see the first.
    p, c, _ = labels([("a", T0, False, NAN), ("a", T0, True, 9.0)], end)
    assert p == [1.0, 0.0]
    assert c == [0.0, 1.0]
    p, _, _ = labels([("a", T0, True, 9.0), ("a", T0, False, NAN)], end)
    assert p == [0.0, 0.0]


def test_censoring_at_the_end_of_the_period():
    # Purchase: a 0 whose window reaches past the end is unknown; a 1 seen before the end stays 1.
    end = T0 + H // 2
    p, _, _ = labels([("a", T0, False, NAN), ("a", T0 + 1000, True, 1.0), ("b", T0, False, NAN)], end)
    assert p == [1.0, None, None]
    # Exactly at the end is still known.
    p, _, _ = labels([("a", T0, False, NAN)], T0 + H)
    assert p == [0.0]
    # Churn: a 1 whose window reaches past the end is unknown; a 0 (the user came back) is known.
    end = T0 + D // 2
    _, c, _ = labels([("a", T0, False, NAN), ("a", T0 + 5000, False, NAN)], end)
    assert c == [0.0, None]
    _, c, _ = labels([("a", T0, False, NAN)], T0 + D)
    assert c == [1.0]


def test_churn_window_boundary():
    end = T0 + 10 * D
    _, c, _ = labels([("a", T0, False, NAN), ("a", T0 + D, False, NAN)], end)
    assert c == [0.0, 1.0]
    _, c, _ = labels([("a", T0, False, NAN), ("a", T0 + D + 1, False, NAN)], end)
    assert c == [1.0, 1.0]


def test_users_are_independent_and_input_order_is_kept():
    end = T0 + 10 * D
    # Interleaved and unsorted: b's purchase must not label a's events; results come back in input order.
    events = [
        ("b", T0 + 2000, True, 7.0),
        ("a", T0 + 1000, False, NAN),
        ("b", T0, False, NAN),
        ("a", T0 + 3000, False, NAN),
    ]
    p, c, v = labels(events, end)
    assert p == [0.0, 0.0, 1.0, 0.0]
    assert v == [None, None, 7.0, None]
    assert c == [1.0, 0.0, 0.0, 1.0]


def test_empty_input():
    p, c, v = labels([], T0)
    assert p == c == v == []


def brute_force(events: list[tuple[str, int, bool, float]], end: int, horizon: int, churn: int):
    """O(n^2) reference straight from the definition."""
    order = sorted(range(len(events)), key=lambda i: (events[i][1], i))
    rank = {i: r for r, i in enumerate(order)}
    p, c, v = [], [], []
    for i, (user, t, _, _) in enumerate(events):
        later = sorted((j for j, e in enumerate(events) if e[0] == user and rank[j] > rank[i]), key=lambda j: rank[j])
        buys = [j for j in later if events[j][2] and events[j][1] <= t + horizon]
        if buys:
            p.append(1.0)
            v.append(events[buys[0]][3])
        else:
            p.append(None if t + horizon > end else 0.0)
            v.append(None)
        if any(events[j][1] <= t + churn for j in later):
            c.append(0.0)
        else:
            c.append(None if t + churn > end else 1.0)
    return p, c, v


event_strategy = st.tuples(
    st.sampled_from(["a", "b", "c"]),
    st.integers(0, 40),  # units of 10 minutes: horizons of 60 and churn of 120 minutes cross often
    st.booleans(),
    st.integers(1, 500),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(event_strategy, max_size=25), st.integers(0, 45))
def test_matches_brute_force(raw, end_units):
    unit = 600_000
    events = [(u, T0 + t * unit, b, float(v) if b else NAN) for u, t, b, v in raw]
    end = T0 + end_units * unit
    assert labels(events, end, horizon_ms=6 * unit, churn_ms=12 * unit) == brute_force(events, end, 6 * unit, 12 * unit)
