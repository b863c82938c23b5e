"""Metrics, Platt calibration and band thresholds: the numbers that train.py selects on and evaluate.py reports.

Every function takes plain numpy arrays and ignores NaN labels (censored positions), so callers never have to
remember the mask. A metric that cannot be computed (one class only, no positives) is NaN, never an exception:
reports print it as "n/a" and say why.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from training.data import DAY_MS


def _valid(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    keep = ~np.isnan(y) & ~np.isnan(p)
    return y[keep], p[keep]


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    y, p = _valid(y, p)
    if len(np.unique(y)) < 2:
        return math.nan
    return float(roc_auc_score(y, p))


def pr_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision (the step-wise area under the precision-recall curve; no optimistic interpolation)."""
    y, p = _valid(y, p)
    if y.sum() == 0:
        return math.nan
    return float(average_precision_score(y, p))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    y, p = _valid(y, p)
    return float(np.mean((p - y) ** 2)) if len(y) else math.nan


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Weighted mean |observed rate - mean prediction| over equal-width probability bins."""
    y, p = _valid(y, p)
    if not len(y):
        return math.nan
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, y, bins) - np.bincount(which, p, bins))  # per bin: |sum y - sum p|
    return float(gap.sum() / count.sum())


def calibration_curve(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean prediction, observed rate, count) per non-empty equal-width bin, for the reliability plot."""
    y, p = _valid(y, p)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    nz = count > 0
    mean_p = np.bincount(which, p, bins)[nz] / count[nz]
    rate = np.bincount(which, y, bins)[nz] / count[nz]
    return mean_p, rate, count[nz]


def at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    y, p = _valid(y, p)
    pred = p >= threshold
    tp = float((pred & (y == 1)).sum())
    precision = tp / pred.sum() if pred.sum() else math.nan
    recall = tp / (y == 1).sum() if (y == 1).sum() else math.nan
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else math.nan
    return {"precision": precision, "recall": recall, "f1": f1}


def f1_optimal_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The score threshold with the best F1 (predict positive when score >= threshold); 0.5 without positives."""
    y, p = _valid(y, p)
    if y.sum() == 0 or y.sum() == len(y):
        return 0.5
    precision, recall, thresholds = precision_recall_curve(y, p)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return float(thresholds[int(np.argmax(f1))])


def threshold_at_recall(y: np.ndarray, p: np.ndarray, recall: float) -> float:
    """The highest threshold that still catches at least ``recall`` of the positives."""
    y, p = _valid(y, p)
    pos = np.sort(p[y == 1])[::-1]
    if not len(pos):
        return 0.5
    k = min(len(pos) - 1, max(0, math.ceil(recall * len(pos)) - 1))
    return float(pos[k])


def platt_fit(logits: np.ndarray, y: np.ndarray, iters: int = 100, l2: float = 1e-6) -> list[float]:
    """Platt scaling: [a, b] so that sigmoid(a * logit + b) is calibrated on (logits, y). Damped Newton on the
    two-parameter logistic loss (deterministic, no solver settings): a step that does not lower the loss is
    halved, so scores far from logits (a rule's 0-4 points) converge too instead of running off to infinity.
    [1, 0] (identity) when y has one class."""
    y, z = _valid(y, logits)
    if len(np.unique(y)) < 2:
        return [1.0, 0.0]

    def loss(a: float, b: float) -> float:
        s = a * z + b
        return float(np.sum(np.logaddexp(0.0, s) - y * s) + 0.5 * l2 * (a * a + b * b))

    a, b = 1.0, 0.0
    current = loss(a, b)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(a * z + b, -40, 40)))
        w = np.maximum(p * (1 - p), 1e-12)
        g = np.array([np.dot(p - y, z) + l2 * a, np.sum(p - y) + l2 * b])
        h = np.array([[np.dot(w, z * z) + l2, np.dot(w, z)], [np.dot(w, z), w.sum() + l2]])
        step = np.linalg.solve(h, g)
        t = 1.0
        while t > 1e-10 and loss(a - t * step[0], b - t * step[1]) > current:
            t *= 0.5
        if t <= 1e-10:
            break
        a, b = a - t * step[0], b - t * step[1]
        current = loss(a, b)
        if np.abs(t * step).max() < 1e-9:
            break
    return [float(a), float(b)]


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def platt_apply(logits: np.ndarray, platt: list[float]) -> np.ndarray:
    """``platt_fit``'s parameters applied to numpy logits, by the engine's own function (models.model.calibrated)."""
    import torch

    from models.model import calibrated

    return calibrated(torch.from_numpy(np.asarray(logits, dtype=np.float64)), platt).numpy()


def head_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Everything the report shows for one probability head: ranking, threshold and calibration metrics."""
    yv, _ = _valid(y, p)
    return {
        "roc_auc": roc_auc(y, p),
        "pr_auc": pr_auc(y, p),
        **at_threshold(y, p, threshold),
        "threshold": float(threshold),
        "brier": brier(y, p),
        "ece": expected_calibration_error(y, p),
        "n": len(yv),
        "positives": int(yv.sum()),
    }


def order_value_mae(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Mean absolute error of the predicted order value on positions whose next purchase is known."""
    keep = ~np.isnan(actual) & ~np.isnan(predicted)
    return float(np.mean(np.abs(actual[keep] - predicted[keep]))) if keep.any() else math.nan


# ---- user-level bootstrap ----------------------------------------------------------------------------------


def bootstrap_replicates(
    y: np.ndarray, scores: dict[str, np.ndarray], groups: np.ndarray, n: int, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """PR-AUC and ROC-AUC of every scorer in ``n`` bootstrap replicates that draw the groups (users) with
    replacement: positions weigh as many times as their user was drawn, and every scorer sees the same draws, so
    the differences between scorers are paired. Returns {scorer: {"pr_auc": [n], "roc_auc": [n]}}.

    Each scorer's positions are sorted once; a replicate is then a weighted cumulative sum over that order
    (the step-wise average precision and trapezoidal ROC area that sklearn computes, with sample weights)."""
    known = ~np.isnan(np.asarray(y, dtype=np.float64))
    _, group_index = np.unique(groups[known], return_inverse=True)
    n_groups = int(group_index.max()) + 1 if len(group_index) else 0
    rng = np.random.default_rng(seed)
    draws = [np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups) for _ in range(n)]
    out = {}
    for name, p in scores.items():
        p_known = np.asarray(p, dtype=np.float64)[known]
        keep = ~np.isnan(p_known)
        order = np.argsort(-p_known[keep], kind="stable")
        y_sorted = np.asarray(y, dtype=np.float64)[known][keep][order]
        group_sorted = group_index[keep][order]
        p_sorted = p_known[keep][order]
        last = np.flatnonzero(np.append(np.diff(p_sorted) != 0, True))  # the last position of each tied score
        pr, roc = np.full(n, math.nan), np.full(n, math.nan)
        for r, counts in enumerate(draws):
            w = counts[group_sorted].astype(np.float64)
            tp = np.cumsum(w * y_sorted)[last]
            fp = np.cumsum(w * (1.0 - y_sorted))[last]
            if tp[-1] <= 0:
                continue
            precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
            pr[r] = float(np.sum(np.diff(tp, prepend=0.0) / tp[-1] * precision))
            if fp[-1] > 0:
                tpr, fpr = np.concatenate([[0.0], tp / tp[-1]]), np.concatenate([[0.0], fp / fp[-1]])
                roc[r] = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
        out[name] = {"pr_auc": pr, "roc_auc": roc}
    return out


def interval(values: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Mean, percentile interval and the share of replicates above zero, of a difference's replicates."""
    v = values[~np.isnan(values)]
    if not len(v):
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "share_above_zero": math.nan, "n": 0}
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(v, [tail, 100.0 - tail])
    return {"mean": float(v.mean()), "lo": float(lo), "hi": float(hi), "share_above_zero": float((v > 0).mean()),
            "n": len(v)}  # fmt: skip


# ---- volumes the CRM acts on ---------------------------------------------------------------------------------


def active_user_days(user: np.ndarray, ts: np.ndarray) -> int:
    """Distinct (user, UTC day) pairs with at least one event: the denominator of "per 1,000 users per day"."""
    return len(np.unique(np.asarray(user, dtype=np.int64) * 1_000_000 + np.asarray(ts, dtype=np.int64) // DAY_MS))


def alerts_at(user: np.ndarray, ts: np.ndarray, p: np.ndarray, threshold: float, cooldown_ms: int) -> np.ndarray:
    """Which of the session ends (rows sorted by user, then time) raise an alert, as the engine decides: a risk at
    or above the threshold, and no alert for the user within the cooldown before it."""
    fired = np.zeros(len(p), dtype=bool)
    last_user, last_ts = -1, 0
    for i in np.flatnonzero(np.asarray(p) >= threshold):
        if user[i] != last_user or ts[i] - last_ts >= cooldown_ms:
            fired[i] = True
            last_user, last_ts = user[i], ts[i]
    return fired


def alert_summary(
    user: np.ndarray, ts: np.ndarray, p: np.ndarray, y: np.ndarray, threshold: float, cooldown_ms: int, user_days: int
) -> dict[str, float]:
    """What the CRM receives from churn alerts at ``threshold`` over these session ends (``alerts_at``), judged
    against the labels ``y`` (NaN: unknown): their number per 1,000 active users per day, precision, recall and the
    base rate they are to be compared with."""
    fired = alerts_at(user, ts, p, threshold, cooldown_ms)
    known = ~np.isnan(y)
    hits = fired & known
    base = float(np.mean(y[known])) if known.any() else math.nan
    precision = float(np.mean(y[hits])) if hits.any() else math.nan
    return {
        "threshold": threshold,
        "alerts": int(fired.sum()),
        "alerts_per_1k_users_day": per_1k_user_days(int(fired.sum()), user_days),
        "precision": precision,
        "recall": float(y[hits].sum() / y[known].sum()) if y[known].sum() else math.nan,
        "base_rate": base,
        "precision_over_base_rate": precision / base if base else math.nan,
    }


def per_1k_user_days(count: int, user_days: int) -> float:
    return 1000.0 * count / user_days if user_days else math.nan


def threshold_for_budget(
    user: np.ndarray, ts: np.ndarray, p: np.ndarray, budget: float, user_days: int, cooldown_ms: int
) -> float:
    """The lowest risk threshold whose alerts stay within ``budget`` per 1,000 active users per day (bisection over
    the risks seen: fewer alerts as the threshold rises)."""
    candidates = np.unique(np.asarray(p, dtype=np.float64))
    if not len(candidates):
        return 0.5
    lo, hi = 0, len(candidates) - 1  # the answer is candidates[k] for the smallest k within budget
    if per_1k_user_days(int(alerts_at(user, ts, p, candidates[hi], cooldown_ms).sum()), user_days) > budget:
        return float(np.nextafter(candidates[hi], np.inf))  # even the top risk alone is over budget: none
    while lo < hi:
        mid = (lo + hi) // 2
        n = int(alerts_at(user, ts, p, candidates[mid], cooldown_ms).sum())
        if per_1k_user_days(n, user_days) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[lo])


def threshold_for_precision(y: np.ndarray, p: np.ndarray, min_precision: float) -> float | None:
    """The lowest threshold whose precision is at least ``min_precision`` (the most recall at that precision),
    None when no threshold reaches it."""
    y, p = _valid(y, p)
    if y.sum() == 0:
        return None
    precision, _, thresholds = precision_recall_curve(y, p)
    ok = np.flatnonzero(precision[:-1] >= min_precision)
    return float(thresholds[ok[0]]) if len(ok) else None
