"""Synthetic clickstream with ground truth: contract events, their labels and the simulator's own probabilities.

``intentstream simulate --users N --days D --seed S --out FILE`` writes contract events (JSON lines, gzip when
FILE ends with .gz) sorted by event time, and beside it FILE.truth.jsonl(.gz): one line per event, same order,
with the persona, the labels and the oracle probabilities. docs/simulator.md explains the model; in short:

- Users belong to one of five personas and visit in sessions whose start times follow a non-homogeneous
  Poisson process (a daily rhythm) at least ``MIN_SESSION_GAP_S`` apart; a user stops for good with a
  probability per session that depends on the persona, on how many sessions they had and on how the last one
  ended (its last event, a cart filled within the hour, a long hesitation before leaving); the same things
  scale the return rate. Drifting users come back ever more slowly, with shorter sessions, until they stop.
- Within a session, a Markov chain over (persona, last event type, intent 0-7, cart lines 0-3) draws the next
  event type (or the end of the session), then the gap in whole seconds (a mix of a short geometric and a
  long "hesitation" geometric). Intent moves deterministically with what is observable: +1 per add to cart or
  checkout, -2 for a removal right after an addition (not for one later), -1 for walking away from a
  checkout, -1 for a wishlist save, -1 after a gap longer than ``HESITATION_GAP_S``, -3 after a purchase
  (satisfied; some shop on and buy again). A session starts from the persona's intent plus a bonus for a kept
  cart filled recently (the bonus decays with the time since the last addition).
- The oracle is exact. p_purchase: a dynamic programme over the chain and the remaining seconds of the horizon
  (the geometric gaps make it a linear recursion; sessions are at least an hour apart, so for horizons up to
  an hour only the current session can bring the purchase). p_churn: P(the session ends now) x P(the user
  stops, or the next session starts after the churn window), in closed form from the daily rhythm.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import math
import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from itertools import accumulate, islice
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from stream.contract import EVENT_TYPES, MAX_TS_MS, MIN_TS_MS, TYPE_CODE, Event, validate

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
DEFAULT_START = "2026-01-05T00:00:00+00:00"  # a Monday in the past: output is the same on every run
DEFAULT_HORIZON_S = 3600.0
DEFAULT_CHURN_DAYS = 14.0
MIN_SESSION_GAP_S = 3600  # between one session's last event and the next session's first
HESITATION_GAP_S = 120  # a gap longer than this lowers intent (the user hesitated)
GZIP_LEVEL = 1  # the files are big and written once; level 1 is ~2.5x faster than 6 for ~30 % more bytes

# ---- the event chain ---------------------------------------------------------------------------------

PAGE, SEARCH, VIEW, ADD, REMOVE, WISH, CHECKOUT, PURCHASE = range(8)
END = 8  # move: the session ends (no event)
START = 8  # stage: the session has begun, no event yet
N_MOVES = 9
N_STAGES = 9
N_INTENT = 8
N_CART = 4  # cart lines 0..3; a full cart takes no more additions
assert EVENT_TYPES[PURCHASE] == "purchase" and EVENT_TYPES[REMOVE] == "remove_from_cart"

PERSONAS: tuple[str, ...] = ("window_shopper", "deal_hunter", "decisive_buyer", "loyal_regular", "drifting")
WINDOW, DEAL, DECISIVE, LOYAL, DRIFTING = range(5)


@dataclass(frozen=True)
class Persona:
    share: float  # of the users
    base_intent: int  # intent at the start of a session (before the cart bonus and drift)
    move_weight: dict[int, float]  # multipliers of the chain's move weights
    gap_scale: float  # multiplier of the short gaps' means
    hesitation: float  # propensity for long gaps
    visits_per_day: float  # median session rate (log-normal across users)
    rate_decay: float  # session rate multiplier per past session (drift)
    stop: float  # probability of never coming back after a session ...
    stop_growth: float  # ... plus this per past session
    intent_drift: float  # intent lost per past session (drifting users' sessions shrink)
    price_tier: float  # centre of the price tiers the user shops in (0 cheap .. 4 dear)


PERSONA_PARAMS: tuple[Persona, ...] = (
    # window shopper: slow browsing, category pages and wishlists, rarely buys, often never returns
    Persona(
        share=0.30, base_intent=2, move_weight={PAGE: 2.0, WISH: 4.0, SEARCH: 0.6, ADD: 0.8, END: 0.8},
        gap_scale=1.5, hesitation=1.3, visits_per_day=0.08, rate_decay=1.0, stop=0.40, stop_growth=0.0,
        intent_drift=0.0, price_tier=2.0,
    ),
    # deal hunter: searches, compares cheap items, adds and removes, hesitates a lot
    Persona(
        share=0.20, base_intent=3, move_weight={SEARCH: 3.0, PAGE: 0.5, REMOVE: 3.0, WISH: 0.5},
        gap_scale=1.8, hesitation=1.6, visits_per_day=0.15, rate_decay=1.0, stop=0.18, stop_growth=0.0,
        intent_drift=0.0, price_tier=0.6,
    ),
    # decisive buyer: few fast clicks straight to the cart and the checkout, dear items, rare visits
    Persona(
        share=0.15, base_intent=3, move_weight={VIEW: 0.6, PAGE: 0.5, ADD: 1.6, CHECKOUT: 1.3, WISH: 0.2, END: 1.5},
        gap_scale=0.4, hesitation=0.4, visits_per_day=0.05, rate_decay=1.0, stop=0.22, stop_growth=0.0,
        intent_drift=0.0, price_tier=3.0,
    ),
    # loyal regular: comes back twice a week and buys again
    Persona(
        share=0.20, base_intent=3, move_weight={ADD: 1.1},
        gap_scale=0.8, hesitation=0.8, visits_per_day=0.25, rate_decay=1.0, stop=0.08, stop_growth=0.0,
        intent_drift=0.0, price_tier=2.2,
    ),
    # drifting: starts like a regular; every session the return rate falls 30 %, intent drops, then they stop
    Persona(
        share=0.15, base_intent=3, move_weight={ADD: 1.1},
        gap_scale=1.0, hesitation=1.0, visits_per_day=0.30, rate_decay=0.70, stop=0.06, stop_growth=0.06,
        intent_drift=0.5, price_tier=2.0,
    ),
)  # fmt: skip

# Short-gap mean (seconds) before an event of each type; purchases take the checkout form's time.
SHORT_GAP_S = {
    PAGE: 18.0,
    SEARCH: 14.0,
    VIEW: 32.0,
    ADD: 22.0,
    REMOVE: 16.0,
    WISH: 12.0,
    CHECKOUT: 28.0,
    PURCHASE: 55.0,
}
LONG_GAP_S = 240.0  # mean of a hesitation gap


def _move_weights(persona: int, stage: int, intent: int, cart: int) -> list[float]:
    """Unnormalised probabilities of the next move (8 event types, END) from a state of the chain."""
    x = intent / (N_INTENT - 1)
    x2, lo = x * x, 1.0 - x
    w = [0.0] * N_MOVES
    if stage == START:
        w[PAGE], w[SEARCH], w[VIEW] = 0.15 + 0.5 * lo, 0.10 + 0.25 * x, 0.10 + 0.35 * x  # purpose shows at once
        w[CHECKOUT], w[REMOVE] = 0.02 + 0.3 * x2, 0.03  # back to pay for (or clean up) a kept cart
    elif stage == PAGE:
        w[PAGE], w[SEARCH], w[VIEW], w[END] = 0.22, 0.20, 0.45, 0.06 + 0.30 * lo
    elif stage == SEARCH:
        w[PAGE], w[SEARCH], w[VIEW], w[END] = 0.05, 0.15, 0.70, 0.04 + 0.20 * lo
    elif stage == VIEW:
        w[PAGE], w[SEARCH], w[VIEW] = 0.08, 0.10, 0.55
        w[ADD], w[WISH], w[CHECKOUT], w[END] = 0.02 + 0.40 * x2, 0.02 + 0.06 * lo, 0.01 + 0.15 * x2, 0.05 + 0.22 * lo
    elif stage == ADD:
        w[PAGE], w[SEARCH], w[VIEW] = 0.05, 0.08, 0.35
        w[REMOVE], w[CHECKOUT], w[END] = 0.03 + 0.15 * lo, 0.04 + 0.65 * x2, 0.03 + 0.20 * lo
    elif stage == REMOVE:
        w[PAGE], w[SEARCH], w[VIEW], w[ADD] = 0.10, 0.15, 0.40, 0.12
        w[REMOVE], w[CHECKOUT], w[END] = 0.05, 0.03 + 0.20 * x2, 0.10 + 0.30 * lo
    elif stage == WISH:
        w[PAGE], w[SEARCH], w[VIEW], w[WISH], w[END] = 0.10, 0.15, 0.50, 0.03, 0.12 + 0.25 * lo
    elif stage == CHECKOUT:
        w[PURCHASE], w[PAGE], w[VIEW], w[REMOVE], w[END] = 0.04 + 1.3 * x2, 0.05, 0.10, 0.08 * lo, 0.05 + 0.45 * lo
    else:  # PURCHASE: mostly done; some go on shopping (repeat purchases)
        w[PAGE], w[SEARCH], w[VIEW], w[END] = 0.15, 0.10, 0.20, 0.55
    if cart == 0:
        w[REMOVE] = w[CHECKOUT] = w[PURCHASE] = 0.0
    if cart >= N_CART - 1:
        w[ADD] = 0.0
    for move, factor in PERSONA_PARAMS[persona].move_weight.items():
        w[move] *= factor
    return w


def _next_intent(stage: int, move: int, intent: int, long_gap: bool) -> int:
    """Intent after a move: what the user did, in which order, and whether they hesitated before it."""
    delta = {ADD: 1, CHECKOUT: 1, PURCHASE: -3, WISH: -1}.get(move, 0)
    if move == REMOVE and stage == ADD:
        delta = -2  # regret right after adding; a later clean-up of the cart says little
    if stage == CHECKOUT and move in (PAGE, SEARCH, VIEW, WISH):
        delta -= 1  # walked away from the checkout
    if long_gap:
        delta -= 1
    return min(N_INTENT - 1, max(0, intent + delta))


def _next_cart(move: int, cart: int) -> int:
    if move == ADD:
        return cart + 1
    if move == REMOVE:
        return cart - 1
    return 0 if move == PURCHASE else cart


def state_index(persona: int, stage: int, intent: int, cart: int) -> int:
    return ((persona * N_STAGES + stage) * N_INTENT + intent) * N_CART + cart


N_STATES = len(PERSONAS) * N_STAGES * N_INTENT * N_CART


def _hesitation(persona: int, intent: int) -> float:
    """Probability that the gap before the next event is a long one: low intent hesitates more."""
    return min(0.6, PERSONA_PARAMS[persona].hesitation * (0.04 + 0.22 * (1.0 - intent / (N_INTENT - 1))))


def _gap_q(persona: int, move: int) -> float:
    """Geometric parameter q (P(gap = d s) = (1 - q) q^(d-1)) of the short gap before ``move``."""
    return 1.0 - 1.0 / (SHORT_GAP_S[move] * PERSONA_PARAMS[persona].gap_scale)


LONG_Q = 1.0 - 1.0 / LONG_GAP_S


@dataclass(frozen=True)
class Chain:
    """The chain as flat tables (Python lists for the scalar simulation loop, numpy for the oracle)."""

    prob: np.ndarray  # [S, M] move probabilities
    next_short: np.ndarray  # [S, M] state after the move when the gap was short (END: -1)
    next_long: np.ndarray  # [S, M] ... when the gap exceeded HESITATION_GAP_S
    hesitation: np.ndarray  # [S] probability of a long gap before the next event
    cum: list[list[float]]  # cumulative move probabilities per state (bisect)
    next_short_l: list[list[int]]
    next_long_l: list[list[int]]
    hesitation_l: list[float]
    inv_log_q: list[list[float]]  # [persona][move] 1 / log(q) of the short gap
    inv_log_long_q: float
    p_end: list[float]  # [S] probability that the session ends after an event leaving the chain in S


@lru_cache(maxsize=1)
def build_chain() -> Chain:
    prob = np.zeros((N_STATES, N_MOVES))
    next_short = np.full((N_STATES, N_MOVES), -1, dtype=np.int64)
    next_long = np.full((N_STATES, N_MOVES), -1, dtype=np.int64)
    hesitation = np.zeros(N_STATES)
    for p in range(len(PERSONAS)):
        for stage in range(N_STAGES):
            for k in range(N_INTENT):
                for c in range(N_CART):
                    s = state_index(p, stage, k, c)
                    w = _move_weights(p, stage, k, c)
                    prob[s] = np.array(w) / sum(w)
                    hesitation[s] = _hesitation(p, k)
                    for m in range(8):
                        c2 = _next_cart(m, c)
                        # Defined for every move the cart allows, likely or not: a replay under an assumed
                        # persona may meet a move that has no probability for that persona.
                        if 0 <= c2 < N_CART and not (m == PURCHASE and c == 0):
                            long_ok = stage != START  # a session's first event has no gap before it
                            next_short[s, m] = state_index(p, m, _next_intent(stage, m, k, False), c2)
                            next_long[s, m] = state_index(p, m, _next_intent(stage, m, k, long_ok), c2)
    cum = []
    for s in range(N_STATES):
        acc = np.cumsum(prob[s]).tolist()
        acc[-1] = 1.0  # bisect on random() < 1 always lands on a move with positive probability
        cum.append(acc)
    return Chain(
        prob=prob,
        next_short=next_short,
        next_long=next_long,
        hesitation=hesitation,
        cum=cum,
        next_short_l=next_short.tolist(),
        next_long_l=next_long.tolist(),
        hesitation_l=hesitation.tolist(),
        inv_log_q=[[1.0 / math.log(_gap_q(p, m)) for m in range(8)] for p in range(len(PERSONAS))],
        inv_log_long_q=1.0 / math.log(LONG_Q),
        p_end=prob[:, END].tolist(),
    )


@lru_cache(maxsize=4)
def purchase_oracle(horizon_s: int) -> tuple[float, ...]:
    """P(a purchase within ``horizon_s`` seconds | chain state) for every state, exactly.

    V(s, t) = P(purchase within t s | s). With the next move m and the gap d ~ (1 - h) Geo(q_m) + h Geo(q_L),
    the state after the move depends on d > HESITATION_GAP_S, so V(s, t) = sum_m P(m | s) E_d[V(s'(m, d), t - d)].
    For a geometric gap, A_q(s', t) = E_d[V(s', t - d)] obeys A(t) = (1 - q) V(s', t - 1) + q A(t - 1), and the
    part with d > T equals q^T A(t - T): one pass over t = 1..horizon, vectorised over states. A purchase move
    ends in an absorbing state worth 1; END is worth 0, because the next session starts at least
    MIN_SESSION_GAP_S later (exact for horizons up to that).
    """
    chain = build_chain()
    n_p = len(PERSONAS)
    purchased = N_STATES + np.arange(n_p)  # absorbing, one per persona (its purchase gap differs)
    end_state = N_STATES + n_p
    n_ext = end_state + 1
    dest_short = chain.next_short.copy()
    dest_long = chain.next_long.copy()
    persona_of = np.arange(N_STATES) // (N_STAGES * N_INTENT * N_CART)
    dest_short[:, PURCHASE] = purchased[persona_of]
    dest_long[:, PURCHASE] = purchased[persona_of]
    dest_short[dest_short < 0] = end_state
    dest_long[dest_long < 0] = end_state
    q_short = np.zeros(n_ext)
    stage_of = (np.arange(N_STATES) // (N_INTENT * N_CART)) % N_STAGES
    for s in range(N_STATES):
        q_short[s] = _gap_q(persona_of[s], stage_of[s]) if stage_of[s] != START else 0.5
    for p in range(n_p):
        q_short[purchased[p]] = _gap_q(p, PURCHASE)
    q_short[end_state] = 0.5  # its value is 0 whatever q is
    thr = HESITATION_GAP_S
    qs_thr = q_short**thr
    ql_thr = LONG_Q**thr
    prob, h = chain.prob, chain.hesitation[:, None]
    v_ext = np.zeros(n_ext)
    v_ext[purchased] = 1.0
    a_short = np.zeros(n_ext)
    a_long = np.zeros(n_ext)
    ring_short = np.zeros((thr, n_ext))  # A(t - thr) for the last thr values of t (zero before t = thr)
    ring_long = np.zeros((thr, n_ext))
    qs_thr_s, qs_thr_l = qs_thr[dest_short], qs_thr[dest_long]
    for t in range(1, int(horizon_s) + 1):
        a_short = (1.0 - q_short) * v_ext + q_short * a_short
        a_long = (1.0 - LONG_Q) * v_ext + LONG_Q * a_long
        lag_s, lag_l = ring_short[t % thr], ring_long[t % thr]  # A(t - thr)
        via_short = a_short[dest_short] - qs_thr_s * lag_s[dest_short] + qs_thr_l * lag_s[dest_long]
        via_long = a_long[dest_short] - ql_thr * lag_l[dest_short] + ql_thr * lag_l[dest_long]
        v = (prob * ((1.0 - h) * via_short + h * via_long)).sum(axis=1)
        ring_short[t % thr], ring_long[t % thr] = a_short, a_long
        v_ext = np.concatenate([v, np.ones(n_p), [0.0]])
    return tuple(v_ext[:N_STATES].tolist())


# Outcomes of the item oracle: what the user's next add to cart or purchase will be, seen from a chain state.
SAME, FRESH, BUY, REMOVED, LATER = range(5)  # the item viewed now, a fresh pick, the cart's main line, a removed
# line put back, or nothing in this session (the next session decides)
N_OUTCOMES = 5
VIEWED, PICKED, UNDONE = range(3)  # what `viewed` holds: the item viewed now, a fresh pick (or none), a removed line


@lru_cache(maxsize=1)
def item_outcomes() -> np.ndarray:
    """[N_STATES, 3, N_OUTCOMES]: from a chain state after an event, with ``viewed`` holding the item viewed now
    (VIEWED), a fresh pick or nothing yet (PICKED) or a line just taken out of the cart (UNDONE), the probability
    of each way the session's next add to cart or purchase comes about.

    An add to cart takes the item ``viewed`` holds; a product view picks a fresh item unless it returns to the one
    just seen; a removal puts the cart's last line in ``viewed``; a purchase buys the cart (its main line is the
    event's item). Absorption probabilities of the chain with that flag, by value iteration (sessions are short:
    it converges in well under 200 steps)."""
    chain = build_chain()
    prob, h = chain.prob, chain.hesitation[:, None, None]
    short, long_ = np.maximum(chain.next_short, 0), np.maximum(chain.next_long, 0)  # -1 only where prob is 0
    absorbed = np.zeros((N_STATES, 3, N_OUTCOMES))
    absorbed[:, :, LATER] += prob[:, END, None]
    absorbed[:, :, BUY] += prob[:, PURCHASE, None]
    for flag, outcome in ((VIEWED, SAME), (PICKED, FRESH), (UNDONE, REMOVED)):
        absorbed[:, flag, outcome] += prob[:, ADD]
    v = absorbed.copy()
    for _ in range(200):
        new = absorbed.copy()
        for m in (PAGE, SEARCH, VIEW, REMOVE, WISH, CHECKOUT):
            p = prob[:, m, None, None]
            after = (1.0 - h) * v[short[:, m]] + h * v[long_[:, m]]  # [S, 3, N_OUTCOMES] by the flag after
            if m == VIEW:
                new[:, VIEWED] += p[:, 0] * (REVISIT * after[:, VIEWED] + (1 - REVISIT) * after[:, PICKED])
                new[:, PICKED] += p[:, 0] * after[:, PICKED]
                new[:, UNDONE] += p[:, 0] * (REVISIT * after[:, UNDONE] + (1 - REVISIT) * after[:, PICKED])
            elif m == REMOVE:
                new += p * after[:, UNDONE, None]
            else:
                new += p * after
        done = np.abs(new - v).max() < 1e-12
        v = new
        if done:
            break
    return v


# ---- the daily rhythm and the return process -----------------------------------------------------------

# Relative session-start intensity per UTC hour (night trough, evening peak); normalised to a mean of 1.
_HOURLY_RAW = (0.35, 0.22, 0.15, 0.12, 0.12, 0.18, 0.35, 0.6, 0.85, 1.0, 1.1, 1.2,
               1.3, 1.25, 1.2, 1.2, 1.25, 1.35, 1.55, 1.8, 1.95, 1.85, 1.3, 0.7)  # fmt: skip
HOURLY = tuple(24 * w / sum(_HOURLY_RAW) for w in _HOURLY_RAW)
_HOUR_SHARE = tuple(w / 24 for w in HOURLY)  # share of a day's intensity in each hour
_HOUR_CUM = tuple(sum(_HOUR_SHARE[:h]) for h in range(25))
_HOUR_SHARE_PER_MS = tuple(w / HOUR_MS for w in _HOUR_SHARE)


def cumulative_intensity(ts_ms: int) -> float:
    """Integral of the daily-rhythm intensity from the epoch to ``ts_ms``, in days (1 per calendar day)."""
    day, rem = divmod(ts_ms, DAY_MS)
    hour, rest = divmod(rem, HOUR_MS)
    return day + _HOUR_CUM[hour] + rest / HOUR_MS * _HOUR_SHARE[hour]


def _inverse_intensity(level: float) -> int:
    day = math.floor(level)
    frac = level - day
    hour = min(23, max(0, bisect.bisect_right(_HOUR_CUM, frac) - 1))
    rest = (frac - _HOUR_CUM[hour]) / _HOUR_SHARE[hour] * HOUR_MS
    return int(day * DAY_MS + hour * HOUR_MS + min(rest, HOUR_MS - 1))


def next_session_start(rng: random.Random, after_ms: int, rate_per_day: float) -> int:
    """First arrival after ``after_ms`` of a Poisson process with intensity rate x the daily rhythm."""
    level = cumulative_intensity(after_ms) + -math.log(1.0 - rng.random()) / rate_per_day
    return max(after_ms, _inverse_intensity(level))


def _end_factors(stage: int, intent: int, cart: int) -> tuple[float, float]:
    """(stop multiplier, rate multiplier) from the chain state a session ends in: buyers come back, a kept cart
    pulls the user back, a session that fizzled out at low intent or right after a removal or a wishlist save
    drives them away. ``_leave_factors`` adds what only the event times show."""
    stop, rate = 1.0, 1.0
    if stage == PURCHASE:
        stop, rate = 0.3, 1.5
    if cart:
        stop, rate = stop * 0.8, rate * (1.0 + 0.2 * cart)
    if intent <= 1:
        stop, rate = stop * 2.0, rate * 0.7
    if stage in (REMOVE, WISH):
        stop *= 1.8
    return stop, rate


def _leave_factors(cart: int, since_add_ms: int, long_gap: bool) -> tuple[float, float]:
    """(stop, rate) multipliers from timing: leaving with a cart filled within the hour brings the user back
    soon (the reminder e-mail works; a cart filled days ago does little), and leaving after a long hesitation
    means they lost interest."""
    stop, rate = 1.0, 1.0
    if cart:
        if since_add_ms < HOUR_MS:
            stop, rate = 0.4, 2.5
        elif since_add_ms < DAY_MS:
            rate = 1.5
    if long_gap:
        stop, rate = stop * 1.6, rate * 0.7
    return stop, rate


# ---- the catalog --------------------------------------------------------------------------------------

# name, median price, log-normal sigma
CATEGORIES: tuple[tuple[str, float, float], ...] = (
    ("electronics.smartphone", 320.0, 0.55),
    ("electronics.audio", 85.0, 0.8),
    ("computers.notebook", 820.0, 0.4),
    ("computers.peripherals", 45.0, 0.7),
    ("appliances.kitchen", 120.0, 0.7),
    ("apparel.shoes", 75.0, 0.5),
    ("apparel.clothing", 38.0, 0.6),
    ("beauty.skincare", 24.0, 0.6),
    ("furniture.living_room", 260.0, 0.7),
    ("home.decor", 32.0, 0.8),
    ("sports.fitness", 55.0, 0.8),
    ("kids.toys", 28.0, 0.7),
    ("books", 16.0, 0.4),
    ("grocery.snacks", 7.5, 0.5),
    ("auto.accessories", 42.0, 0.8),
    ("garden.tools", 58.0, 0.7),
)
N_TIERS = 5
ITEMS_PER_TIER = 60
DEVICES = ("mobile", "desktop", "tablet")
DEVICE_CUM = (0.6, 0.92, 1.0)
QUANTITY_CUM = (0.8, 0.95, 1.0)  # 1, 2 or 3 units


def _zipf_cum(n: int, s: float) -> list[float]:
    w = [1.0 / (r + 1) ** s for r in range(n)]
    total = sum(w)
    acc, out = 0.0, []
    for x in w:
        acc += x / total
        out.append(acc)
    out[-1] = 1.0
    return out


_TASTE_CUM = _zipf_cum(len(CATEGORIES), 1.3)

# Item structure. A tier's 60 items form 6 clusters of 10 that are viewed and bought together; item g * 10 + r
# of the catalog (g = category * 30 + tier * 6 + k) is the r-th most popular of cluster g. Each cluster has a
# complement: the same tier and slot in the paired category (0-1, 2-3, ...: phones and audio, notebooks and
# peripherals, ...). A user has a few favourite clusters; a session has one focus cluster (a favourite, or now and
# then a new one); a fresh pick of an item comes from the focus, its complement, a favourite or anywhere.
CLUSTER_SIZE = 10
ITEMS_PER_CATEGORY = N_TIERS * ITEMS_PER_TIER
CLUSTERS_PER_TIER = ITEMS_PER_TIER // CLUSTER_SIZE
CLUSTERS_PER_CATEGORY = N_TIERS * CLUSTERS_PER_TIER
N_CLUSTERS = len(CATEGORIES) * CLUSTERS_PER_CATEGORY
N_ITEMS = N_CLUSTERS * CLUSTER_SIZE
FAVOURITE_WEIGHTS = (0.4, 0.25, 0.2, 0.15)  # a user's favourite clusters (duplicates merge)
EXPLORE = 0.2  # probability that a session's focus is any cluster of the catalog (not a favourite)
PICK_SHARES = (0.65, 0.15, 0.12, 0.08)  # fresh pick from: the focus, its complement, a favourite, any item
PICK_CUM = (0.65, 0.80, 0.92, 1.0)
_FAVOURITE_CUM = [*list(accumulate(FAVOURITE_WEIGHTS))[:-1], 1.0]
PAGE_FOCUS = 0.6  # a page view or search shows the focus cluster's category, else one drawn from the taste
REVISIT = 0.25  # a product view returns to the item just seen
_RANK_CUM = _zipf_cum(CLUSTER_SIZE, 1.1)
RANK_P = np.diff([0.0, *_RANK_CUM])  # popularity of the r-th item of a cluster
TASTE_P = np.diff([0.0, *_TASTE_CUM])  # probability of the r-th category of a user's taste order


def complement(cluster: int) -> int:
    """The cluster bought with ``cluster``: same tier and slot, paired category (an involution)."""
    category, rest = divmod(cluster, CLUSTERS_PER_CATEGORY)
    return (category ^ 1) * CLUSTERS_PER_CATEGORY + rest


_COMPLEMENT = np.array([complement(g) for g in range(N_CLUSTERS)])
ORACLE_TOP = 10  # items of the item oracle's ranking written per event
# Breaks ties between equally likely items by catalog position, far below the 4 decimals written.
_TIE_BREAK = np.arange(N_ITEMS) * 1e-15


def _catalog(seed: int) -> tuple[list[list[float]], list[list[str]]]:
    """Per category: N_TIERS x ITEMS_PER_TIER items, prices log-normal and sorted into tiers; within a tier,
    consecutive runs of CLUSTER_SIZE items are the clusters, each in popularity order."""
    rng = random.Random(f"{seed}:catalog")
    prices, ids = [], []
    for c, (_name, median, sigma) in enumerate(CATEGORIES):
        draws = sorted(round(median * math.exp(rng.gauss(0.0, sigma)), 2) for _ in range(N_TIERS * ITEMS_PER_TIER))
        tiers = [draws[t * ITEMS_PER_TIER : (t + 1) * ITEMS_PER_TIER] for t in range(N_TIERS)]
        for tier in tiers:
            rng.shuffle(tier)
        prices.append([max(0.5, p) for tier in tiers for p in tier])
        ids.append([f"sku-{c:02d}-{i:04d}" for i in range(N_TIERS * ITEMS_PER_TIER)])
    return prices, ids


def item_rankings(state: np.ndarray, favourites: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The item oracle for a batch of events: (items [n, ORACLE_TOP] as catalog positions, -1 past the end;
    probabilities [n, ORACLE_TOP]) of being the user's next add to cart or purchase given that there is one, best
    first.

    ``state`` [n, 8] holds ``_UserItems.state`` rows, ``favourites`` [n, 4] the user's favourite clusters.
    P(next = x) = P(SAME)[x viewed now] + P(FRESH) q_focus(x) + P(BUY)[x the cart's main line] + P(REMOVED)[x its
    last line] + P(LATER) P(comes back) (the next session's own outcomes, its picks by q_next). The outcome
    probabilities are ``item_outcomes`` at the event's state; q_focus is a fresh pick's distribution in this
    session, q_next its average over the next session's focus. Approximations: a second removal is taken to put
    back the same line, the cart's main line is the current one, and every later session is taken to start like
    the next one would an hour from now (its intent, cart and chance of coming back after it). Only the focus, the favourites, their
    complements and the items the state points at can reach the top: any other item's chance is the uniform part
    alone, which is smaller than any of theirs at the same popularity rank."""
    n = len(state)
    outcomes = item_outcomes()
    focus, s, flag = (state[:, j].astype(np.int64) for j in range(3))
    specials = state[:, 3:6].astype(np.int64)  # viewed, the cart's main line, its last line; -1 for none
    keep, next_start = state[:, 6], state[:, 7].astype(np.int64)
    now = outcomes[s, flag]
    # Later sessions: each starts like the next one and the user comes back after it as after this one (a geometric
    # series over sessions that end without an addition).
    start = outcomes[next_start, PICKED]
    later = start * (now[:, LATER] * keep / (1.0 - start[:, LATER] * keep))[:, None]
    w_fresh, w_next = now[:, FRESH], later[:, FRESH]
    extra = np.stack([now[:, SAME], now[:, BUY] + later[:, BUY], now[:, REMOVED] + later[:, REMOVED]], axis=1)
    share_focus, share_complement, share_favourite, share_any = PICK_SHARES
    fav_w = np.array(FAVOURITE_WEIGHTS)
    slots = np.concatenate([focus[:, None], _COMPLEMENT[focus][:, None], favourites, _COMPLEMENT[favourites]], axis=1)

    def favourite_weight(clusters: np.ndarray) -> np.ndarray:
        return ((clusters[:, :, None] == favourites[:, None, :]) * fav_w).sum(axis=2)

    fav, fav_of_complement = favourite_weight(slots), favourite_weight(_COMPLEMENT[slots])
    q_focus = (
        share_focus * (slots == focus[:, None]) + share_complement * (slots == slots[:, 1:2]) + share_favourite * fav
    )
    q_next = (1 - EXPLORE) * (share_focus * fav + share_complement * fav_of_complement) + share_favourite * fav
    cluster_w = w_fresh[:, None] * q_focus + w_next[:, None] * q_next
    for j in range(1, slots.shape[1]):  # a cluster listed twice counts once
        cluster_w[(slots[:, :j] == slots[:, j : j + 1]).any(axis=1), j] = -np.inf
    # the parts every item has: an explored focus (any cluster, by popularity rank) and a pick of any item
    explored = w_next * EXPLORE * (share_focus + share_complement) / N_CLUSTERS
    anything = (w_fresh + w_next) * share_any / N_ITEMS
    score = (cluster_w[:, :, None] + explored[:, None, None]) * RANK_P + anything[:, None, None]
    cand = np.concatenate(
        [
            (slots[:, :, None] * CLUSTER_SIZE + np.arange(CLUSTER_SIZE)).reshape(n, slots.shape[1] * CLUSTER_SIZE),
            specials,
        ],
        1,
    )
    special_base = explored[:, None] * RANK_P[np.maximum(specials, 0) % CLUSTER_SIZE] + anything[:, None]
    score = np.concatenate([score.reshape(n, slots.shape[1] * CLUSTER_SIZE), special_base], axis=1)
    score -= _TIE_BREAK[np.maximum(cand, 0)]
    rows = np.arange(n)
    for j in range(specials.shape[1]):  # its weight goes to the item's first column; later copies are dropped
        is_it = (cand == specials[:, j, None]) & (specials[:, j, None] >= 0)
        first = np.argmax(is_it, axis=1)
        has = is_it[rows, first]
        score[rows[has], first[has]] += extra[has, j]
        is_it[rows, first] = False
        score[is_it] = -np.inf
    score[:, -specials.shape[1] :][specials < 0] = -np.inf
    top = np.argpartition(-score, ORACLE_TOP, axis=1)[:, :ORACLE_TOP]
    top_score = np.take_along_axis(score, top, axis=1)
    order = np.argsort(-top_score, axis=1, kind="stable")
    items = np.take_along_axis(np.take_along_axis(cand, top, axis=1), order, axis=1)
    p = np.take_along_axis(top_score, order, axis=1)
    items[~np.isfinite(p)] = -1
    # Given that an add to cart or a purchase follows (where the ranking is judged).
    p /= (now[:, SAME] + now[:, FRESH] + now[:, BUY] + now[:, REMOVED] + later[:, :LATER].sum(axis=1))[:, None]
    return items, np.where(np.isfinite(p), np.maximum(p, 0.0), 0.0)


def _rankings_json(items: np.ndarray, p: np.ndarray, item_ids: list[list[str]]) -> list[str]:
    """``item_rankings`` as the truth file's ``next_items``: ``[["sku-03-0126",0.3121],...]`` (4 decimals)."""
    prefix = [f'["{i}",' for ids in item_ids for i in ids]
    decimals = _P_TEXT
    ks = np.rint(p * 10_000).astype(np.int64).tolist()
    return [
        "[" + ",".join([prefix[x] + decimals[k] for x, k in zip(row, k_row, strict=True) if k > 0 and x >= 0]) + "]"
        for row, k_row in zip(items.tolist(), ks, strict=True)
    ]


_P_TEXT = [f"{k / 10_000!r}]" for k in range(10_001)]


# ---- one user -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    seed: int
    start_ms: int
    end_ms: int
    horizon_ms: int
    churn_ms: int


def _carry_bonus(cart: int, since_add_ms: int) -> int:
    """Intent a kept cart adds at a session's start: much for an addition hours ago, nothing after 3 days."""
    if not cart:
        return 0
    if since_add_ms < 6 * HOUR_MS:
        return 3
    if since_add_ms < DAY_MS:
        return 2
    return 1 if since_add_ms < 3 * DAY_MS else 0


def session_start_intent(persona: int, sessions: int, cart: int, since_add_ms: int) -> int:
    """Intent at the start of a user's session number ``sessions`` (0 for the first) with ``cart`` lines kept in the
    cart, the last of them added ``since_add_ms`` ago: the persona's base intent, less its drift per past session,
    plus the kept cart's bonus, clipped to 0..N_INTENT - 1. The simulator and both replays start sessions here."""
    pp = PERSONA_PARAMS[persona]
    intent = pp.base_intent - int(pp.intent_drift * sessions) + _carry_bonus(cart, since_add_ms)
    return min(N_INTENT - 1, max(0, intent))


@dataclass
class _UserItems:
    """What the item oracle needs of one user: per event (session's focus, chain state, `viewed` flag, viewed
    item, the cart's main line, its last line, P(comes back after this event), the next session's start state),
    items as catalog positions (category * ITEMS_PER_CATEGORY + item, -1 for none), and the favourite clusters."""

    state: list[tuple[int, int, int, int, int, int, float, int]]
    favourites: list[int]


def _simulate_user(
    u: int, params: Params, chain: Chain, oracle: tuple[float, ...], catalog: tuple[list[list[float]], list[list[str]]]
) -> tuple[int, list[tuple], _UserItems]:
    """(persona, events, item state) of user ``u``: events as tuples (ts, type, session, category, item, price,
    quantity, p_purchase, p_churn, p_churn_session_end), in the user's time order, and what the item oracle needs
    (``item_rankings``)."""
    rng = random.Random(f"{params.seed}:user:{u}")
    # Item choices beyond the three uniforms a fresh pick has always drawn come from a stream of their own, so
    # the event chain (types, times, labels, the purchase and churn oracles) is what it was without items.
    item_rand = random.Random(f"{params.seed}:items:{u}").random
    rand = rng.random
    log = math.log
    prices, _ids = catalog
    r = rand()
    persona = 0
    acc = PERSONA_PARAMS[0].share
    while r >= acc and persona < len(PERSONAS) - 1:
        persona += 1
        acc += PERSONA_PARAMS[persona].share
    pp = PERSONA_PARAMS[persona]
    rate0 = pp.visits_per_day * math.exp(rng.gauss(0.0, 0.45))
    taste = list(range(len(CATEGORIES)))
    rng.shuffle(taste)
    centre = min(N_TIERS - 1.0, max(0.0, rng.gauss(pp.price_tier, 0.7)))
    tier_w = [math.exp(-1.5 * abs(t - centre)) for t in range(N_TIERS)]
    tier_cum = [sum(tier_w[: t + 1]) / sum(tier_w) for t in range(N_TIERS)]
    tier_cum[-1] = 1.0
    cum, nxt_s, nxt_l, hes, p_end = chain.cum, chain.next_short_l, chain.next_long_l, chain.hesitation_l, chain.p_end
    inv_log_q, inv_log_long = chain.inv_log_q[persona], chain.inv_log_long_q
    bis = bisect.bisect_right
    end_ms, churn_ms = params.end_ms, params.churn_ms
    return_window = churn_ms > MIN_SESSION_GAP_S * 1000
    end_factors, exp = _END_FACTORS, math.exp

    def window_intensity(t: int) -> float:
        """Intensity integral over [t + MIN_SESSION_GAP, t + churn window] (cumulative_intensity twice, inline)."""
        day_a, rest_a = divmod(t + churn_ms, DAY_MS)
        hour_a, ms_a = divmod(rest_a, HOUR_MS)
        day_b, rest_b = divmod(t + MIN_SESSION_GAP_S * 1000, DAY_MS)
        hour_b, ms_b = divmod(rest_b, HOUR_MS)
        return (
            (day_a - day_b)
            + _HOUR_CUM[hour_a]
            - _HOUR_CUM[hour_b]
            + ms_a * _HOUR_SHARE_PER_MS[hour_a]
            - ms_b * _HOUR_SHARE_PER_MS[hour_b]
        )

    def favourite_cluster() -> int:
        """A cluster by the category taste and the price tier, any slot of the tier."""
        c = taste[bis(_TASTE_CUM, item_rand())]
        return (c * N_TIERS + bis(tier_cum, item_rand())) * CLUSTERS_PER_TIER + int(item_rand() * CLUSTERS_PER_TIER)

    favourites = [favourite_cluster() for _ in FAVOURITE_WEIGHTS]  # a repeat adds up the weights
    focus = favourites[0]

    def pick_item() -> tuple[int, int, float]:
        where, rank, which = rand(), rand(), rand()
        if where < PICK_CUM[0]:
            g, r = focus, bis(_RANK_CUM, rank)
        elif where < PICK_CUM[1]:
            g, r = complement(focus), bis(_RANK_CUM, rank)
        elif where < PICK_CUM[2]:
            g, r = favourites[bis(_FAVOURITE_CUM, which)], bis(_RANK_CUM, rank)
        else:  # anything in the catalog, uniformly
            g, r = int(item_rand() * N_CLUSTERS), int(rank * CLUSTER_SIZE)
        c, slot = divmod(g, CLUSTERS_PER_CATEGORY)
        i = slot * CLUSTER_SIZE + r
        return c, i, prices[c][i]

    if rand() < 0.7:  # a customer already: their process is running when the period starts
        t = next_session_start(rng, params.start_ms, rate0)
    else:  # a newcomer: arrives at a uniform time, first visit shaped by the daily rhythm
        t = next_session_start(rng, params.start_ms + int(rand() * (end_ms - params.start_ms)), 4.0)
    events: list[tuple] = []
    cart: list[list] = []  # lines [category, item, price, quantity]
    # per event: (session's focus, state, `viewed` flag, viewed item, cart's main line, cart's last line,
    # P(comes back), the next session's start state); see item_rankings
    item_state: list[tuple[int, int, int, int, int, int, float, int]] = []
    last_add_ms = t
    session = 0
    while t < end_ms:
        s = state_index(persona, START, session_start_intent(persona, session, len(cart), t - last_add_ms), len(cart))
        viewed: tuple[int, int, float] | None = None
        x = item_rand()
        focus = int(item_rand() * N_CLUSTERS) if x < EXPLORE else favourites[bis(_FAVOURITE_CUM, item_rand())]
        stop_p = min(0.95, pp.stop + pp.stop_growth * session)
        rate = rate0 * pp.rate_decay**session
        first = True
        while True:
            move = bis(cum[s], rand())
            if move == END:
                break
            if first:
                first, long_gap = False, False
            else:
                if rand() < hes[s]:
                    d = 1 + int(log(1.0 - rand()) * inv_log_long)
                else:
                    d = 1 + int(log(1.0 - rand()) * inv_log_q[move])
                t += d * 1000
                long_gap = d > HESITATION_GAP_S
            if t >= end_ms:
                break
            s = nxt_l[s][move] if long_gap else nxt_s[s][move]
            cat = item = price = qty = None
            if move == VIEW:
                if viewed is None or rand() >= REVISIT:
                    viewed = pick_item()
                cat, item, price = viewed
            elif move in (PAGE, SEARCH):
                x = rand()
                cat = (
                    focus // CLUSTERS_PER_CATEGORY
                    if x < PAGE_FOCUS
                    else taste[bis(_TASTE_CUM, (x - PAGE_FOCUS) / (1 - PAGE_FOCUS))]
                )
            elif move == ADD:
                if viewed is None:
                    viewed = pick_item()
                cat, item, price = viewed
                qty = 1 + bis(QUANTITY_CUM, rand())
                cart.append([cat, item, price, qty])
                last_add_ms = t
            elif move == REMOVE:
                cat, item, price, qty = cart.pop()
                viewed = (cat, item, price)
            elif move == WISH:
                if viewed is None:
                    viewed = pick_item()
                cat, item, price = viewed
            elif move == CHECKOUT:
                price = round(sum(line[2] * line[3] for line in cart), 2)
                qty = sum(line[3] for line in cart)
            else:  # PURCHASE: one order for the whole cart; price x quantity is the order value
                main = max(cart, key=lambda line: line[2] * line[3])
                cat, item = main[0], main[1]
                qty = sum(line[3] for line in cart)
                price = round(sum(line[2] * line[3] for line in cart) / qty, 2)
                cart.clear()
            # Churn oracle: the session ends now, then the user stops or stays away past the churn window.
            stop_f, rate_f = end_factors[s]
            if long_gap or cart:
                leave_stop, leave_rate = _leave_factors(len(cart), t - last_add_ms, long_gap)
                stop_f, rate_f = stop_f * leave_stop, rate_f * leave_rate
            p_stop = min(0.98, stop_p * stop_f)
            stay_away = exp(-rate * rate_f * window_intensity(t)) if return_window else 1.0
            q_churn = p_stop + (1.0 - p_stop) * stay_away
            events.append((t, move, session, cat, item, price, qty, oracle[s], p_end[s] * q_churn, q_churn))
            if cart:
                main = max(cart, key=lambda line: line[2] * line[3])
                main_item, last_item = (
                    main[0] * ITEMS_PER_CATEGORY + main[1],
                    cart[-1][0] * ITEMS_PER_CATEGORY + cart[-1][1],
                )
            else:
                main_item = last_item = -1
            next_intent = session_start_intent(
                persona, session + 1, len(cart), t + MIN_SESSION_GAP_S * 1000 - last_add_ms
            )
            item_state.append(
                (
                    focus,
                    s,
                    PICKED if viewed is None else VIEWED,
                    -1 if viewed is None else viewed[0] * ITEMS_PER_CATEGORY + viewed[1],
                    main_item,
                    last_item,
                    1.0 - p_stop,
                    state_index(persona, START, next_intent, len(cart)),
                )
            )
        if t >= end_ms:
            break
        # stop_f and rate_f are still those of the session's last event, which the oracle used
        if rand() < min(0.98, stop_p * stop_f):
            break
        t = next_session_start(rng, t + MIN_SESSION_GAP_S * 1000, rate * rate_f)
        session += 1
    return persona, events, _UserItems(item_state, favourites)


_END_FACTORS: list[tuple[float, float]] = [  # by chain state
    _end_factors((s // (N_INTENT * N_CART)) % N_STAGES, (s // N_CART) % N_INTENT, s % N_CART) for s in range(N_STATES)
]


def _followed_by_cart(events: list[tuple]) -> list[bool]:
    """Per event of one user: whether a later event is an add to cart or a purchase."""
    out = [False] * len(events)
    seen = False
    for i in range(len(events) - 1, -1, -1):
        out[i] = seen
        seen = seen or events[i][1] in (ADD, PURCHASE)
    return out


def _truth_labels(
    events: list[tuple], horizon_ms: int, churn_ms: int, end_ms: int
) -> list[tuple[int | None, int | None, float | None]]:
    """Labels of one user's events from the simulator's side (a backward scan; training/labels.py is the
    vectorised version the trainer uses, and the tests check that both agree)."""
    out: list[tuple[int | None, int | None, float | None]] = [(None, None, None)] * len(events)
    next_buy_ts: int | None = None
    next_buy_value: float | None = None
    next_ts: int | None = None
    for i in range(len(events) - 1, -1, -1):
        ts, move = events[i][0], events[i][1]
        if next_buy_ts is not None and next_buy_ts - ts <= horizon_ms:
            label_purchase: int | None = 1
            value = next_buy_value
        else:
            label_purchase, value = (None if ts + horizon_ms > end_ms else 0), None
        if next_ts is not None and next_ts - ts <= churn_ms:
            label_churn: int | None = 0
        else:
            label_churn = None if ts + churn_ms > end_ms else 1
        out[i] = (label_purchase, label_churn, value)
        if move == PURCHASE:
            next_buy_ts, next_buy_value = ts, events[i][5] * events[i][6]
        next_ts = ts
    return out


# ---- the whole population -----------------------------------------------------------------------------


def parse_start(text: str) -> int:
    """Epoch milliseconds of an ISO date or date-time (UTC unless it names a zone)."""
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--start: {text!r} is not an ISO-8601 date (example: 2026-01-05T00:00:00Z)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


DEFAULT_START_MS = parse_start(DEFAULT_START)


@dataclass
class _Run:
    """Everything generated, sorted by event time: rows are (ts, user, seq, type, session, category, item,
    price, quantity, p_purchase, p_churn, p_churn_session_end, label_purchase, label_churn, order_value,
    next_items: the item oracle's JSON)."""

    params: Params
    rows: list[tuple]
    personas: list[int]
    devices: list[int]
    item_ids: list[list[str]]


def _generate(
    users: int,
    days: float,
    seed: int,
    start_ms: int,
    horizon_s: float,
    churn_days: float,
    progress: bool,
) -> _Run:
    if users < 1:
        raise ValueError("users: at least 1")
    if days <= 0:
        raise ValueError("days: must be positive")
    if horizon_s <= 0 or churn_days <= 0:
        raise ValueError("horizon and churn window: must be positive")
    from tqdm import tqdm

    params = Params(
        seed=seed,
        start_ms=start_ms,
        end_ms=start_ms + round(days * DAY_MS),
        horizon_ms=round(horizon_s * 1000),
        churn_ms=round(churn_days * DAY_MS),
    )
    if not (params.start_ms >= MIN_TS_MS and params.end_ms <= MAX_TS_MS):
        raise ValueError("start and days: the period must lie between the years 2000 and 2100 (the contract's range)")
    chain = build_chain()
    oracle = purchase_oracle(params.horizon_ms // 1000)  # gaps are whole seconds: t_j <= t_i + H iff sum <= H // 1s
    catalog = _catalog(seed)
    rows: list[tuple] = []
    personas: list[int] = []
    devices: list[int] = []
    pending: list[tuple[int, list[tuple], _UserItems]] = []

    def flush() -> None:
        """Rank the items for the pending users' events at once (the oracle is vectorised) and add their rows."""
        if not pending:
            return
        # Only events that some later add to cart or purchase of the user follows have anything to rank against.
        ranked = [has for _, events, _ in pending for has in _followed_by_cart(events)]
        state = np.array([row for _, _, items in pending for row in items.state], dtype=np.float64)[ranked]
        counts = [len(items.state) for _, _, items in pending]
        favourites = np.repeat(np.array([items.favourites for _, _, items in pending]), counts, axis=0)[ranked]
        found = iter(_rankings_json(*item_rankings(state, favourites), catalog[1]))
        rankings = iter([next(found) if has else "null" for has in ranked])
        for u, events, _ in pending:
            labels = _truth_labels(events, params.horizon_ms, params.churn_ms, params.end_ms)
            rows.extend(
                (e[0], u, seq, *e[1:], *lab, next(rankings))
                for seq, (e, lab) in enumerate(zip(events, labels, strict=True))
            )
        pending.clear()

    waiting = 0
    for u in tqdm(range(users), desc="simulate", unit=" users", file=sys.stderr, disable=not progress):
        persona, events, items = _simulate_user(u, params, chain, oracle, catalog)
        personas.append(persona)
        devices.append(bisect.bisect_right(DEVICE_CUM, random.Random(f"{seed}:device:{u}").random()))
        if events:
            pending.append((u, events, items))
            waiting += len(events)
        if waiting >= 20_000:
            flush()
            waiting = 0
    flush()
    rows.sort()  # (ts, user, seq) is unique: ties in time go by user, then by the user's own order
    return _Run(params, rows, personas, devices, catalog[1])


def _user_id(u: int) -> str:
    return f"u{u:07d}"


_LABEL_JSON = {None: "null", 0: "0", 1: "1"}


def _json_lines(run: _Run) -> Iterator[tuple[str, str]]:
    """(contract event, truth record) as JSON text per row, in file order.

    Formatted by hand rather than through dicts and orjson: it halves the cost of the writing phase. Every
    string written is one of ours (ids, type, category and device names: no characters that need escaping)
    and every number is an int or a finite float whose repr is valid JSON.
    """
    user_part: dict[int, tuple[str, str, str]] = {}
    type_names = EVENT_TYPES
    cat_names = [c[0] for c in CATEGORIES]
    item_ids = run.item_ids
    labels = _LABEL_JSON
    for ts, u, seq, move, session, cat, item, price, qty, pp, pc, pce, lp, lc, ov, next_items in run.rows:
        known = user_part.get(u)
        if known is None:
            known = user_part[u] = (
                f'"user_id":"{_user_id(u)}"',
                f',"device":"{DEVICES[run.devices[u]]}","schema":1}}',
                f'"persona":"{PERSONAS[run.personas[u]]}"',
            )
        user_json, tail_json, persona_json = known
        event_id = f"ev-{u:07d}-{seq:05d}"
        if item is not None:
            item_json = f',"item_id":"{item_ids[cat][item]}","category":"{cat_names[cat]}"'
        elif cat is not None:
            item_json = f',"category":"{cat_names[cat]}"'
        else:
            item_json = ""
        price_json = "" if price is None else f',"price":{price!r}'
        qty_json = "" if qty is None else f',"quantity":{qty}'
        yield (
            f'{{"event_id":"{event_id}",{user_json},"type":"{type_names[move]}","ts":{ts},'
            f'"session_id":"ss-{u:07d}-{session:04d}"{item_json}{price_json}{qty_json}{tail_json}',
            f'{{"event_id":"{event_id}",{user_json},{persona_json},"label_purchase":{labels[lp]},'
            f'"label_churn":{labels[lc]},"p_purchase":{round(pp, 6)!r},"p_churn":{round(pc, 6)!r},'
            f'"p_churn_session_end":{round(pce, 6)!r},"order_value":{"null" if ov is None else repr(round(ov, 2))},'
            f'"next_items":{next_items}}}',
        )


# ---- public API ---------------------------------------------------------------------------------------


@dataclass
class Simulation:
    """Events in file order and their truth records (same order), plus the period they cover."""

    events: list[Event]
    truth: list[dict[str, Any]]
    start_ms: int
    end_ms: int  # exclusive: events lie in [start_ms, end_ms); labels are censored against it
    horizon_ms: int
    churn_ms: int


def simulate(
    users: int,
    days: float,
    seed: int,
    *,
    start_ms: int = DEFAULT_START_MS,
    horizon_s: float = DEFAULT_HORIZON_S,
    churn_days: float = DEFAULT_CHURN_DAYS,
    progress: bool = False,
) -> Simulation:
    """Simulate in memory: the same events and truth that ``write_simulation`` writes for these arguments."""
    run = _generate(users, days, seed, start_ms, horizon_s, churn_days, progress)
    events, truth = [], []
    loads = orjson.loads
    for event_json, truth_json in _json_lines(run):
        e = loads(event_json)
        events.append(
            Event(
                e["event_id"],
                e["user_id"],
                e["type"],
                e["ts"],
                e["session_id"],
                e.get("item_id"),
                e.get("category"),
                e.get("price"),
                e.get("quantity"),
                e["device"],
            )
        )
        truth.append(loads(truth_json))
    p = run.params
    return Simulation(events, truth, p.start_ms, p.end_ms, p.horizon_ms, p.churn_ms)


def replay_states(events: Sequence[Event], personas: Mapping[str, str] | None = None) -> np.ndarray:
    """The chain state after each event (``state_index``), replayed from the visible events alone.

    Events in any order that keeps each user's own order (a simulator file does). ``personas``: user_id ->
    persona name; users without one are replayed as loyal regulars (what a model that cannot see the persona
    might assume). With the true personas the replay is exact: ``purchase_oracle(H)[state]`` is the truth
    file's p_purchase, which shows that the oracle uses nothing but the persona and what the events show.
    """
    chain = build_chain()
    users: dict[str, list[Any]] = {}  # user -> [persona, session_id, sessions, cart, last_add_ms, prev_ms, state]
    out = np.zeros(len(events), dtype=np.int64)
    for i, e in enumerate(events):
        u = users.get(e.user_id)
        if u is None:
            persona = PERSONAS.index(personas.get(e.user_id, "loyal_regular") if personas else "loyal_regular")
            u = users[e.user_id] = [persona, None, -1, 0, e.ts, e.ts, 0]
        persona, session_id, sessions, cart, last_add_ms, prev_ms, s = u
        move = TYPE_CODE[e.type]
        if e.session_id != session_id:
            sessions += 1
            s = state_index(persona, START, session_start_intent(persona, sessions, cart, e.ts - last_add_ms), cart)
            long_gap = False
        else:
            long_gap = (e.ts - prev_ms) // 1000 > HESITATION_GAP_S
        s = int((chain.next_long if long_gap else chain.next_short)[s, move])
        if s < 0:
            raise ValueError(f"event {e.event_id}: a {e.type} is impossible here (not a simulator trace?)")
        cart, last_add_ms = _cart_after(move, cart, last_add_ms, e.ts)
        users[e.user_id] = [persona, e.session_id, sessions, cart, last_add_ms, e.ts, s]
        out[i] = s
    return out


def _cart_after(move: int, cart: int, last_add_ms: int, ts: int) -> tuple[int, int]:
    """(cart lines, time of the last addition) after a visible move: what a replay knows of the cart."""
    if move == ADD:
        return cart + 1, ts
    if move == REMOVE:
        return cart - 1, last_add_ms
    if move == PURCHASE:
        return 0, last_add_ms
    return cart, last_add_ms


def state_parts(states: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(persona, stage, intent, cart lines) of chain states."""
    states = np.asarray(states)
    return (
        states // (N_STAGES * N_INTENT * N_CART),
        (states // (N_INTENT * N_CART)) % N_STAGES,
        (states // N_CART) % N_INTENT,
        states % N_CART,
    )


# ---- the best any model can do without the persona ----------------------------------------------------

_REST_OF_PERIOD_DAYS = 7.0  # a newcomer's first visit comes within hours of arriving (rate 4/day): 7 days is plenty
_RATE_SIGMA = 0.45  # spread (log-normal sigma) of a user's base session rate around the persona's median
_RATE_NODES = 24  # Gauss-Hermite nodes over that spread


@dataclass(frozen=True)
class PersonaReplay:
    """Every user's events replayed once per persona (``replay_every_persona``); arrays in event order.

    ``before[i, k]``/``after[i, k]``: the chain state under persona k from which event i's move was drawn (a
    START state at a session's first event) and the state after it. The rest does not depend on the persona:
    the user (first-seen order), the session's number, whether the event opens its session, the index of the
    user's previous event (-1), the gap before it in whole seconds (0 at a session's first event: it has none),
    whether that gap was a hesitation, and after the event the cart lines and the time since the last addition.
    """

    before: np.ndarray  # int64 [N, P]
    after: np.ndarray  # int64 [N, P]
    move: np.ndarray  # int64 [N]
    user: np.ndarray  # int64 [N]
    session: np.ndarray  # int64 [N]
    first: np.ndarray  # bool [N]
    prev: np.ndarray  # int64 [N]
    gap_s: np.ndarray  # int64 [N]
    long_gap: np.ndarray  # bool [N]
    cart: np.ndarray  # int64 [N]
    since_add_ms: np.ndarray  # int64 [N]
    ts: np.ndarray  # int64 [N]
    opening: np.ndarray  # int64 [N]: the index of the first event of the event's session


def replay_every_persona(events: Sequence[Event]) -> PersonaReplay:
    """``replay_states`` for all personas at once, keeping what a likelihood of the events needs."""
    chain = build_chain()
    nxt_s, nxt_l = chain.next_short_l, chain.next_long_l
    n_p = len(PERSONAS)
    users: dict[str, list[Any]] = {}  # user -> [index, session_id, sessions, cart, last_add_ms, prev_ms, prev_i,
    # states, the session's first event]
    before: list[int] = []
    after: list[int] = []
    cols: list[tuple[int, int, int, bool, int, int, bool, int, int, int]] = []
    for i, e in enumerate(events):
        u = users.get(e.user_id)
        if u is None:
            u = users[e.user_id] = [len(users), None, -1, 0, e.ts, e.ts, -1, [0] * n_p, i]
        index, session_id, sessions, cart, last_add_ms, prev_ms, prev_i, states, opening = u
        move = TYPE_CODE[e.type]
        first = e.session_id != session_id
        if first:
            sessions, opening = sessions + 1, i
            since_add_ms = e.ts - last_add_ms
            pre = [
                state_index(k, START, session_start_intent(k, sessions, cart, since_add_ms), cart) for k in range(n_p)
            ]
            gap, long_gap = 0, False
        else:
            pre = states
            gap = (e.ts - prev_ms) // 1000
            long_gap = gap > HESITATION_GAP_S
        table = nxt_l if long_gap else nxt_s
        post = [table[s][move] for s in pre]
        if post[0] < 0:  # the cart decides this, whatever the persona
            raise ValueError(f"event {e.event_id}: a {e.type} is impossible here (not a simulator trace?)")
        cart, last_add_ms = _cart_after(move, cart, last_add_ms, e.ts)
        before.extend(pre)
        after.extend(post)
        cols.append((move, index, sessions, first, prev_i, gap, long_gap, cart, e.ts - last_add_ms, opening))
        users[e.user_id] = [index, e.session_id, sessions, cart, last_add_ms, e.ts, i, post, opening]
    n = len(events)
    c = np.array(cols, dtype=np.int64).reshape(n, 10)
    return PersonaReplay(
        before=np.array(before, dtype=np.int64).reshape(n, n_p),
        after=np.array(after, dtype=np.int64).reshape(n, n_p),
        move=c[:, 0],
        user=c[:, 1],
        session=c[:, 2],
        first=c[:, 3].astype(bool),
        prev=c[:, 4],
        gap_s=c[:, 5],
        long_gap=c[:, 6].astype(bool),
        cart=c[:, 7],
        since_add_ms=c[:, 8],
        ts=np.array([e.ts for e in events], dtype=np.int64),
        opening=c[:, 9],
    )


def _user_cumsum(terms: np.ndarray, user: np.ndarray) -> np.ndarray:
    """Running sum of ``terms`` (rows in event order) over each user's own rows; -inf stays -inf."""
    order = np.argsort(user, kind="stable")
    t = terms[order]
    impossible = np.isneginf(t).astype(np.int64)
    t = np.where(impossible > 0, 0.0, t)
    u = user[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    lengths = np.diff(np.r_[starts, len(u)])
    total = np.cumsum(t, axis=0)
    offset = np.repeat(total[starts] - t[starts], lengths, axis=0)
    count = np.cumsum(impossible, axis=0)
    count_offset: np.ndarray = np.repeat(count[starts] - impossible[starts], lengths, axis=0)
    out = np.empty_like(terms)
    out[order] = np.where(count > count_offset, -np.inf, total - offset)
    return out


def _in_session_terms(r: PersonaReplay) -> np.ndarray:
    """log P(event i's move, and its gap | persona k, the user's earlier events) [N, P], plus at a session's first
    event log P(END) of the previous session's last state: a later session shows that that one ended."""
    chain = build_chain()
    n_p = len(PERSONAS)
    with np.errstate(divide="ignore"):
        log_prob = np.log(chain.prob)
    terms = log_prob[r.before, r.move[:, None]]
    inside = ~r.first
    # gap ~ h Geo(q_long) + (1 - h) Geo(q_short(persona, move)), P(d) = (1 - q) q^(d - 1), d >= 1 s
    d = r.gap_s[inside][:, None].astype(np.float64)
    h = chain.hesitation[r.before[inside]]
    q = np.array([[_gap_q(k, m) for m in range(8)] for k in range(n_p)])  # [P, 8]
    q_m = q[:, r.move[inside]].T  # [n, P]
    long_part = np.log(h) + math.log(1.0 - LONG_Q) + (d - 1.0) * math.log(LONG_Q)
    short_part = np.log1p(-h) + np.log1p(-q_m) + (d - 1.0) * np.log(q_m)
    terms[inside] += np.logaddexp(long_part, short_part)
    ended = r.first & (r.prev >= 0)
    terms[ended] += log_prob[r.after[r.prev[ended]], END]
    return terms


def _intensity(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``cumulative_intensity`` (days) and its slope (per ms) at epoch-ms times, vectorised."""
    ts = np.asarray(ts, dtype=np.int64)
    day, rem = np.divmod(ts, DAY_MS)
    hour, rest = np.divmod(rem, HOUR_MS)
    share = np.array(_HOUR_SHARE)[hour]
    return day + np.array(_HOUR_CUM)[hour] + rest / HOUR_MS * share, share / HOUR_MS


def _newcomer_density(t0: np.ndarray, start_ms: int, end_ms: int) -> np.ndarray:
    """Density (per ms) of a newcomer's first session at ``t0``: arrival uniform over the period, then the first
    point of a Poisson process of rate 4/day x the daily rhythm (as ``_simulate_user`` draws it)."""
    rate = 4.0
    level0, slope0 = _intensity(t0)
    total = np.zeros(len(t0))
    a1 = t0.astype(np.int64)
    a0 = np.maximum(a1 - a1 % HOUR_MS, start_ms)
    for _ in range(int(_REST_OF_PERIOD_DAYS * 24) + 1):
        width = np.maximum(a1 - a0, 0)
        level1, slope = _intensity(np.maximum(a1 - 1, start_ms))  # the hour of the segment [a0, a1)
        level_a1 = level1 + slope  # Λ(a1) (a1 - 1 is 1 ms before it, in the same hour)
        total += np.exp(-rate * (level0 - level_a1)) * -np.expm1(-rate * slope * width) / (rate * slope)
        a1 = a0
        a0 = np.maximum(a1 - HOUR_MS, start_ms)
    return total * rate * slope0 / (end_ms - start_ms)


def _between_session_terms(r: PersonaReplay, start_ms: int, end_ms: int) -> np.ndarray:
    """log P(the user's visits so far | persona k) [N, P], the base rate integrated out: the first session's time
    (a customer's first visit after the period starts, or a newcomer's), then per later session that the user
    did not stop after the previous one and came back at this time, at the persona's rate x the session-end
    factors (``_end_factors``, ``_leave_factors``) x the drift, from an hour after the previous session's end."""
    n_p = len(PERSONAS)
    nodes, weights = np.polynomial.hermite_e.hermegauss(_RATE_NODES)
    log_w = np.log(weights / weights.sum())
    median = np.array([pp.visits_per_day for pp in PERSONA_PARAMS])
    rate0 = median[:, None] * np.exp(_RATE_SIGMA * nodes)[None, :]  # [P, G]
    rows = np.flatnonzero(r.first)
    level, slope = _intensity(r.ts[rows])
    terms = np.zeros((len(rows), n_p, _RATE_NODES))
    opening = r.session[rows] == 0
    o = rows[opening]
    # first session: P(customer) 0.7 x a customer's first visit, or 0.3 x a newcomer's
    level_start, _ = _intensity(np.array([start_ms]))
    wait = (level[opening] - level_start[0])[:, None, None]
    customer = rate0[None] * slope[opening][:, None, None] * np.exp(-rate0[None] * wait)
    newcomer = _newcomer_density(r.ts[o], start_ms, end_ms)[:, None, None]
    terms[opening] = np.log(0.7 * customer + 0.3 * newcomer)
    later = ~opening
    lr = rows[later]
    p = r.prev[lr]  # the previous session's last event
    j = r.session[p][:, None]  # its number
    end_stop = np.array([f[0] for f in _END_FACTORS])[r.after[p]]  # [n, P]
    end_rate = np.array([f[1] for f in _END_FACTORS])[r.after[p]]
    leave = [
        _leave_factors(int(c), int(s), bool(g))
        for c, s, g in zip(r.cart[p], r.since_add_ms[p], r.long_gap[p], strict=True)
    ]
    leave_stop = np.array([f[0] for f in leave])[:, None]
    leave_rate = np.array([f[1] for f in leave])[:, None]
    stop = np.array([pp.stop for pp in PERSONA_PARAMS])
    growth = np.array([pp.stop_growth for pp in PERSONA_PARAMS])
    decay = np.array([pp.rate_decay for pp in PERSONA_PARAMS])
    p_stop = np.minimum(0.98, np.minimum(0.95, stop + growth * j) * end_stop * leave_stop)  # [n, P]
    rate = rate0[None] * (decay[None] ** j * end_rate * leave_rate)[:, :, None]  # [n, P, G]
    level_back, _ = _intensity(r.ts[p] + MIN_SESSION_GAP_S * 1000)
    wait = (level[later] - level_back)[:, None, None]
    terms[later] = np.log1p(-p_stop)[:, :, None] + np.log(rate * slope[later][:, None, None]) - rate * wait
    # running sum over each user's sessions, then the base rate integrated out; every event gets its session's
    cum = _user_cumsum(terms.reshape(len(rows), -1), r.user[rows]).reshape(terms.shape)
    top = cum.max(axis=2, keepdims=True)
    per_session = top[:, :, 0] + np.log(np.exp(cum - top + log_w).sum(axis=2))  # [sessions, P]
    return per_session[np.searchsorted(rows, r.opening)]


def persona_posterior(
    events: Sequence[Event], *, between_sessions: bool = False, start_ms: int = DEFAULT_START_MS, end_ms: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(chain state [N, P] after each event under each persona, posterior P(persona | the user's events up to and
    including this one) [N, P]), events in any order that keeps each user's own order.

    The likelihood is the simulator's own chain: each move's probability from the state it was drawn in, each
    gap's under the mixture of the move's short geometric and the long hesitation geometric (a session's first
    event has none), and the END of every session that a later one of the same user shows to have ended. It is
    causal: an event's posterior uses that event and the user's earlier ones only, so a session cut by the end of
    the period never counts as ended. With ``between_sessions`` it also uses the visits themselves (when each
    session started, and that the user came back at all: ``_between_session_terms``), which needs the period
    (``start_ms``, ``end_ms``). It ignores the items and prices, which carry a little of the persona too.
    """
    r = replay_every_persona(events)
    loglik = _user_cumsum(_in_session_terms(r), r.user)
    if between_sessions:
        if end_ms <= start_ms:
            raise ValueError("between_sessions: give the simulated period (start_ms < end_ms)")
        loglik = loglik + _between_session_terms(r, start_ms, end_ms)
    nowhere = np.flatnonzero(np.isneginf(loglik).all(axis=1))
    if len(nowhere):  # a persona that cannot make a move gets weight 0; here none could
        e = events[int(nowhere[0])]
        raise ValueError(f"event {e.event_id}: impossible under every persona (not a simulator trace?)")
    logw = loglik + np.log([pp.share for pp in PERSONA_PARAMS])
    logw -= logw.max(axis=1, keepdims=True)
    w = np.exp(logw)
    return r.after, w / w.sum(axis=1, keepdims=True)


def persona_posterior_purchase(
    events: Sequence[Event],
    horizon_s: int = int(DEFAULT_HORIZON_S),
    *,
    between_sessions: bool = False,
    start_ms: int = DEFAULT_START_MS,
    end_ms: int = 0,
) -> np.ndarray:
    """P(a purchase within ``horizon_s`` | the user's events so far) for a predictor that knows the simulator's
    chain but not the persona: sum over personas of the posterior (``persona_posterior``) x the oracle at the
    state the events replay to under that persona.

    Why: the oracle (the truth file's p_purchase) knows each user's hidden persona; a model sees only events. This
    Bayes predictor is what a model that had learnt the chain perfectly could reach from the same events, so its
    gap to the oracle is an achievable figure for any event-only model (not a floor: it leaves out the items and
    prices, and without ``between_sessions`` the visit times). With a persona's posterior at 1 it is that
    persona's replay, which for the true persona is exactly the oracle (``replay_states``).
    """
    states, posterior = persona_posterior(events, between_sessions=between_sessions, start_ms=start_ms, end_ms=end_ms)
    oracle = np.array(purchase_oracle(int(horizon_s)))
    return (posterior * oracle[states]).sum(axis=1)


def truth_path(path: str | Path) -> Path:
    """Where the truth file of an events file goes: x.jsonl -> x.truth.jsonl, x.jsonl.gz -> x.truth.jsonl.gz."""
    path = Path(path)
    name = path.name
    for suffix in (".jsonl.gz", ".jsonl", ".gz"):
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            return path.with_name(base + (".truth.jsonl.gz" if suffix.endswith(".gz") else ".truth.jsonl"))
    return path.with_name(name + ".truth.jsonl")


@contextmanager
def _writer(path: Path, gz: bool) -> Iterator[IO[bytes]]:
    with open(path, "wb") as raw:
        if not gz:
            yield raw
            return
        # No file name and a zero mtime in the header: the same arguments give the same bytes.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=GZIP_LEVEL, mtime=0) as f:
            yield f  # type: ignore[misc]  # GzipFile is a binary IO at runtime


def write_simulation(
    out: str | Path,
    users: int,
    days: float,
    seed: int,
    *,
    start_ms: int = DEFAULT_START_MS,
    horizon_s: float = DEFAULT_HORIZON_S,
    churn_days: float = DEFAULT_CHURN_DAYS,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the events file and its truth file; return the summary (counts, rates, speed)."""
    from tqdm import tqdm

    out = Path(out)
    truth_out = truth_path(out)
    started = time.perf_counter()
    run = _generate(users, days, seed, start_ms, horizon_s, churn_days, progress)
    tmp_events, tmp_truth = out.with_name(out.name + ".part"), truth_out.with_name(truth_out.name + ".part")
    gz = out.name.endswith(".gz")
    with _writer(tmp_events, gz) as f_events, _writer(tmp_truth, gz) as f_truth:
        bar = tqdm(total=len(run.rows), desc="write", unit=" events", file=sys.stderr, disable=not progress)
        lines = _json_lines(run)
        while chunk := list(islice(lines, 20_000)):
            f_events.write(("\n".join([c[0] for c in chunk]) + "\n").encode())
            f_truth.write(("\n".join([c[1] for c in chunk]) + "\n").encode())
            bar.update(len(chunk))
        bar.close()
    tmp_events.replace(out)
    tmp_truth.replace(truth_out)
    seconds = time.perf_counter() - started
    return _summary(run, seconds, out, truth_out)


def _rate(values: list[int | None]) -> tuple[int, int, float | None]:
    known = [v for v in values if v is not None]
    positives = sum(known)
    return len(known), positives, (positives / len(known) if known else None)


def _summary(run: _Run, seconds: float, out: Path | None, truth_out: Path | None) -> dict[str, Any]:
    rows, p = run.rows, run.params
    # Base rates over events whose whole label window lies in the period: censoring keeps the late positives of
    # purchase and the late negatives of churn, so rates over all non-null labels are biased.
    n_p, pos_p, rate_p = _rate([r[12] for r in rows if r[0] + p.horizon_ms <= p.end_ms])
    n_c, pos_c, rate_c = _rate([r[13] for r in rows if r[0] + p.churn_ms <= p.end_ms])
    type_counts = [0] * 8
    for r in rows:
        type_counts[r[3]] += 1
    persona_counts = [0] * len(PERSONAS)
    for persona in run.personas:
        persona_counts[persona] += 1
    return {
        "events": len(rows),
        "users": len(run.personas),
        "active_users": len({r[1] for r in rows}),
        "seed": p.seed,
        "start_ms": p.start_ms,
        "end_ms": p.end_ms,
        "horizon_s": p.horizon_ms / 1000,
        "churn_days": p.churn_ms / DAY_MS,
        "seconds": round(seconds, 3),
        "events_per_s": round(len(rows) / seconds, 1) if seconds > 0 else None,
        "purchase_labelled": sum(r[12] is not None for r in rows),
        "purchase_window_inside": n_p,
        "purchase_positives": pos_p,
        "purchase_positive_rate": rate_p,
        "churn_labelled": sum(r[13] is not None for r in rows),
        "churn_window_inside": n_c,
        "churn_positives": pos_c,
        "churn_positive_rate": rate_c,
        "event_types": dict(zip(EVENT_TYPES, type_counts, strict=True)),
        "personas": dict(zip(PERSONAS, persona_counts, strict=True)),
        "out": None if out is None else str(out),
        "truth": None if truth_out is None else str(truth_out),
    }


def _open_read(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def read_events(path: str | Path) -> Iterator[Event]:
    """Contract events of a JSON-lines file (.gz ok), validated like the engine's ingest (no key check).
    Raises ValueError naming the file, line and reason at the first invalid line."""
    path = Path(path)
    with _open_read(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            event = validate(line, check_key=False, max_bytes=max(len(line), 1))
            if not isinstance(event, Event):
                raise ValueError(f"{path}:{lineno}: invalid event: {event}")
            yield event


def read_truth(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a truth file (see ``truth_path``)."""
    with _open_read(Path(path)) as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


# ---- command line -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, required=True, help="number of users")
    parser.add_argument("--days", type=float, required=True, help="length of the simulated period in days")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same arguments give the same bytes")
    parser.add_argument("--out", type=Path, required=True, help="events file (.jsonl, or .jsonl.gz for gzip)")
    parser.add_argument(
        "--start", default=DEFAULT_START, help=f"start of the period, ISO-8601 (default {DEFAULT_START})"
    )
    parser.add_argument(
        "--horizon-s", type=float, default=DEFAULT_HORIZON_S, help="purchase label horizon in seconds (default 3600)"
    )
    parser.add_argument(
        "--churn-days", type=float, default=DEFAULT_CHURN_DAYS, help="churn label window in days (default 14)"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write a JSON summary here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, settings: Any) -> int:
    try:
        start_ms = parse_start(args.start)
    except ValueError as exc:
        print(f"intentstream simulate: {exc}", file=sys.stderr)
        return 2
    if args.users < 1 or args.days <= 0 or args.horizon_s <= 0 or args.churn_days <= 0:
        print("intentstream simulate: --users, --days, --horizon-s and --churn-days must be positive", file=sys.stderr)
        return 2
    if args.horizon_s > MIN_SESSION_GAP_S:
        print(
            f"intentstream simulate: warning: p_purchase counts purchases of the current session only; with a "
            f"horizon over {MIN_SESSION_GAP_S} s a later session could add some, so it is a lower bound",
            file=sys.stderr,
        )
    if not args.out.parent.is_dir():
        raise FileNotFoundError(f"{args.out.parent}: no such directory")
    try:
        summary = write_simulation(
            args.out,
            args.users,
            args.days,
            args.seed,
            start_ms=start_ms,
            horizon_s=args.horizon_s,
            churn_days=args.churn_days,
            progress=not args.no_progress,
        )
    except ValueError as exc:  # a period outside the contract's years
        print(f"intentstream simulate: {exc}", file=sys.stderr)
        return 2
    print(
        f"{summary['events']} events of {summary['users']} users in {summary['seconds']:.1f} s "
        f"({summary['events_per_s']:.0f} events/s) -> {summary['out']} and {summary['truth']}; "
        f"purchase positives {_pct(summary['purchase_positive_rate'])}, "
        f"churn positives {_pct(summary['churn_positive_rate'])}"
    )
    if args.json:
        args.json.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f} %"
