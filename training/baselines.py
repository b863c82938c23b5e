"""Baselines the sequence models must beat, scored on the same split and positions.

- ``rule``: cart activity in the current session and its recency (purchase); visit frequency (churn).
- ``logreg`` and ``gbt``: logistic regression and gradient-boosted trees on AGGREGATE features of each user's
  history up to the event: counts per event type (overall and in the current session), events, sessions,
  mean viewed price, total purchased value, days since the first event. Deliberately no ordering and no
  time-since-last-event features: what a sequence model adds over them is what order and timing carry.

Aggregates are cumulative sums within each user (and session), computed for all records at once.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class AggregateBaseline:
    """Logistic regression or gradient-boosted trees on aggregates, one classifier per head and a regressor of
    log order value, fitted on the sequence models' training positions (train users, before t_split)."""

    kind: str  # "logreg" | "gbt"
    seed: int = 0
    max_rows: int = 400_000  # subsample of the training rows per head (fit time)

    def fit(self, ds: Dataset, feats: np.ndarray) -> AggregateBaseline:
        rng = np.random.default_rng(self.seed)
        x = _model_input(feats)
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
        if self.kind == "gbt":
            return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=self.seed)
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))

    def _regressor(self):
        if self.kind == "gbt":
            return HistGradientBoostingRegressor(max_iter=200, learning_rate=0.1, random_state=self.seed)
        return make_pipeline(StandardScaler(), Ridge(alpha=1.0))

    def predict(self, feats: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """[len(rows), 3]: purchase probability, churn probability, expected order value."""
        x = _model_input(feats[rows])
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
