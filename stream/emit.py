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
    """Short reasons a CRM user can read, from the user's window (newest event last)."""
    if not len(records):
        return []
    now = int(records["ts"][-1])
    types = records["type"]
    recent = records["ts"] >= now - 600_000
    reasons: list[str] = []
    session_from = int(np.flatnonzero(records["flags"] & FLAG_NEW_SESSION).max(initial=0))
    session = slice(session_from, None)
    n_add_recent = int(((types == ADD) & recent).sum())
    if n_add_recent:
        reasons.append(f"{n_add_recent} add_to_cart in 10 min")
    checkouts = np.flatnonzero(types[session] == CHECKOUT)
    if len(checkouts) and not (types[session][checkouts[-1] :] == PURCHASE).any():
        reasons.append("checkout_start without purchase")
    if (types[session] == REMOVE).any():
        reasons.append(f"{int((types[session] == REMOVE).sum())} remove_from_cart this session")
    repeat = int((records["flags"][session] & FLAG_SAME_ITEM > 0).sum())
    if repeat >= 2:
        reasons.append(f"same item viewed {repeat + 1} times")
    gap = float(records["gap_s"][session_from]) * 1000 if session_from > 0 else 0.0
    if gap >= 86_400_000:
        reasons.append(f"returned after {_ago(int(gap))}")
    purchases = np.flatnonzero(types == PURCHASE)
    if len(purchases) and now - int(records["ts"][purchases[-1]]) < 30 * 86_400_000 and len(reasons) < limit:
        reasons.append(f"purchased {_ago(now - int(records['ts'][purchases[-1]]))} ago")
    if not reasons:
        n_views = int((types[session] == VIEW).sum())
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
