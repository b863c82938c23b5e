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
by event type and recency, are expanded through the neighbour table (CSR arrays) and summed per (user, item); the
top k per user come out of one sort. No dense item x item matrix is ever built.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors.numpy import load_file, save_file

from models.artifact import MANIFEST, ArtifactError, publish, read_manifest, sha256_file, verify_sha256
from models.artifact import list_versions as artifact_versions
from stream.contract import TYPE_CODE

ARRAYS = "items.safetensors"
FORMAT_VERSION = 1
KIND = "items"
_DIR_RE = re.compile(r"^v(\d{4,})-items$")
_REQUIRED = ("codes", "id_bytes", "id_offsets", "indptr", "neighbours", "weights", "popular", "popularity")
PURCHASE = TYPE_CODE["purchase"]
SEEN = "seen recently"  # the reason of an item the window holds itself


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
    def config(self) -> ItemConfig:
        return ItemConfig.from_dict(self.manifest.get("serving", {}))

    def index_of(self, codes: np.ndarray) -> np.ndarray:
        """Item index of each crc32 code, -1 where the model does not know it (or the code is 0: no item)."""
        codes = np.asarray(codes, dtype=np.uint32)
        if not self.n_items:
            return np.full(len(codes), -1, dtype=np.int64)
        pos = np.searchsorted(self.codes, codes)
        pos_c = np.minimum(pos, self.n_items - 1)
        found = (self.codes[pos_c] == codes) & (codes != 0)
        return np.where(found, pos_c, -1).astype(np.int64)

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
    popular ones after them (``fallback``); None where there is nothing to suggest at all."""
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
    return ItemModel(
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
