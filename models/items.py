"""Item suggestions: the item model's artifact, and the batch lookup that serving calls with users' windows.

The model (trained by ``intentstream train-items``, training/train_items.py) is a sparse top-N neighbour table of
item-to-item similarities plus a popularity list for users and items it knows nothing about. Artifacts live in
``<items_dir>/v<NNNN>-items/{items.safetensors, manifest.json}`` and are published like the scorer's
(models/artifact.py): a hidden folder renamed into place, the sha256 of the arrays in the manifest, no pickle.

The engine's window keeps each event's item as the crc32 of its id (``models.features._crc``), so the table is
keyed by those codes, sorted for ``np.searchsorted``; the id strings ride along for the output and the reasons.
Two ids with the same crc32 are rare (among 40k ids, a collision somewhere has a chance of about 1 in 5) and
the window cannot tell them apart, so the trainer makes them one item, named after the more frequent id; the
manifest counts such collisions.

``suggest`` takes the windows of a whole batch of users and is vectorised over the batch: a window's items, weighted
by event type and recency, are expanded through the neighbour table and summed per (user, item); the top k per
user come out of a sort of the few candidates near each user's best. No dense item x item matrix is ever built.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from itertools import repeat
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson
from orjson import Fragment
from safetensors.numpy import load_file, save_file

from models.artifact import MANIFEST, ArtifactError, publish, read_manifest, sha256_file, verify_sha256
from models.artifact import list_versions as artifact_versions
from stream import contract
from stream.contract import TYPE_CODE

ARRAYS = "items.safetensors"
FORMAT_VERSION = 1
KIND = "items"
_DIR_RE = re.compile(r"^v(\d{4,})-items$")
_REQUIRED = ("codes", "id_bytes", "id_offsets", "indptr", "neighbours", "weights", "popular", "popularity")
PURCHASE = TYPE_CODE["purchase"]
SEEN = "seen recently"  # the reason of an item the window holds itself
POPULAR = "popular"  # the reason of a fallback item


@dataclass(frozen=True)
class ItemConfig:
    """How a window is read at serving time (the model's own defaults are in its manifest)."""

    k: int = 5  # suggestions per user
    half_life_s: float = 7 * 86_400.0  # an item seen a week before the user's latest event counts half
    position_decay: float = 0.85  # and each later item event in the window multiplies its weight by this ...
    self_weight: float = 1.0  # an item seen counts for itself like a neighbour of similarity 1 (cosine) ...
    self_decay: float = 0.97  # ... with a slower decay: what the user looked at lately stays a candidate
    neighbours: int = 10  # of each window item, the best this many (the table holds more; 20 did no better)
    min_weight: float = 0.01  # window items weighted less than this are ignored (a long window's far end)
    fallback: bool = True  # fill up to k with popular items (cold users, unknown items)
    # weight of an event of each type in the window (types without an item carry none)
    view: float = 1.0
    cart: float = 2.0  # a line in the cart is often what is bought next
    wishlist: float = 1.0
    removal: float = 0.3
    purchase: float = 0.5

    def type_weights(self) -> np.ndarray:
        w = np.zeros(len(TYPE_CODE), dtype=np.float64)
        w[TYPE_CODE["product_view"]] = self.view
        w[TYPE_CODE["add_to_cart"]] = self.cart
        w[TYPE_CODE["wishlist_add"]] = self.wishlist
        w[TYPE_CODE["remove_from_cart"]] = self.removal
        w[TYPE_CODE["purchase"]] = self.purchase
        return w

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ItemConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class Suggestion(NamedTuple):
    item_id: str
    score: float
    reason: str


@dataclass
class ItemModel:
    """The arrays of one artifact (see the module docstring) and its manifest."""

    codes: np.ndarray  # uint32 [n], sorted
    item_ids: list[str]  # [n], in code order
    indptr: np.ndarray  # int64 [n + 1]
    neighbours: np.ndarray  # int32 [nnz]: item indices, best first within a row
    weights: np.ndarray  # float32 [nnz]: similarities
    popular: np.ndarray  # int32 [m]: fallback items, most popular first
    popularity: np.ndarray  # float32 [n]: share of the training interactions
    manifest: dict[str, Any]
    path: Path | None = None

    @cached_property
    def together(self) -> list[str]:
        """Per item, the reason of a neighbour it brought in (built once: formatting per suggestion costs more)."""
        return [f"viewed together with {i}" for i in self.item_ids]

    @property
    def n_items(self) -> int:
        return len(self.codes)

    @property
    def version(self) -> str:
        return f"v{int(self.manifest['version']):04d}"

    @property
    def sha256(self) -> str:
        """Of the artifact's arrays (its manifest's)."""
        return str(self.manifest.get("sha256", ""))

    def describe(self) -> dict[str, Any]:
        """What the worker reports of the item model it serves (/health, /metrics)."""
        return {"name": str(self.manifest.get("name", "items-knn")), "version": self.version, "sha256": self.sha256}

    @property
    def config(self) -> ItemConfig:
        """From the manifest's ``serving`` (kept while that is unchanged: it is read at every lookup)."""
        serving = self.manifest.get("serving", {})
        key = tuple(serving.items())
        cached = self.__dict__.get("_config")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_config"] = (key, ItemConfig.from_dict(serving))
        return cached[1]

    def index_of(self, codes: np.ndarray) -> np.ndarray:
        """Item index of each crc32 code, -1 where the model does not know it (or the code is 0: no item)."""
        codes = np.asarray(codes, dtype=np.uint32)
        if not self.n_items:
            return np.full(len(codes), -1, dtype=np.int64)
        pos = np.searchsorted(self.codes, codes)
        pos_c = np.minimum(pos, self.n_items - 1)
        found = (self.codes[pos_c] == codes) & (codes != 0)
        return np.where(found, pos_c, -1).astype(np.int64)

    def lookup_tables(self, neighbours: int) -> LookupTables:
        """What ``suggest`` reads, derived from the arrays once per model (and per ``neighbours``): the arrays are not
        modified once loaded or trained."""
        cache: dict[int, LookupTables] = self.__dict__.setdefault("_lookup_tables", {})
        if neighbours not in cache:
            cache[neighbours] = LookupTables(self, neighbours)
        return cache[neighbours]

    def arrays(self) -> dict[str, np.ndarray]:
        encoded = [s.encode() for s in self.item_ids]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in encoded])
        return {
            "codes": self.codes.astype(np.uint32),
            "id_bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
            "id_offsets": offsets,
            "indptr": self.indptr.astype(np.int64),
            "neighbours": self.neighbours.astype(np.int32),
            "weights": self.weights.astype(np.float32),
            "popular": self.popular.astype(np.int32),
            "popularity": self.popularity.astype(np.float32),
        }


# ---- the batch lookup -------------------------------------------------------------------------------


class LookupTables:
    """An item model's arrays as ``suggest`` reads them.

    - ``index_of``: the crc32 codes' item indices through a direct-mapped table of 2^b slots (at least 8 per item)
      keyed by the codes' low bits, since crc32 spreads them evenly: a slot of one item answers with a compare,
      the few codes whose slot holds several items go to the binary search (``ItemModel.index_of``).
    - ``start``/``count``/``neighbours``/``weights``: each item's best ``count`` neighbours (at most ``neighbours``)
      from ``start`` on, as the artifact keeps them (a dense block padded to ``neighbours`` was slower: most items
      have fewer, and the padding went through every step before it was dropped).
    - ``ids``/``together``: the item ids and the reasons, as object arrays (one gather, then ``tolist``).
    - ``popular``: the fallback items, most popular first, each once.
    - ``decay``: factor ** count from a table of powers (the same values as ``factor ** count``)."""

    def __init__(self, model: ItemModel, neighbours: int):
        n = model.n_items
        self.model = model
        size = 1 << max(10, (8 * n - 1).bit_length())
        self.mask = size - 1
        self.n = n
        reachable = np.flatnonzero(model.codes != 0)  # code 0 is no item (ItemModel.index_of)
        slot = model.codes[reachable].astype(np.int64) & self.mask
        per_slot = np.bincount(slot, minlength=size)
        self.slots = np.full(size, n, dtype=np.int64)  # n: no item there, n + 1: several (binary search)
        self.slots[slot] = np.where(per_slot[slot] == 1, reachable, n + 1)
        self.codes = np.r_[model.codes.astype(np.int64), -1, -1]  # [n], [n + 1]: equal to no code
        self.count = np.minimum(np.diff(model.indptr), neighbours).astype(np.int64)
        self.start = model.indptr[:-1].astype(np.int64)
        self.neighbours = model.neighbours.astype(np.int64)
        self.weights = np.asarray(model.weights, dtype=np.float32)
        self.ids = np.array(model.item_ids, dtype=object)
        self.together = np.array(model.together, dtype=object)
        _, first = np.unique(model.popular, return_index=True)
        self.popular = model.popular[np.sort(first)].astype(np.int64)  # without repeats: the fallback, in order
        self.reasons = np.array([*model.together, SEEN, POPULAR], dtype=object)  # [n]: seen, [n + 1]: popular
        self._powers: dict[float, np.ndarray] = {}

    @cached_property
    def json_heads(self) -> tuple[np.ndarray, np.ndarray]:
        """Each item's suggestion JSON up to the score, [n:] as the first of a list, and their lengths (built when
        first served: about 0.5 s per million items)."""
        ids = self.ids.tolist()
        heads = [contract.suggestion_head(i, first) for first in (False, True) for i in ids]
        return np.array(heads, dtype=object), np.fromiter(map(len, heads), np.int64, len(heads))

    @cached_property
    def json_tails(self) -> tuple[np.ndarray, np.ndarray]:
        """Each of ``reasons``' suggestion JSON after the score, [len(reasons):] as the last of a list, and their
        lengths."""
        reasons = self.reasons.tolist()
        tails = [contract.suggestion_tail(r, last) for last in (False, True) for r in reasons]
        return np.array(tails, dtype=object), np.fromiter(map(len, tails), np.int64, len(tails))

    def index_of(self, codes: np.ndarray) -> np.ndarray:
        """Like ``ItemModel.index_of``."""
        codes = np.asarray(codes, dtype=np.uint32)
        at = self.slots[codes & self.mask]
        idx = np.where(self.codes[at] == codes, at, -1)
        several = np.flatnonzero(at > self.n)
        if len(several):
            idx[several] = self.model.index_of(codes[several])
        return idx

    def decay(self, factor: float, count: np.ndarray) -> np.ndarray:
        """``factor ** count`` for counts >= 0."""
        table = self._powers.get(factor)
        need = int(count.max()) + 1 if len(count) else 1
        if table is None or len(table) < need:
            table = factor ** np.arange(max(need, 2 * len(table) if table is not None else 128), dtype=np.int64)
            self._powers[factor] = table
        return table[count]


def suggest(
    model: ItemModel,
    item_codes: Sequence[np.ndarray],
    type_codes: Sequence[np.ndarray],
    ts: Sequence[np.ndarray],
    k: int | None = None,
    config: ItemConfig | None = None,
) -> list[list[Suggestion] | None]:
    """The top ``k`` items for each user of a batch, from their windows: ``item_codes[u]`` (the window records'
    ``item`` field, crc32, 0 for none), ``type_codes[u]`` and ``ts[u]`` (epoch ms), oldest first.

    An item's score is the sum over the window's items j of weight(j) x similarity(j, item), plus, for an item of
    the window itself, self_weight x its own weight with ``self_decay`` in place of ``position_decay``; weight(j)
    is the event type's weight x 0.5^(age / half life) x position_decay^(item events after it), summed over j's
    events. Items bought in the window are left out. Each
    suggestion's reason names the window item that contributed most. Users with fewer than k scored items get
    popular ones after them (``fallback``); None where there is nothing to suggest at all.

    How it is kept cheap (docs/training.md, "Lookup speed"): the crc32 codes are looked up in a hash table built
    once per model, each window item's neighbours are gathered from the artifact's rows in one pass, both groupings
    (the window's items per user, the candidates per user) are one sort of an int64 that carries the position in its
    low bits (a stable order without a stable sort), and the top k per user are sorted only among the candidates at
    or above each user's k-th best score. tests/test_items_reference.py holds it to the straightforward
    implementation."""
    b = len(item_codes)
    if b == 0:
        return []
    lengths = np.fromiter(map(len, item_codes), np.int64, b)
    if lengths.sum():
        codes = np.concatenate(item_codes, dtype=np.uint32, casting="unsafe")
        types = np.concatenate(type_codes)  # indices of type_weights(): uint8 as the window keeps them, or int
        times = np.concatenate(ts, dtype=np.int64, casting="unsafe")
    else:
        codes, types, times = np.zeros(0, np.uint32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return suggest_flat(model, codes, types, times, lengths, k, config)


def suggest_flat(
    model: ItemModel,
    codes: np.ndarray,
    types: np.ndarray,
    times: np.ndarray,
    lengths: np.ndarray,
    k: int | None = None,
    config: ItemConfig | None = None,
) -> list[list[Suggestion] | None]:
    """``suggest`` with the windows laid end to end: ``codes``, ``types`` and ``times`` hold every window's records,
    the first ``lengths[0]`` of them the first window's, and so on."""
    found = _lookup(model, codes, types, times, lengths, k, config)
    t = found.tables
    ids, reasons = t.ids[found.item].tolist(), t.reasons[found.reason].tolist()
    made = list(map(tuple.__new__, repeat(Suggestion), zip(ids, found.score.tolist(), reasons, strict=True)))
    ends = np.cumsum(found.counts).tolist()
    return [made[e - c : e] or None for e, c in zip(ends, found.counts.tolist(), strict=True)]


def suggest_json(
    model: ItemModel,
    codes: np.ndarray,
    types: np.ndarray,
    times: np.ndarray,
    lengths: np.ndarray,
    k: int | None = None,
    config: ItemConfig | None = None,
    at: np.ndarray | None = None,
) -> list[orjson.Fragment | None]:
    """``suggest_flat``'s suggestions as the intent event's ``suggestions`` JSON, ready to embed: what the engine
    serves. Each suggestion is pasted from its item's JSON head, its score as orjson writes floats and its reason's
    JSON tail (stream.contract; the first head opens the list, the last tail closes it), byte for byte what
    ``intent_record`` writes for the same Suggestion tuples. The whole batch's text is one join, cut per event:
    about a fifth of the instructions of building the tuples, their dicts and encoding them.

    ``at``: the windows' records as positions into ``codes``, ``types`` and ``times``, laid end to end (None: those
    arrays are the windows end to end). The windows of one user's events in a batch share most of their records:
    given once, each record's item is looked up once, not once for every window it is in."""
    found = _lookup(model, codes, types, times, lengths, k, config, at)
    t, counts = found.tables, found.counts
    m = len(found.item)
    if m == 0:
        return [None] * len(counts)
    ends = np.cumsum(counts)
    starts = ends - counts
    listed = counts > 0
    first, last = np.zeros(m, dtype=np.int64), np.zeros(m, dtype=np.int64)
    first[starts[listed]], last[ends[listed] - 1] = 1, 1
    heads, head_len = t.json_heads
    tails, tail_len = t.json_tails
    head = found.item + t.n * first
    tail = found.reason + len(t.reasons) * last
    scores = contract.float_texts(found.score.tolist())
    pieces = np.empty((m, 3), dtype=object)
    pieces[:, 0], pieces[:, 2] = heads[head], tails[tail]
    pieces[:, 1] = scores
    text = b"".join(pieces.ravel().tolist())
    at = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(head_len[head] + np.fromiter(map(len, scores), np.int64, m) + tail_len[tail], out=at[1:])
    return [
        Fragment(text[a:b]) if a != b else None for a, b in zip(at[starts].tolist(), at[ends].tolist(), strict=True)
    ]


class _Found(NamedTuple):
    """A batch's suggestions in columns: each window's in order, the windows one after another."""

    tables: LookupTables
    item: np.ndarray  # int64: the item suggested
    score: np.ndarray  # float64, rounded to 6 decimals; 0 for a popular item
    reason: np.ndarray  # int64 into tables.reasons: the window item it comes from, SEEN or "popular"
    counts: np.ndarray  # int64: suggestions per window


def _lookup(
    model: ItemModel,
    codes: np.ndarray,
    types: np.ndarray,
    times: np.ndarray,
    lengths: np.ndarray,
    k: int | None,
    config: ItemConfig | None,
    at: np.ndarray | None = None,
) -> _Found:
    config = config or model.config
    k = config.k if k is None else k
    b = len(lengths)
    tables = model.lookup_tables(config.neighbours)
    if b == 0:
        none = np.zeros(0, np.int64)
        return _Found(tables, none, np.zeros(0), none, none)
    n = max(model.n_items, 1)
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.uint32)
    times = np.asarray(times, dtype=np.int64)
    idx = tables.index_of(codes)
    if at is not None:
        idx, codes, types, times = idx[at], codes[at], np.asarray(types)[at], times[at]
    user = np.repeat(np.arange(b, dtype=np.int64), lengths)
    ends = np.cumsum(lengths)
    filled = lengths > 0
    newest = np.zeros(b, dtype=np.int64)
    if len(times):
        newest[filled] = np.maximum.reduceat(times, (ends - lengths)[filled])
    # recency: age from the user's newest event, and the number of the user's item events after this one
    has_item = codes != 0
    seen = np.cumsum(has_item)  # item events up to and including each position, whole batch
    after = seen[ends[user] - 1] - seen if len(codes) else np.zeros(0, np.int64)
    age_s = (newest[user] - times) / 1000.0
    base = config.type_weights()[types] * np.exp2(-age_s / config.half_life_s)
    w = base * tables.decay(config.position_decay, after)
    w_self = base * config.self_weight * tables.decay(config.self_decay, after)
    known = idx >= 0
    bought_at = known & (types == PURCHASE)
    bought = np.sort(user[bought_at] * n + idx[bought_at])
    bought = bought[_starts(bought)]  # each (user, item) once
    # the window's items per (user, item), in key order: their summed weights
    keep = np.flatnonzero(known & (np.maximum(w, w_self) >= config.min_weight))
    src_key = user[keep] * n + idx[keep]
    order, sorted_key = _stable_order(src_key, b * n)
    first = _starts(sorted_key)
    inverse = np.empty(len(keep), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    n_src = int(first.sum())
    src_w = np.bincount(inverse, weights=w[keep], minlength=n_src)
    src_self = np.bincount(inverse, weights=w_self[keep], minlength=n_src)
    head = order[first]
    src_user, src = user[keep[head]], idx[keep[head]]
    # expand through the neighbour table: far back in a long window, an item is still a candidate itself, not a
    # source
    rows = np.flatnonzero(src_w >= config.min_weight)
    via_item = src[rows]
    count = tables.count[via_item]
    pos = ranges(tables.start[via_item], count)
    cand = np.concatenate([tables.neighbours[pos], src])
    contrib = np.concatenate([np.repeat(src_w[rows], count) * tables.weights[pos], src_self])
    from_row = np.concatenate([np.repeat(rows, count), np.arange(n_src)])
    positive = contrib > 0
    if not positive.all():  # a similarity of 0 stored, or self_weight 0
        ok = np.flatnonzero(positive)
        cand, contrib, from_row = cand[ok], contrib[ok], from_row[ok]
    cand_user = src_user[from_row]
    # per (user, item): the sum, in key order (the row that contributed most is found below, for the top k only)
    order, key = _stable_order(cand_user * n + cand, b * n)
    contrib = contrib[order]
    starts_g = np.flatnonzero(_starts(key))
    score = np.add.reduceat(contrib, starts_g) if len(key) else np.zeros(0)
    group = np.arange(len(starts_g))
    g_user = cand_user[order[starts_g]]
    if len(bought):  # items bought in the window are not suggested
        g_key = key[starts_g]
        at = np.searchsorted(g_key, bought)
        hit = at[g_key[np.minimum(at, len(g_key) - 1)] == bought] if len(g_key) else at[:0]
        if len(hit):
            fresh = np.ones(len(g_key), dtype=bool)
            fresh[hit] = False
            group, g_user, score = group[fresh], g_user[fresh], score[fresh]
    # top k per user: by user, then score descending, ties in item order. The order is that of one stable sort of
    # a float key (user + a fraction that falls with the score relative to the user's best), done only for the
    # candidates whose key is at most their user's k-th smallest (found by an unstable sort of the keys alone).
    per_user = np.bincount(g_user, minlength=b)
    user_start = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(per_user, out=user_start[1:])
    user_best = np.zeros(b)
    has = np.flatnonzero(per_user)
    if len(score):
        user_best[has] = np.maximum.reduceat(score, user_start[has])
    f = g_user + (1.0 - score / (user_best[g_user] * (1 + 1e-9)))
    kth = np.sort(f)[np.maximum(user_start[:-1] + np.minimum(per_user, k) - 1, 0)] if len(f) else np.zeros(b)
    near = np.flatnonzero(f <= kth[g_user])
    near = near[np.argsort(f[near], kind="stable")]
    g_user, score, group = g_user[near], score[near], group[near]
    user_start = np.searchsorted(g_user, np.arange(b + 1))
    top = np.flatnonzero(np.arange(len(g_user)) - user_start[g_user] < k)
    counts = np.minimum(np.diff(user_start), k)
    group = group[top]
    first = starts_g[group]
    items = cand[order[first]]
    # the row that contributed most to each suggestion: the first of the largest in its group's rows
    size = np.append(starts_g[1:], len(key))[group] - first
    offsets = np.cumsum(size) - size
    rows = ranges(first, size)
    values = contrib[rows]
    is_best = np.flatnonzero(values == np.repeat(np.maximum.reduceat(values, offsets), size)) if len(rows) else rows
    in_group = np.repeat(np.arange(len(group)), size)[is_best]
    best = rows[is_best[_starts(in_group)]]
    via = src[from_row[order[best]]]
    reason = np.where(via == items, tables.n, via)  # tables.reasons[n] is SEEN
    scores = np.round(score[top], 6)
    made_user = g_user[top]  # in user order
    if config.fallback and len(tables.popular):
        fill_user, fill = _popular_fill(tables, counts, k, bought, items, made_user, n)
        if len(fill_user):
            # each user's own suggestions, then its popular ones: one stable order of user x 2 (+ 1 for the fill)
            at = np.argsort(np.concatenate([made_user * 2, fill_user * 2 + 1]), kind="stable")
            items = np.concatenate([items, tables.popular[fill]])[at]
            scores = np.concatenate([scores, np.zeros(len(fill))])[at]
            reason = np.concatenate([reason, np.full(len(fill), tables.n + 1)])[at]
            counts = counts + np.bincount(fill_user, minlength=b)
    return _Found(tables, items, scores, reason, counts)


def _popular_fill(
    tables: LookupTables,
    counts: np.ndarray,
    k: int,
    bought: np.ndarray,
    items: np.ndarray,
    item_user: np.ndarray,
    n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Users with fewer than k suggestions get popular items after them, most popular first, but none they bought
    or already have: (user, index into ``tables.popular``) pairs, by user, then popularity."""
    short = np.flatnonzero(counts < k)
    if not len(short):
        return short, short
    is_short = np.zeros(len(counts), dtype=bool)
    is_short[short] = True  # only the short users' items are in the way (most users are not short)
    bought = bought[is_short[bought // n]]
    most = int(np.bincount(bought // n).max()) if len(bought) else 0
    popular = tables.popular[: 2 * k + most]  # a user skips at most k - 1 taken and the items it bought
    keys = short[:, None] * n + popular
    mine = is_short[item_user]
    have = np.sort(np.concatenate([bought, item_user[mine] * n + items[mine]]))
    at = np.minimum(np.searchsorted(have, keys), max(len(have) - 1, 0))
    free = have[at] != keys if len(have) else np.ones(keys.shape, dtype=bool)
    free &= np.cumsum(free, axis=1) <= (k - counts[short])[:, None]
    row, col = np.nonzero(free)
    return short[row], col


def ranges(start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """The ranges [start[i], start[i] + count[i]) one after another, as one int64 array (one gather for all)."""
    return np.repeat(start - (np.cumsum(count) - count), count) + np.arange(int(count.sum()))


def _starts(a: np.ndarray) -> np.ndarray:
    """Of a sorted array: True where a run of equal values starts."""
    out = np.empty(len(a), dtype=bool)
    out[:1] = True
    np.not_equal(a[1:], a[:-1], out=out[1:])
    return out


def _stable_order(key: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """``order`` such that ``key[order]`` is sorted and equal keys keep their positions' order, and ``key[order]``;
    ``key``: int64 in [0, bound). One unstable (vectorised) sort of key << bits | position where that fits in 63
    bits, a stable argsort otherwise (and for a short ``key``, where the calls cost more than the sort)."""
    m = len(key)
    bits = max(int(m - 1).bit_length(), 1)
    if m < 1024 or bits + int(bound).bit_length() > 63:  # small: fewer numpy calls
        order = np.argsort(key, kind="stable")
        return order, key[order]
    s = np.sort((key << bits) | np.arange(m, dtype=np.int64))
    return s & ((1 << bits) - 1), s >> bits


# ---- artifacts --------------------------------------------------------------------------------------


def list_versions(items_dir: Path) -> list[tuple[int, Path]]:
    """Item artifact folders, newest first."""
    return artifact_versions(items_dir, _DIR_RE)


def save_items(model: ItemModel, items_dir: Path, manifest: dict[str, Any]) -> Path:
    """Publish ``model`` as the next version in ``items_dir`` (atomically) and return its folder."""

    def write(tmp: Path) -> dict[str, Any]:
        save_file(model.arrays(), str(tmp / ARRAYS))
        return {
            "name": "items-knn",
            **manifest,
            "format": FORMAT_VERSION,
            "kind": KIND,
            "arrays": ARRAYS,
            "sha256": sha256_file(tmp / ARRAYS),
            "n_items": model.n_items,
            "nnz": len(model.neighbours),
        }

    path, model.manifest = publish(items_dir, KIND, write, _DIR_RE)
    model.path = path
    return path


def load_items(path: Path) -> ItemModel:
    """Load one item artifact after checking its manifest, the sha256 of its arrays and their shapes; raise
    ArtifactError (one line: which artifact, why) otherwise."""
    manifest = read_manifest(path, ("format", "kind", "version", "sha256"))
    if manifest["format"] != FORMAT_VERSION or manifest["kind"] != KIND:
        raise ArtifactError(f"{path.name}: not an item artifact of format {FORMAT_VERSION}")
    file = path / manifest.get("arrays", ARRAYS)
    verify_sha256(path, file, manifest["sha256"], "arrays")
    try:
        a = load_file(str(file))
    except Exception as exc:
        raise ArtifactError(f"{path.name}: unreadable arrays ({type(exc).__name__})") from None
    missing = [name for name in _REQUIRED if name not in a]
    if missing:
        raise ArtifactError(f"{path.name}: arrays lack {', '.join(missing)}")
    n, nnz = len(a["codes"]), len(a["neighbours"])
    ok = (
        len(a["id_offsets"]) == n + 1
        and len(a["indptr"]) == n + 1
        and len(a["weights"]) == nnz
        and len(a["popularity"]) == n
        and (
            n == 0
            or (a["indptr"][0] == 0 and a["indptr"][-1] == nnz and np.all(np.diff(a["codes"].astype(np.int64)) > 0))
        )
        and (nnz == 0 or (a["neighbours"].min() >= 0 and a["neighbours"].max() < n))
        and (len(a["popular"]) == 0 or (a["popular"].min() >= 0 and a["popular"].max() < n))
    )
    if not ok:
        raise ArtifactError(f"{path.name}: arrays are inconsistent (shapes, order or indices)")
    blob, offsets = a["id_bytes"].tobytes(), a["id_offsets"].tolist()
    ids = [blob[offsets[i] : offsets[i + 1]].decode() for i in range(n)]
    model = ItemModel(
        codes=a["codes"],
        item_ids=ids,
        indptr=a["indptr"],
        neighbours=a["neighbours"],
        weights=a["weights"],
        popular=a["popular"],
        popularity=a["popularity"],
        manifest=manifest,
        path=path,
    )
    model.lookup_tables(model.config.neighbours)  # here (the worker's hot swap loads in a thread), not in a batch
    return model


def load_newest_items(items_dir: Path) -> tuple[ItemModel | None, list[str]]:
    """The newest item artifact that loads, and one line per newer one that was refused."""
    refused: list[str] = []
    for _, path in list_versions(items_dir):
        try:
            return load_items(path), refused
        except ArtifactError as exc:
            refused.append(str(exc))
    return None, refused


def poll_items(items_dir: Path, serving: ItemModel | None, refused: set[Path]) -> tuple[ItemModel | None, list[str]]:
    """For the worker's hot swap (like stream/hot_swap.py's for the scorer): the newest valid item artifact newer
    than ``serving`` (None if there is none), and one line per artifact refused now. A broken artifact is added to
    ``refused`` and not tried again; the caller swaps the model between two batches."""
    current = -1 if serving is None else int(serving.manifest["version"])
    lines: list[str] = []
    for version, path in list_versions(items_dir):
        if version <= current:
            break
        if path in refused:
            continue
        try:
            return load_items(path), lines
        except ArtifactError as exc:
            refused.add(path)
            lines.append(str(exc))
    return None, lines


def select_items(path: Path) -> ItemModel:
    """One item artifact folder, or the newest valid one in an items directory."""
    if (path / MANIFEST).is_file():
        return load_items(path)
    model, refused = load_newest_items(path)
    if model is None:
        why = f" ({refused[0]})" if refused else ""
        raise ArtifactError(f"{path}: no usable item artifact (expected vNNNN-items folders){why}")
    return model
