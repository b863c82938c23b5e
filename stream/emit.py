"""What the CRM team receives: the emission policy for intent events, bands, and readable reason codes."""

from __future__ import annotations

import numpy as np

from models.features import FLAG_NEW_SESSION, FLAG_SAME_ITEM
from stream.contract import TYPE_CODE
from stream.state.user import BANDS, NO_BAND, UserState

ADD, REMOVE, CHECKOUT, PURCHASE, VIEW, WISH = (
    TYPE_CODE[t]
    for t in ("add_to_cart", "remove_from_cart", "checkout_start", "purchase", "product_view", "wishlist_add")
)


def band_of(score: float, thresholds: dict[str, float]) -> int:
    if score >= thresholds["high"]:
        return 2
    if score >= thresholds["medium"]:
        return 1
    return 0


def should_emit(
    state: UserState, score: float, band: int, event_ts: int, policy: str, delta: float, cooldown_ms: int
) -> bool:
    """``every_event``: always. ``on_change``: a rise to a higher band at once; a fall in band or a score
    move of at least ``delta`` once the per-user cooldown (event time) has passed. A user's first score
    is emitted only when it is not ``low`` (the CRM acts on intent, not on its absence)."""
    if policy == "every_event":
        return True
    if state.last_band == NO_BAND:
        return band > 0
    if band > state.last_band:
        return True
    if event_ts - state.last_emit_ts < cooldown_ms:
        return False
    return band != state.last_band or abs(score - state.last_score) >= delta


def _ago(ms: int) -> str:
    minutes = ms / 60_000
    if minutes < 90:
        return f"{max(1, round(minutes))} min"
    hours = minutes / 60
    return f"{round(hours)} h" if hours < 48 else f"{round(hours / 24)} days"


def intent_reasons(records: np.ndarray, limit: int = 3) -> list[str]:
    """Short reasons a CRM user can read, from the user's window (newest event last).

    Hot path (one call per emitted intent): three columns as Python lists and plain loops over at most a
    window of records, ~3x cheaper than a dozen small numpy calls (docs/performance.md)."""
    n = len(records)
    if not n:
        return []
    ts, types, flags = records["ts"].tolist(), records["type"].tolist(), records["flags"].tolist()
    now = ts[-1]
    session_from = next((i for i in range(n - 1, -1, -1) if flags[i] & FLAG_NEW_SESSION), 0)
    session = types[session_from:]
    reasons: list[str] = []
    cutoff = now - 600_000
    n_add_recent = sum(1 for t, x in zip(ts, types, strict=True) if x == ADD and t >= cutoff)
    if n_add_recent:
        reasons.append(f"{n_add_recent} add_to_cart in 10 min")
    last_checkout = next((i for i in range(len(session) - 1, -1, -1) if session[i] == CHECKOUT), -1)
    if last_checkout >= 0 and PURCHASE not in session[last_checkout:]:
        reasons.append("checkout_start without purchase")
    n_remove = session.count(REMOVE)
    if n_remove:
        reasons.append(f"{n_remove} remove_from_cart this session")
    repeat = sum(1 for f in flags[session_from:] if f & FLAG_SAME_ITEM)
    if repeat >= 2:
        reasons.append(f"same item viewed {repeat + 1} times")
    gap = float(records["gap_s"][session_from]) * 1000 if session_from > 0 else 0.0
    if gap >= 86_400_000:
        reasons.append(f"returned after {_ago(int(gap))}")
    last_purchase = next((i for i in range(n - 1, -1, -1) if types[i] == PURCHASE), -1)
    if last_purchase >= 0 and now - ts[last_purchase] < 30 * 86_400_000 and len(reasons) < limit:
        reasons.append(f"purchased {_ago(now - ts[last_purchase])} ago")
    if not reasons:
        n_views = session.count(VIEW)
        reasons.append(f"{n_views} product_view this session" if n_views else "browsing")
    return reasons[:limit]


def churn_reasons(state: UserState) -> list[str]:
    records = state.records
    if not len(records):
        return []
    reasons = []
    session_from = int(np.flatnonzero(records["flags"] & FLAG_NEW_SESSION).max(initial=0))
    types = records["type"][session_from:]
    if (types == ADD).any() and not (types == PURCHASE).any():
        reasons.append("left with items in cart")
    n = len(types)
    reasons.append(f"last session {n} event{'s' if n != 1 else ''}")
    starts = records["ts"][records["flags"] & FLAG_NEW_SESSION > 0]
    if len(starts) >= 3:
        gaps = np.diff(starts)
        if gaps[-1] > 1.5 * np.median(gaps[:-1]):
            reasons.append(f"visits slowing: last gap {_ago(int(gaps[-1]))}")
    if not (records["type"] == PURCHASE).any():
        reasons.append("no purchase in recent history")
    return reasons[:3]


__all__ = ["BANDS", "band_of", "churn_reasons", "intent_reasons", "should_emit"]
