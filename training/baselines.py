"""Baselines the sequence models must beat, scored on the same split and positions.

- ``rule``: cart activity in the current session and its recency (purchase); visit frequency (churn).
- ``gbt``: gradient-boosted trees on the aggregates below AND on order and timing features computed causally at
  each position (gap before the event and before the session, session duration, longest pause, position in
  the session, hour of day, the last three event types, time since the last cart, checkout and purchase, counts
  in sliding windows of 10 minutes, an hour and a day): the strong baseline, given the signal the simulator's
  intent is made of, so that a sequence model has to earn its place.
- ``gbt_counts`` and ``logreg``: gradient-boosted trees and logistic regression on AGGREGATE features of each
  user's history up to the event only (counts per event type, overall and in the current session, events,
  sessions, mean viewed price, total purchased value, days since the first event): no order, no timing.

Every feature is a cumulative or windowed quantity within each user (and session), computed for all records at
once, from the records up to and including the scored one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from models.features import FLAG_NEW_SESSION
from stream.contract import EVENT_TYPES, TYPE_CODE
from training import metrics as M
from training.data import DAY_MS, TRAIN, VAL, Dataset

FEATURE_NAMES: tuple[str, ...] = (
    *(f"n_{t}" for t in EVENT_TYPES),
    *(f"session_n_{t}" for t in EVENT_TYPES),
    "n_events",
    "n_sessions",
    "mean_viewed_price",
    "total_purchased_value",
    "days_since_first_event",
)


TIMING_FEATURE_NAMES: tuple[str, ...] = (
    "gap_s",
    "gap_before_session_s",
    "session_duration_s",
    "longest_pause_in_session_s",
    "position_in_session",
    "hour_of_day",
    "type_now",
    "type_before",
    "type_before_that",
    "s_since_add_to_cart",
    "s_since_checkout_start",
    "s_since_purchase",
    "events_10min",
    "events_1h",
    "events_24h",
    "carts_1h",
    "product_views_10min",
)
TYPE_COLUMNS = ("type_now", "type_before", "type_before_that")  # categorical: event type code + 1, 0 = none
NEVER_S = 1e8  # "no such event yet": longer ago than any trace
WINDOWS_S = {"10min": 600, "1h": 3600, "24h": 86_400}


def _segment_cumsum(x: np.ndarray, segment_start: np.ndarray) -> np.ndarray:
    """Cumulative sum of x (axis 0) restarting at each segment; segment_start[i] = index where i's segment starts."""
    cs = np.cumsum(x, axis=0)
    before = np.concatenate([np.zeros((1, *x.shape[1:]), cs.dtype), cs])[segment_start]  # cs just before the start
    return cs - before


def _starts(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(user start index, session start index) of every record."""
    idx = np.arange(len(ds))
    user_start = np.repeat(ds.user_start[:-1], np.diff(ds.user_start))
    new_session = (ds.records["flags"] & FLAG_NEW_SESSION) > 0
    session_start = np.maximum.accumulate(np.where(new_session, idx, 0))
    return user_start, session_start


def aggregate_features(ds: Dataset) -> np.ndarray:
    """float32 [N, len(FEATURE_NAMES)]: the user's history up to and including each event."""
    rec = ds.records
    user_start, session_start = _starts(ds)
    onehot = np.zeros((len(ds), len(EVENT_TYPES)), dtype=np.float64)
    onehot[np.arange(len(ds)), rec["type"]] = 1.0
    price = rec["price"].astype(np.float64)
    has_price = ~np.isnan(price)
    viewed = (rec["type"] == TYPE_CODE["product_view"]) & has_price
    bought = (rec["type"] == TYPE_CODE["purchase"]) & has_price
    quantity = np.where(rec["quantity"] > 0, rec["quantity"], 1).astype(np.float64)
    n_viewed = _segment_cumsum(viewed.astype(np.float64), user_start)
    sum_viewed = _segment_cumsum(np.where(viewed, price, 0.0), user_start)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_viewed = np.where(n_viewed > 0, sum_viewed / n_viewed, np.nan)
    columns = [
        _segment_cumsum(onehot, user_start),
        _segment_cumsum(onehot, session_start),
        (rec["count"].astype(np.float64) + 1)[:, None],
        _segment_cumsum(((rec["flags"] & FLAG_NEW_SESSION) > 0).astype(np.float64), user_start)[:, None],
        mean_viewed[:, None],
        _segment_cumsum(np.where(bought, price * quantity, 0.0), user_start)[:, None],
        ((rec["ts"] - rec["ts"][user_start]) / DAY_MS)[:, None],
    ]
    return np.concatenate(columns, axis=1).astype(np.float32)


def timing_features(ds: Dataset) -> np.ndarray:
    """float64 [N, len(TIMING_FEATURE_NAMES)]: order and timing of the user's history up to each event."""
    rec = ds.records
    n = len(ds)
    idx = np.arange(n)
    user_start, session_start = _starts(ds)
    ts = rec["ts"].astype(np.int64)
    gap = rec["gap_s"].astype(np.float64)
    within = np.where(idx == session_start, 0.0, gap)  # pauses inside the session, not the one before it
    session_id = np.cumsum(idx == session_start)
    big = float(within.max() + 1.0) if n else 1.0
    longest = np.maximum.accumulate(within + session_id * big) - session_id * big  # a running max per session
    types = rec["type"].astype(np.int64) + 1

    def before(k: int) -> np.ndarray:
        out = np.zeros(n, dtype=np.int64)
        out[k:] = types[:-k]
        out[idx - k < user_start] = 0
        return out

    def since(type_name: str) -> np.ndarray:
        last = np.maximum.accumulate(np.where(rec["type"] == TYPE_CODE[type_name], idx, -1))
        seen = last >= user_start
        return np.where(seen, (ts - ts[np.maximum(last, 0)]) / 1000.0, NEVER_S)

    # Sliding windows: records are sorted by user, then time, so (user, ts) is one sorted key.
    # One user's keys span the trace and the longest window, so a window never reaches into the previous user's
    # (and users times that span stays far inside int64).
    span = (int(ts.max() - ts.min()) if n else 0) + 1000 * max(WINDOWS_S.values()) + 1
    key = ds.record_user.astype(np.int64) * span + (ts - ts.min() if n else ts)
    first = {name: np.searchsorted(key, key - 1000 * w, side="left") for name, w in WINDOWS_S.items()}

    def count_in(mask: np.ndarray, window: str) -> np.ndarray:
        c = np.concatenate([[0], np.cumsum(mask)])
        return (c[idx + 1] - c[first[window]]).astype(np.float64)

    everything = np.ones(n, dtype=bool)
    columns = {
        "gap_s": gap,
        "gap_before_session_s": gap[session_start],
        "session_duration_s": (ts - ts[session_start]) / 1000.0,
        "longest_pause_in_session_s": longest,
        "position_in_session": (idx - session_start).astype(np.float64),
        "hour_of_day": ((ts // 3_600_000) % 24).astype(np.float64),
        "type_now": types.astype(np.float64),
        "type_before": before(1).astype(np.float64),
        "type_before_that": before(2).astype(np.float64),
        "s_since_add_to_cart": since("add_to_cart"),
        "s_since_checkout_start": since("checkout_start"),
        "s_since_purchase": since("purchase"),
        "events_10min": count_in(everything, "10min"),
        "events_1h": count_in(everything, "1h"),
        "events_24h": count_in(everything, "24h"),
        "carts_1h": count_in(rec["type"] == TYPE_CODE["add_to_cart"], "1h"),
        "product_views_10min": count_in(rec["type"] == TYPE_CODE["product_view"], "10min"),
    }
    return np.stack([columns[name] for name in TIMING_FEATURE_NAMES], axis=1)


def rule_scores(ds: Dataset, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hand-written scores (not probabilities; evaluate.py Platt-calibrates them on validation).

    purchase: checkout_start in this session (2) + add_to_cart in this session (1) + how recent the last
    add_to_cart is (up to 1, halving every 30 min) - a purchase already made in this session (1).
    churn: the fewer sessions per day of the user's life so far, the likelier the user does not come back.
    """
    col = {name: i for i, name in enumerate(FEATURE_NAMES)}
    _, session_start = _starts(ds)
    idx = np.arange(len(ds))
    is_cart = ds.records["type"] == TYPE_CODE["add_to_cart"]
    last_cart = np.maximum.accumulate(np.where(is_cart, idx, -1))
    cart_in_session = last_cart >= session_start
    minutes = np.clip((ds.records["ts"] - ds.records["ts"][np.maximum(last_cart, 0)]) / 60_000, 0.0, 1e4)
    recency = np.where(cart_in_session, 0.5 ** (minutes / 30.0), 0.0)
    purchase = (
        2.0 * (feats[:, col["session_n_checkout_start"]] > 0)
        + 1.0 * cart_in_session
        + recency
        - 1.0 * (feats[:, col["session_n_purchase"]] > 0)
    )
    sessions_per_day = feats[:, col["n_sessions"]] / np.maximum(feats[:, col["days_since_first_event"]], 1.0)
    churn = -np.log(sessions_per_day)
    return purchase.astype(np.float64), churn.astype(np.float64)


def _model_input(feats: np.ndarray) -> np.ndarray:
    """Counts and values on a log scale, a missing mean price as 0 plus an indicator (for logistic regression;
    the trees see the same columns and are indifferent to monotone transforms)."""
    missing = np.isnan(feats).any(axis=1, keepdims=True)
    return np.concatenate([np.log1p(np.nan_to_num(np.maximum(feats, 0.0))), missing], axis=1)


BASELINE_KINDS = ("logreg", "gbt_counts", "gbt")


def baseline_features(ds: Dataset, kind: str, aggregates: np.ndarray) -> np.ndarray:
    """The feature matrix a baseline kind is fitted on: the aggregates, and order and timing for ``gbt``."""
    return np.concatenate([aggregates, timing_features(ds)], axis=1) if kind == "gbt" else aggregates


@dataclass
class AggregateBaseline:
    """Logistic regression or gradient-boosted trees, one classifier per head and a regressor of log order value,
    fitted on the sequence models' training positions (``Dataset.head_mask(TRAIN, ...)``). ``kind``: logreg and
    gbt_counts on aggregates, gbt on aggregates with order and timing (``baseline_features``)."""

    kind: str  # one of BASELINE_KINDS
    seed: int = 0
    max_rows: int = 400_000  # subsample of the training rows per head (fit time)
    empty_columns: np.ndarray = field(init=False, repr=False)  # features without a value anywhere (set by fit)

    def _x(self, feats: np.ndarray) -> np.ndarray:
        # Trees take the features as they are (missing values natively; monotone transforms change nothing), but a
        # column missing everywhere (no prices in a trace) as zeros: sklearn's binning fails on one without values.
        # Logistic regression gets log scales and a missing-value indicator.
        if self.kind == "logreg":
            return _model_input(feats)
        return np.where(self.empty_columns, 0.0, feats)

    def _categorical(self, n_columns: int) -> np.ndarray | None:
        if self.kind != "gbt":
            return None
        mask = np.zeros(n_columns, dtype=bool)
        for name in TYPE_COLUMNS:
            mask[len(FEATURE_NAMES) + TIMING_FEATURE_NAMES.index(name)] = True
        return mask

    def fit(self, ds: Dataset, feats: np.ndarray) -> AggregateBaseline:
        if self.kind not in BASELINE_KINDS:
            raise ValueError(f"baseline kind: expected one of {BASELINE_KINDS}, got {self.kind!r}")
        rng = np.random.default_rng(self.seed)
        self.empty_columns = np.isnan(feats).all(axis=0)
        x = self._x(feats)
        self.categorical = self._categorical(x.shape[1])
        self.models = {}
        # The sequence models' training positions; churn where a session closes, so it is calibrated there.
        for head, y in (("purchase", ds.purchase), ("churn", ds.churn)):
            rows = np.flatnonzero(ds.head_mask(TRAIN, head) & ~np.isnan(y))
            if len(rows) > self.max_rows:
                rows = np.sort(rng.choice(rows, self.max_rows, replace=False))
            if len(np.unique(y[rows])) < 2:
                self.models[head] = float(np.mean(y[rows])) if len(rows) else 0.0  # constant: one class only
                continue
            self.models[head] = self._classifier().fit(x[rows], y[rows].astype(int))
        rows = np.flatnonzero(ds.head_mask(TRAIN, "order_value") & (ds.order_value > 0))
        if len(rows) >= 10:
            self.models["order_value"] = self._regressor().fit(x[rows], np.log(ds.order_value[rows]))
        else:
            self.models["order_value"] = float(np.log(np.nanmedian(ds.order_value))) if len(rows) else 0.0
        return self

    def _classifier(self):
        if self.kind == "logreg":
            return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        return HistGradientBoostingClassifier(
            max_iter=200, learning_rate=0.1, random_state=self.seed, categorical_features=self.categorical
        )

    def _regressor(self):
        if self.kind == "logreg":
            return make_pipeline(StandardScaler(), Ridge(alpha=1.0))
        return HistGradientBoostingRegressor(
            max_iter=200, learning_rate=0.1, random_state=self.seed, categorical_features=self.categorical
        )

    def predict(self, feats: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """[len(rows), 3]: purchase probability, churn probability, expected order value."""
        x = self._x(feats[rows])
        out = np.empty((len(rows), 3))
        for k, head in enumerate(("purchase", "churn")):
            m = self.models[head]
            out[:, k] = m if isinstance(m, float) else m.predict_proba(x)[:, 1]
        m = self.models["order_value"]
        out[:, 2] = np.exp(m if isinstance(m, float) else np.minimum(m.predict(x), 15.0))
        return out


def rule_baseline(ds: Dataset, feats: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[len(rows), 3] like ``AggregateBaseline.predict``: rule scores Platt-calibrated on the validation
    positions (churn: where sessions close), and the median training order value."""
    purchase, churn = rule_scores(ds, feats)
    out = np.empty((len(rows), 3))
    for k, (head, score, y) in enumerate((("purchase", purchase, ds.purchase), ("churn", churn, ds.churn))):
        val = ds.head_mask(VAL, head)
        out[:, k] = M.platt_apply(score[rows], M.platt_fit(score[val], y[val]))
    train_values = ds.order_value[ds.head_mask(TRAIN, "order_value")]
    out[:, 2] = np.nanmedian(train_values) if (~np.isnan(train_values)).any() else np.nan
    return out
