"""What the CRM team receives: the emission policy for intent events, bands, and readable reason codes."""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter

import numpy as np
import orjson

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


def bands_of(scores: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
    """``band_of`` of every score (compared as float64, as Python compares its floats)."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.where(scores >= thresholds["high"], 2, np.where(scores >= thresholds["medium"], 1, 0))


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


def ago_keys(ms: np.ndarray) -> np.ndarray:
    """For every m of ``ms`` (non-negative integers) a key of the text ``_ago(m)`` writes: two ages have the same key
    exactly when they have the same text. Found with the same float operations on arrays (an integer below 2**53
    becomes a float exactly, each division is correctly rounded in both, and ``np.rint`` rounds half to even like
    ``round``): the unit in the high bits, the count in the low ones."""
    ms = np.asarray(ms, dtype=np.int64)
    minutes = ms.astype(np.float64) / 60_000
    hours = minutes / 60
    unit = np.where(minutes < 90, 0, np.where(hours < 48, 1, 2))
    count = np.choose(unit, (np.maximum(1.0, np.rint(minutes)), np.rint(hours), np.rint(hours / 24)))
    return (unit.astype(np.int64) << 40) | count.astype(np.int64)


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


# (limit, reason key) -> (reasons, their JSON): a batch's events share a few thousand combinations of reasons at most,
# each made once; cleared past _MAX_REASON_KEYS (counts of days make the keys unbounded).
_REASONS: dict[tuple[int, tuple[int, ...]], tuple[list[str], bytes]] = {}
_MAX_REASON_KEYS = 16_384


def intent_reasons_at(
    windows: list[np.ndarray], ends: Sequence[Sequence[int] | np.ndarray], limit: int = 3
) -> list[list[str]]:
    """``intent_reasons(window[:end])`` for every window and each of its ends (the window as of an event), in
    order, with the same reasons (``intent_reasons_json_at`` gives them as JSON)."""
    return [list(reasons) for reasons, _ in _reasons_at(windows, ends, limit)]


def intent_reasons_json_at(
    windows: list[np.ndarray], ends: Sequence[Sequence[int] | np.ndarray], limit: int = 3
) -> list[bytes]:
    """``orjson.dumps(intent_reasons(window[:end]))`` for every window and each of its ends, in order: the engine's
    path (each distinct list of reasons is written once, not once an event)."""
    return [json for _, json in _reasons_at(windows, ends, limit)]


def _reasons_at(
    windows: list[np.ndarray], ends: Sequence[Sequence[int] | np.ndarray], limit: int
) -> Sequence[tuple[list[str], bytes]]:
    """The reasons of every (window, end), computed for a whole batch at once: the windows laid end to end, one
    prefix sum or prefix maximum per signal, a few integer lookups per event instead of loops over its window; then
    what decides an event's reasons as a row of integers (its key), and each distinct key's reasons made once, with
    no Python step per event (docs/performance.md, thirteenth pass)."""
    if not windows:
        return []
    counts = np.fromiter(map(len, ends), np.int64, len(ends))
    end_in_window = np.concatenate([np.asarray(e, dtype=np.int64) for e in ends])
    # An event that left the window (a user with more new events in one batch than the window holds) has no
    # records before it: no reasons, like intent_reasons of an empty window.
    empty = end_in_window == 0
    records = concat_records(windows)
    sizes = np.array([len(w) for w in windows])
    starts_of = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    seg = np.repeat(np.arange(len(windows)), counts)  # the window of each query
    start = starts_of[seg]
    end = start + np.maximum(end_in_window, 1)  # exclusive
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
    n_add = count_between(types == ADD, recent_from)
    last_checkout = last_where(types == CHECKOUT)
    last_purchase = last_where(types == PURCHASE)
    checkout_open = (last_checkout >= session_from) & (last_purchase < last_checkout)
    n_remove = count_between(types == REMOVE, session_from)
    repeat = count_between((flags & FLAG_SAME_ITEM) > 0, session_from)
    n_views = count_between(types == VIEW, session_from)
    gap_ms = np.trunc(np.where(session_from > start, records["gap_s"][session_from].astype(np.float64) * 1000, 0.0))
    returned = gap_ms >= 86_400_000
    since_purchase = now - ts[np.maximum(last_purchase, 0)]
    purchased = (last_purchase >= start) & (since_purchase < 2_592_000_000)  # 30 days
    # The key: only what changes the reasons (a repeat below 2 says nothing; the views count only when nothing else
    # is said; an age by its text's key, -1 when not said), so that events share keys.
    returned_key = np.full(len(end), -1, dtype=np.int64)
    returned_key[returned] = ago_keys(gap_ms[returned])
    purchased_key = np.full(len(end), -1, dtype=np.int64)
    purchased_key[purchased] = ago_keys(since_purchase[purchased])
    said = (n_add > 0) | checkout_open | (n_remove > 0) | (repeat >= 2) | returned | purchased
    keys = np.stack(
        [
            empty,
            n_add,
            checkout_open,
            n_remove,
            np.where(repeat >= 2, repeat, 0),
            returned_key,
            purchased_key,
            np.where(said, -1, n_views),
        ],
        axis=1,
        dtype=np.int64,
    )
    # The distinct keys (the rows sorted, a new key wherever a row differs from the one before) and which is each
    # event's (np.unique(axis=0) does the same at 8x the cost)
    order = np.lexsort(keys.T[::-1])
    rows = keys[order]
    new = np.ones(len(rows), dtype=bool)
    new[1:] = (rows[1:] != rows[:-1]).any(axis=1)
    which = np.empty(len(rows), dtype=np.int64)
    which[order] = np.cumsum(new) - 1
    first = order[new]  # an event of each distinct key
    if not len(first):
        return []
    cache = _REASONS
    if len(cache) > _MAX_REASON_KEYS:
        cache.clear()
    made = []
    for key, i in zip(map(tuple, keys[first].tolist()), first.tolist(), strict=True):
        got = cache.get((limit, key))
        if got is None:
            reasons = _reasons_of(key, int(gap_ms[i]), int(since_purchase[i]), limit)
            got = cache[(limit, key)] = (reasons, orjson.dumps(reasons))
        made.append(got)
    return [made[which[0]]] if len(which) == 1 else itemgetter(*which.tolist())(made)


def _reasons_of(key: tuple[int, ...], returned_ms: int, purchased_ms: int, limit: int) -> list[str]:
    """The reasons of one key (``_reasons_at``), in ``intent_reasons``' order and words; the ages' texts from the
    milliseconds of one event of the key (all of its events have the same texts)."""
    is_empty, n_add, checkout, n_remove, repeat, returned_key, purchased_key, n_views = key
    if is_empty:
        return []
    reasons = []
    if n_add:
        reasons.append(f"{n_add} add_to_cart in 10 min")
    if checkout:
        reasons.append("checkout_start without purchase")
    if n_remove:
        reasons.append(f"{n_remove} remove_from_cart this session")
    if repeat:
        reasons.append(f"same item viewed {repeat + 1} times")
    if returned_key >= 0:
        reasons.append(f"returned after {_ago(returned_ms)}")
    if purchased_key >= 0 and len(reasons) < limit:
        reasons.append(f"purchased {_ago(purchased_ms)} ago")
    if not reasons:
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


__all__ = [
    "BANDS",
    "band_of",
    "bands_of",
    "churn_reasons",
    "intent_numbers",
    "intent_reasons",
    "intent_reasons_at",
    "intent_reasons_json_at",
    "round_floats",
    "should_emit",
]
