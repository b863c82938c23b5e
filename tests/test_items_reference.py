"""The batch lookup (models.items.suggest) against the implementation it replaced, kept here as the reference:
the same items, scores, reasons and order on random windows over random tables and on the simulator's windows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import orjson
import pytest

from models.items import PURCHASE, SEEN, ItemConfig, ItemModel, Suggestion, suggest, suggest_json
from stream.contract import TYPE_CODE

Seq = Sequence[np.ndarray]
Out = list[list[Suggestion] | None]


def suggest_reference(model: ItemModel, item_codes: Seq, type_codes: Seq, ts: Seq, k=None, config=None) -> Out:
    """``suggest`` as it was before it was made faster (models/items.py at 3f679a0), the reference: the same
    arguments, and the same results to the last bit."""
    config = config or model.config
    k = config.k if k is None else k
    b = len(item_codes)
    if b == 0:
        return []
    lengths = np.fromiter((len(a) for a in item_codes), np.int64, b)
    user = np.repeat(np.arange(b, dtype=np.int64), lengths)
    codes = (
        np.concatenate([np.asarray(a, dtype=np.uint32) for a in item_codes])
        if lengths.sum()
        else np.zeros(0, np.uint32)
    )
    types = np.concatenate([np.asarray(a, dtype=np.int64) for a in type_codes]) if len(codes) else np.zeros(0, np.int64)
    times = np.concatenate([np.asarray(a, dtype=np.int64) for a in ts]) if len(codes) else np.zeros(0, np.int64)
    n = max(model.n_items, 1)
    idx = model.index_of(codes)
    known = idx >= 0
    bought = np.unique(user[known & (types == PURCHASE)] * n + idx[known & (types == PURCHASE)])
    # recency: age from the user's newest event, and the number of the user's item events after this one
    ends = np.cumsum(lengths)
    starts = ends - lengths
    newest = np.zeros(b, dtype=np.int64)
    filled = lengths > 0
    if len(times):
        newest[filled] = np.maximum.reduceat(times, starts[filled])
    has_item = (codes != 0).astype(np.int64)
    from_end = np.zeros(len(codes) + 1, dtype=np.int64)  # item events at or after each position, whole batch
    from_end[:-1] = np.cumsum(has_item[::-1])[::-1]
    after = from_end[1:] - from_end[ends[user]]
    age_s = (newest[user] - times) / 1000.0
    base = config.type_weights()[types] * np.exp2(-age_s / config.half_life_s)
    w, w_self = base * config.position_decay**after, base * config.self_weight * config.self_decay**after
    keep = known & (np.maximum(w, w_self) >= config.min_weight)
    src_key, inverse = np.unique(user[keep] * n + idx[keep], return_inverse=True)
    src_w = np.bincount(inverse, weights=w[keep], minlength=len(src_key))
    src_self = np.bincount(inverse, weights=w_self[keep], minlength=len(src_key))
    src_user, src = src_key // n, src_key % n
    # expand through the neighbour table
    start = model.indptr[src]
    count = np.minimum(model.indptr[src + 1] - start, config.neighbours)
    count[src_w < config.min_weight] = 0  # far back in a long window: still a candidate itself, not a source
    total = int(count.sum())
    row = np.repeat(np.arange(len(src)), count)
    pos = np.repeat(start - (np.cumsum(count) - count), count) + np.arange(total)
    cand = np.concatenate([model.neighbours[pos].astype(np.int64), src])
    contrib = np.concatenate([src_w[row] * model.weights[pos], src_self])
    from_row = np.concatenate([row, np.arange(len(src))])
    cand_user = src_user[from_row]
    key = cand_user * n + cand
    ok = contrib > 0
    key, contrib, from_row = key[ok], contrib[ok], from_row[ok]
    # per (user, item): the sum, and the row that contributed most (the first of the largest, in key order)
    order = np.argsort(key, kind="stable")
    key, contrib, from_row = key[order], contrib[order], from_row[order]
    starts_g = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
    score = np.add.reduceat(contrib, starts_g) if len(key) else np.zeros(0)
    group = np.cumsum(np.r_[False, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
    best = np.maximum.reduceat(contrib, starts_g) if len(key) else np.zeros(0)
    is_best = contrib == best[group]
    best_row = np.full(len(starts_g), -1, dtype=np.int64)
    best_row[group[is_best][::-1]] = np.flatnonzero(is_best)[::-1]  # the first best row of each group
    g_key, g_from = key[starts_g], from_row[best_row]
    if len(bought):  # items bought in the window are not suggested
        at = np.minimum(np.searchsorted(bought, g_key), len(bought) - 1)
        fresh = bought[at] != g_key
        g_key, g_from, score = g_key[fresh], g_from[fresh], score[fresh]
    g_user, g_item = g_key // n, g_key % n
    # top k per user: by user, then score descending. One sort of a float key (user + a fraction that falls with
    # the score relative to the user's best) instead of a two-key lexsort; the stable sort keeps the keys' item
    # order for ties.
    user_best = np.zeros(b)
    np.maximum.at(user_best, g_user, score)
    order = np.argsort(g_user + (1.0 - score / (user_best[g_user] * (1 + 1e-9))), kind="stable")
    g_user, g_item, score, g_from = g_user[order], g_item[order], score[order], g_from[order]
    user_start = np.searchsorted(g_user, np.arange(b + 1))
    top = np.arange(len(g_user)) - user_start[g_user] < k
    counts = np.minimum(np.diff(user_start), k)
    items, via = g_item[top].tolist(), src[g_from[top]].tolist()
    ids, together = model.item_ids, model.together
    made = list(
        map(
            Suggestion,
            [ids[i] for i in items],
            np.round(score[top], 6).tolist(),
            [SEEN if v == i else together[v] for i, v in zip(items, via, strict=True)],
        )
    )
    ends = np.cumsum(counts).tolist()
    found = [made[e - c : e] for e, c in zip(ends, counts.tolist(), strict=True)]
    if config.fallback and len(model.popular):
        for u in np.flatnonzero(counts < k).tolist():
            got = found[u]
            taken = {x.item_id for x in got}
            excluded = set((bought[(bought >= u * n) & (bought < (u + 1) * n)] % n).tolist())
            for item in model.popular.tolist():
                if len(got) >= k:
                    break
                if item not in excluded and ids[item] not in taken:
                    got.append(Suggestion(ids[item], 0.0, "popular"))
    out: list[list[Suggestion] | None] = [got or None for got in found]
    return out


def json_of(model: ItemModel, item_codes: Seq, type_codes: Seq, ts: Seq, **kw) -> list[bytes | None]:
    """What the engine serves (``suggest_json``, the windows laid end to end) as JSON text."""
    lengths = np.array([len(a) for a in item_codes], dtype=np.int64)
    flat = [
        np.concatenate([np.asarray(a) for a in x]) if len(x) else np.zeros(0, np.int64)
        for x in (item_codes, type_codes, ts)
    ]
    served = [None if f is None else orjson.dumps(f) for f in suggest_json(model, *flat, lengths, **kw)]
    # the same windows given as positions into other arrays (the engine's batch windows, shared by a user's events):
    # the records reversed, behind records no window uses
    m = len(flat[0])
    spare = [np.zeros(3, a.dtype) for a in flat]
    stacked = [np.concatenate([pad, a[::-1]]) for pad, a in zip(spare, flat, strict=True)]
    at = 3 + (m - 1 - np.arange(m))
    shared = suggest_json(model, *stacked, lengths, at=at, **kw)
    assert [None if f is None else orjson.dumps(f) for f in shared] == served
    return served


def as_json(out: Out) -> list[bytes | None]:
    """Suggestion lists as intent_record writes them."""
    return [
        None if o is None else orjson.dumps([{"item_id": i, "score": s, "reason": r} for i, s, r in o]) for o in out
    ]


# ---- the comparison -------------------------------------------------------------------------------------


def random_model(rng: np.random.Generator, n: int, ties: bool) -> ItemModel:
    """n items with up to 15 neighbours each (some none), similarities in (0, 1] or, with ``ties``, from a few
    values (equal scores: the order of ties is compared too); some rows carry a similarity of 0."""
    codes = rng.choice(2**32 - 1, n, replace=False) + 1
    codes[: n // 4] = (codes[: n // 4] & 0xFFFFF) | (np.arange(n // 4) << 20)  # several items in a slot (low bits)
    codes[n // 4 : n // 4 + n // 8] = codes[: n // 8] & 0xFFFFF  # and below 2^20: 0x00.. shares them too
    codes = np.sort(np.unique(codes[codes > 0]))[:n].astype(np.uint32)
    n = len(codes)
    counts = rng.integers(0, 16, n)
    counts[rng.random(n) < 0.1] = 0
    neighbours = np.concatenate([rng.choice(n, min(c, n - 1), replace=False) for c in counts] or [np.zeros(0)])
    counts = np.minimum(counts, n - 1)
    weights = rng.choice([0.25, 0.5, 1.0], len(neighbours)) if ties else rng.random(len(neighbours))
    weights[rng.random(len(weights)) < 0.05] = 0.0
    return ItemModel(
        codes=codes,
        item_ids=[f"item-{i}" for i in range(n)],
        indptr=np.r_[0, np.cumsum(counts)].astype(np.int64),
        neighbours=neighbours.astype(np.int32),
        weights=weights.astype(np.float32),
        popular=rng.permutation(n)[: min(n, 8)].astype(np.int32),
        popularity=rng.random(n).astype(np.float32),
        manifest={"version": 1, "serving": ItemConfig().to_dict()},
    )


def random_windows(
    rng: np.random.Generator, model: ItemModel, users: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Windows of 0 to 80 events: items of the model, unknown codes and none (0), every type, minutes to weeks
    apart, and prefixes of one window (as the engine looks up a user's emitted events)."""
    items, types, times = [], [], []
    for _ in range(users):
        m = int(rng.choice([0, 1, 3, 15, 64, 80]))
        code = model.codes[rng.integers(0, max(model.n_items, 1), m)] if model.n_items else np.zeros(m, np.uint32)
        code = np.where(rng.random(m) < 0.1, rng.integers(1, 2**32, m), code)
        code = np.where(rng.random(m) < 0.15, 0, code).astype(np.uint32)
        kind = rng.integers(0, len(TYPE_CODE), m).astype(np.uint8)
        ts = np.cumsum(rng.choice([1_000, 60_000, 3_600_000, 86_400_000, 8 * 86_400_000], m)).astype(np.int64)
        for end in [m] if m < 3 or rng.random() < 0.7 else sorted({m, int(rng.integers(1, m))}):
            items.append(code[:end])
            types.append(kind[:end])
            times.append(ts[:end])
    return items, types, times


@pytest.mark.parametrize("seed", range(12))
def test_suggest_gives_what_the_reference_gives(seed: int):
    rng = np.random.default_rng(seed)
    model = random_model(rng, int(rng.choice([1, 5, 40, 300])), ties=seed % 2 == 0)
    items, types, times = random_windows(rng, model, int(rng.choice([1, 7, 64, 300])))
    for config in (
        ItemConfig(),
        ItemConfig(neighbours=3, min_weight=0.2, fallback=False),
        ItemConfig(neighbours=50, position_decay=0.5, self_weight=0.0, half_life_s=3600.0),
        ItemConfig(min_weight=0.0, self_decay=1.0, purchase=2.0),
    ):
        for k in (1, 5, 12):
            got = suggest(model, items, types, times, k=k, config=config)
            assert got == suggest_reference(model, items, types, times, k=k, config=config), (config, k)
            assert json_of(model, items, types, times, k=k, config=config) == as_json(got), (config, k)


def test_suggest_gives_what_the_reference_gives_on_edges():
    rng = np.random.default_rng(0)
    model = random_model(rng, 30, ties=True)
    empty = ItemModel(
        codes=np.zeros(0, np.uint32),
        item_ids=[],
        indptr=np.zeros(1, np.int64),
        neighbours=np.zeros(0, np.int32),
        weights=np.zeros(0, np.float32),
        popular=np.zeros(0, np.int32),
        popularity=np.zeros(0, np.float32),
        manifest={"version": 1},
    )
    none = [np.zeros(0, np.uint32)], [np.zeros(0, np.uint8)], [np.zeros(0, np.int64)]
    lists = [[int(model.codes[3]), 0, int(model.codes[5])]], [[1, 1, 2]], [[0, 1000, 2000]]  # plain lists
    zero = random_model(rng, 30, ties=False)
    zero.codes[0] = 0  # an item whose crc32 is 0: no window item is it (0 is "no item")
    for m in (model, empty, zero):
        for windows in (none, lists, random_windows(rng, model, 20)):
            assert suggest(m, *windows) == suggest_reference(m, *windows)
            assert json_of(m, *windows) == as_json(suggest(m, *windows))
    assert suggest(model, [], [], []) == []
