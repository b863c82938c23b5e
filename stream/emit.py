"""What the CRM team receives: the emission policy for intent events, bands, and readable reason codes."""

from __future__ import annotations

import numpy as np

from models.features import FLAG_NEW_SESSION, FLAG_SAME_ITEM, concat_records
from stream.contract import SCORE_DIGITS, TYPE_CODE, VALUE_DIGITS
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


def round_floats(values: np.ndarray, ndigits: int) -> list[float]:
    """``[round(v, ndigits) for v in values]``: the same floats, in a few array passes (``round`` with digits costs
    about a microsecond a call, three calls an intent event).

    Why it is the same: ``round`` rounds v's exact decimal value to an integer k of 10**-n, then returns the double
    nearest to k / 10**n. Here k = rint(s) with s = v * 10**n rounded to a double, which is off from the exact product
    by at most half an ulp: below 1e9 that is under 1.2e-7, so k can differ only when s lies within that of a half,
    and values within 1e-6 of one take ``round`` itself. k / 10**n is then one IEEE division of two exact doubles
    (k < 2**53, and 10**n for n <= 22), the nearest double to the quotient, as ``round`` returns. Non-finite, huge
    and other-digit values take ``round`` too."""
    values = np.asarray(values, dtype=np.float64)
    if not 0 <= ndigits <= 22:
        return [round(float(v), ndigits) for v in values]
    scale = 10.0**ndigits
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = values * scale
        out: list[float] = (np.rint(scaled) / scale).tolist()
        near_half = np.abs(np.abs(scaled - np.trunc(scaled)) - 0.5) < 1e-6
        doubt = near_half | ~(np.abs(scaled) < 1e9)  # NaN and inf fail the comparison
    for i in np.flatnonzero(doubt).tolist():
        out[i] = round(float(values[i]), ndigits)
    return out


def intent_numbers(probs: np.ndarray) -> list[tuple[float, float, float]]:
    """The (score, expected order value, order value if purchase) of intent events from their [purchase, churn, value]
    rows, rounded as ``contract.intent_record`` rounds them (its ``rounded``), for a whole batch at once."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, 3)
    score, value = probs[:, 0], probs[:, 2]
    columns = (
        round_floats(score, SCORE_DIGITS),
        round_floats(score * value, VALUE_DIGITS),
        round_floats(value, VALUE_DIGITS),
    )
    return list(zip(*columns, strict=True))


def _ago(ms: int) -> str:
    minutes = ms / 60_000
    if minutes < 90:
        return f"{max(1, round(minutes))} min"
    hours = minutes / 60
    return f"{round(hours)} h" if hours < 48 else f"{round(hours / 24)} days"


_AGO_TEXTS: dict[tuple[str, int], str] = {}  # (template, unit code << 40 | count) -> text; cleared past 4,096


def ago_texts(template: str, ms: np.ndarray) -> list[str]:
    """``template.format(_ago(m))`` for every m of ``ms`` (non-negative integers), the same texts: which text an age
    gets is found with the same float operations on arrays (an integer below 2**53 becomes a float exactly, each
    division is correctly rounded in both, and ``np.rint`` rounds half to even like ``round``), and each distinct
    text is made once, by ``_ago``. A batch's reasons said "returned after ..." for 80% of its events, at about 1 us
    each, the costliest line of ``intent_reasons_at``."""
    ms = np.asarray(ms, dtype=np.int64)
    minutes = ms.astype(np.float64) / 60_000
    hours = minutes / 60
    unit = np.where(minutes < 90, 0, np.where(hours < 48, 1, 2))
    count = np.choose(unit, (np.maximum(1.0, np.rint(minutes)), np.rint(hours), np.rint(hours / 24)))
    keys = ((unit.astype(np.int64) << 40) | count.astype(np.int64)).tolist()
    if len(_AGO_TEXTS) > 4096:  # bounded: counts of days are not
        _AGO_TEXTS.clear()
    out = []
    for key, m in zip(keys, ms.tolist(), strict=True):
        text = _AGO_TEXTS.get((template, key))
        if text is None:
            text = _AGO_TEXTS[(template, key)] = template.format(_ago(m))
        out.append(text)
    return out


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


def intent_reasons_at(windows: list[np.ndarray], ends: list[list[int]], limit: int = 3) -> list[list[str]]:
    """``intent_reasons(window[:end])`` for every window and each of its ends (the window as of an event), in
    order, with the same reasons, computed for a whole batch at once: the windows laid end to end, one prefix
    sum or prefix maximum per signal, then a few integer lookups per event instead of loops over its window."""
    if not windows:
        return []
    # An event that left the window (a user with more new events in one batch than the window holds) has no
    # records before it: no reasons, like intent_reasons of an empty window.
    empty = [e == 0 for es in ends for e in es]
    ends = [[max(e, 1) for e in es] for es in ends]
    records = concat_records(windows)
    sizes = np.array([len(w) for w in windows])
    starts_of = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    counts = np.array([len(e) for e in ends])
    seg = np.repeat(np.arange(len(windows)), counts)  # the window of each query
    start = starts_of[seg]
    end = start + np.concatenate([np.asarray(e, dtype=np.int64) for e in ends])  # exclusive
    ts, types, flags = records["ts"], records["type"], records["flags"]
    idx = np.arange(len(records))

    def last_where(mask: np.ndarray) -> np.ndarray:  # per query: last index < end where mask holds, else -1
        return np.maximum.accumulate(np.where(mask, idx, -1))[end - 1]

    def count_between(mask: np.ndarray, lo: np.ndarray) -> np.ndarray:  # per query: mask's count in [lo, end)
        cum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        return cum[end] - cum[lo]

    session_from = np.maximum(last_where((flags & FLAG_NEW_SESSION) > 0), start)
    now = ts[end - 1]
    # Ten minutes back: each window is in event-time order, so a sort key of (window, time) finds the first event
    # at or after the cutoff in every window with one search.
    tmin = int(ts.min())
    window_of = np.repeat(np.arange(len(windows), dtype=np.int64), sizes)
    key = (window_of << 42) | (ts - tmin)
    cutoff = np.maximum(now - 600_000 - tmin, 0)
    recent_from = np.minimum(np.searchsorted(key, (seg.astype(np.int64) << 42) | cutoff), end)
    n_add_recent = count_between(types == ADD, recent_from).tolist()
    last_checkout = last_where(types == CHECKOUT)
    last_purchase = last_where(types == PURCHASE)
    checkout_open = ((last_checkout >= session_from) & (last_purchase < last_checkout)).tolist()
    n_remove = count_between(types == REMOVE, session_from).tolist()
    repeat = count_between((flags & FLAG_SAME_ITEM) > 0, session_from).tolist()
    n_views = count_between(types == VIEW, session_from).tolist()
    gap_ms = np.where(session_from > start, records["gap_s"][session_from].astype(np.float64) * 1000, 0.0)
    returned = gap_ms >= 86_400_000
    returned_text = iter(ago_texts("returned after {}", np.trunc(gap_ms[returned])))
    since_purchase = now - ts[np.maximum(last_purchase, 0)]
    purchased = (last_purchase >= start) & (since_purchase < 2_592_000_000)  # 30 days
    purchased_text = iter(ago_texts("purchased {} ago", since_purchase[purchased]))
    out: list[list[str]] = []
    append = out.append
    columns = (empty, n_add_recent, checkout_open, n_remove, repeat, returned.tolist(), purchased.tolist(), n_views)
    for is_empty, n_add, checkout, n_rem, rep, gap_long, purchase_recent, views in zip(*columns, strict=True):
        # the texts of both ages are taken in query order, used or not
        returned_after = next(returned_text) if gap_long else None
        purchased_ago = next(purchased_text) if purchase_recent else None
        if is_empty:
            append([])
            continue
        reasons = []
        if n_add:
            reasons.append(f"{n_add} add_to_cart in 10 min")
        if checkout:
            reasons.append("checkout_start without purchase")
        if n_rem:
            reasons.append(f"{n_rem} remove_from_cart this session")
        if rep >= 2:
            reasons.append(f"same item viewed {rep + 1} times")
        if returned_after is not None:
            reasons.append(returned_after)
        if purchased_ago is not None and len(reasons) < limit:
            reasons.append(purchased_ago)
        if not reasons:
            reasons.append(f"{views} product_view this session" if views else "browsing")
        append(reasons[:limit] if len(reasons) > limit else reasons)
    return out


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


__all__ = [
    "BANDS",
    "band_of",
    "churn_reasons",
    "intent_numbers",
    "intent_reasons",
    "intent_reasons_at",
    "round_floats",
    "should_emit",
]
