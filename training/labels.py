"""Purchase and churn labels from events alone: the one definition shared by the trainer, the evaluation and
the simulator's tests (the simulator writes the same labels into its truth file; tests/test_labels.py and
tests/test_simulator.py check that both agree).

For the event i of user u at time t (i is its position in u's own order: time, then input order):

- purchase = 1 when a later event j > i of u is a purchase with t_j <= t + horizon; order_value is the value
  of the first such purchase. A 0 is censored (NaN) when t + horizon > end: the purchase may lie beyond the data.
- churn = 1 when u has no later event j > i with t_j <= t + churn window. A 1 is censored (NaN) when
  t + churn window > end: the user may come back after the data ends.

A purchase event's own purchase label is about a later purchase, never itself.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Labels(NamedTuple):
    purchase: np.ndarray  # float64 [N]: 1, 0 or NaN (censored)
    churn: np.ndarray  # float64 [N]: 1, 0 or NaN (censored)
    order_value: np.ndarray  # float64 [N]: value of the first purchase within the horizon, NaN when none


def compute_labels(
    user_ids: np.ndarray,
    ts_ms: np.ndarray,
    is_purchase: np.ndarray,
    order_values: np.ndarray,
    horizon_ms: int,
    churn_ms: int,
    end_ms: int,
) -> Labels:
    """Labels of every event, in the input order (any order: events are grouped by user and sorted by time
    internally, ties keeping their input order).

    ``user_ids``: any array of user keys (ints or strings); ``ts_ms``: event times; ``is_purchase``: bool;
    ``order_values``: the value of each purchase event (price x quantity), ignored elsewhere; ``end_ms``: end of
    the observed period (labels whose window reaches past it are censored as described above).
    """
    user_ids = np.asarray(user_ids)
    ts = np.asarray(ts_ms, dtype=np.int64)
    buy = np.asarray(is_purchase, dtype=bool)
    value = np.asarray(order_values, dtype=np.float64)
    n = len(ts)
    if not (len(user_ids) == len(buy) == len(value) == n):
        raise ValueError("compute_labels: user_ids, ts_ms, is_purchase and order_values must have the same length")
    if n == 0:
        empty = np.zeros(0, dtype=np.float64)
        return Labels(empty, empty.copy(), empty.copy())
    _, user = np.unique(user_ids, return_inverse=True)
    order = np.lexsort((np.arange(n), ts, user))  # by user, then time, then input order
    u, t, b, v = user[order], ts[order], buy[order], value[order]
    pos = np.arange(n)
    same_user_next = np.zeros(n, dtype=bool)
    same_user_next[:-1] = u[1:] == u[:-1]

    # The first purchase strictly after each position (in sorted order): a suffix minimum over purchase
    # positions, shifted by one. It is the earliest later purchase, so if it is not within the horizon none is.
    buy_pos = np.where(b, pos, n)
    next_buy = np.empty(n, dtype=np.int64)
    next_buy[:-1] = np.minimum.accumulate(buy_pos[::-1])[::-1][1:]
    next_buy[-1] = n
    has_next = next_buy < n
    j = np.where(has_next, next_buy, 0)
    hit = has_next & (u[j] == u) & (t[j] <= t + horizon_ms)
    purchase = np.where(hit, 1.0, np.where(t + horizon_ms > end_ms, np.nan, 0.0))
    order_value = np.where(hit, v[j], np.nan)

    nxt = np.minimum(pos + 1, n - 1)
    returns = same_user_next & (t[nxt] <= t + churn_ms)
    churn = np.where(returns, 0.0, np.where(t + churn_ms > end_ms, np.nan, 1.0))

    out = [np.empty(n, dtype=np.float64) for _ in range(3)]
    for dst, src in zip(out, (purchase, churn, order_value), strict=True):
        dst[order] = src
    return Labels(*out)
