"""`intentstream train-items`: the item model (item-to-item collaborative filtering) as a versioned artifact.

    intentstream train-items --data var/sim.jsonl.gz --out var/items [--until 0.75]

What happens (docs/training.md, "Item suggestions", has the figures):
1. events -> arrays sorted by user and time (``Clicks``); only events before ``--until`` (a fraction of the data's
   time span, or an ISO time) are used, so ``intentstream evaluate-items`` can judge the rest;
2. co-occurrence of items within sessions, plus ``user_weight`` x within a user's history (sessions are the
   session_id, or a 30-minute gap where the data has none): C = Xs'Xs + w Xu'Xu over binary incidences;
3. cosine similarity C_ij / sqrt(C_ii C_jj) (item-based CF, Sarwar et al. 2001) damped by the support,
   x C_ij / (C_ij + shrink), and the top ``neighbours`` per item kept as a sparse table (CSR);
4. popularity (share of the interactions) for the fallback; crc32 codes of the ids (the engine's window keeps
   those; two ids with one code are one item, named after the more frequent); ``models.items.save_items``
   publishes the artifact.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse
from tqdm import tqdm

from models.features import _crc
from models.items import ItemConfig, ItemModel, save_items
from stream.contract import TYPE_CODE, Event
from training.data import files_hash, read_events

ITEM_TYPES = tuple(TYPE_CODE[t] for t in ("product_view", "add_to_cart", "wishlist_add", "purchase"))
CART_TYPES = tuple(TYPE_CODE[t] for t in ("add_to_cart", "purchase"))


@dataclass(frozen=True)
class ItemTrainConfig:
    until: str = "0.75"  # a fraction of the data's time span, or an ISO-8601 time: train on the events before it
    neighbours: int = 50  # kept per item
    shrink: float = 2.0  # support damping: a pair seen together once counts a third of a pair seen often
    user_weight: float = 0.5  # co-occurrence anywhere in a user's history, besides within a session
    session_gap_s: float = 1800.0  # a new context after this gap where the data has no session ids
    popular: int = 200  # fallback list length


@dataclass
class Clicks:
    """Events as arrays, sorted by user, then time, then file order (each user's window order in the engine)."""

    user: np.ndarray  # int64 user index
    ts: np.ndarray  # int64 epoch ms
    type: np.ndarray  # int64 TYPE_CODE
    item: np.ndarray  # uint32 crc32 of item_id (0: none), as in the engine's window
    category: np.ndarray  # uint32 crc32 of the category (0: none)
    context: np.ndarray  # int64 session index (session_id changes, or a gap over session_gap_s)
    event_ids: list[str]
    names: dict[int, str]  # crc32 -> item_id (of two ids with one code, the more frequent)
    collisions: int  # item ids that share a crc32 code with a more frequent one
    categories: dict[int, int]  # item crc32 -> category crc32 (the last one seen)
    n_users: int

    def __len__(self) -> int:
        return len(self.ts)


def clicks(events: Sequence[Event], session_gap_s: float = 1800.0) -> Clicks:
    users: dict[str, int] = {}
    user = np.fromiter((users.setdefault(e.user_id, len(users)) for e in events), np.int64, len(events))
    ts = np.fromiter((e.ts for e in events), np.int64, len(events))
    order = np.lexsort((np.arange(len(events)), ts, user))
    ev = [events[i] for i in order]
    # Two ids with one crc32 are one item to the engine's window, so they are one item here too, named after the
    # more frequent id (ties: the smaller).
    frequency = Counter(e.item_id for e in ev if e.item_id is not None)
    names: dict[int, str] = {}
    for item_id, _count in sorted(frequency.items(), key=lambda kv: (-kv[1], kv[0])):
        names.setdefault(_crc(item_id), item_id)
    item = np.fromiter((0 if e.item_id is None else _crc(e.item_id) for e in ev), np.uint32, len(ev))
    category = np.fromiter((0 if e.category is None else _crc(e.category) for e in ev), np.uint32, len(ev))
    session = np.fromiter((0 if e.session_id is None else _crc(e.session_id) for e in ev), np.int64, len(ev))
    user, ts = user[order], ts[order]
    new = np.ones(len(ev), dtype=bool)
    new[1:] = (user[1:] != user[:-1]) | (session[1:] != session[:-1]) | (ts[1:] - ts[:-1] > session_gap_s * 1000)
    has = item != 0
    categories = dict(zip(item[has].tolist(), category[has].tolist(), strict=True))
    return Clicks(
        user=user,
        ts=ts,
        type=np.fromiter((TYPE_CODE[e.type] for e in ev), np.int64, len(ev)),
        item=item,
        category=category,
        context=np.cumsum(new) - 1,
        event_ids=[e.event_id for e in ev],
        names=names,
        collisions=len(frequency) - len(names),
        categories=categories,
        n_users=len(users),
    )


def split_time(c: Clicks, until: str) -> int:
    """Epoch ms of ``until``: a fraction of [first event, last event], or an ISO-8601 time."""
    try:
        fraction = float(until)
    except ValueError:
        parsed = datetime.fromisoformat(until.replace("Z", "+00:00"))
        return int(parsed.timestamp() * 1000)
    if not 0 < fraction <= 1:
        raise ValueError(f"--until: a fraction must lie in (0, 1], got {until}")
    t0, t1 = int(c.ts.min()), int(c.ts.max())
    return t0 + int(fraction * (t1 - t0)) + (1 if fraction == 1 else 0)


def _incidence(rows: np.ndarray, cols: np.ndarray, n_cols: int) -> sparse.csr_matrix:
    """Binary rows x items matrix (an item seen twice in a row's context counts once)."""
    _, r = np.unique(rows, return_inverse=True)
    m = sparse.csr_matrix((np.ones(len(r)), (r, cols)), shape=(int(r.max()) + 1 if len(r) else 0, n_cols))
    m.data[:] = 1.0
    return m


def fit(c: Clicks, until_ms: int, cfg: ItemTrainConfig, progress: bool = True) -> tuple[ItemModel, dict[str, Any]]:
    """The item model from the events before ``until_ms``, and what the manifest says about the fit."""
    t0 = time.perf_counter()
    use = (c.ts < until_ms) & np.isin(c.type, ITEM_TYPES) & (c.item != 0)
    codes_all, item_all = np.unique(c.item[use], return_inverse=True)
    counts = np.bincount(item_all, minlength=len(codes_all)).astype(np.float64)
    ids = [c.names[int(x)] for x in codes_all.tolist()]
    n = len(codes_all)
    xs = _incidence(c.context[use], item_all, n)
    xu = _incidence(c.user[use], item_all, n)
    co = (xs.T @ xs + cfg.user_weight * (xu.T @ xu)).tocsr()
    diag = co.diagonal().copy()
    co.setdiag(0)
    co.eliminate_zeros()
    rows = np.repeat(np.arange(n), np.diff(co.indptr))
    sim = co.data / np.sqrt(diag[rows] * diag[co.indices]) * (co.data / (co.data + cfg.shrink))
    indptr = np.zeros(n + 1, dtype=np.int64)
    kept_cols: list[np.ndarray] = []
    kept_w: list[np.ndarray] = []
    for i in tqdm(range(n), desc="neighbours", unit=" items", disable=not progress, leave=False, file=sys.stderr):
        a, b = co.indptr[i], co.indptr[i + 1]
        cols, w = co.indices[a:b], sim[a:b]
        order = np.lexsort((cols, -w))[: cfg.neighbours]  # best first, ties by index: deterministic
        kept_cols.append(cols[order])
        kept_w.append(w[order])
        indptr[i + 1] = indptr[i] + len(order)
    share = counts / max(counts.sum(), 1.0)
    popular = np.lexsort((np.arange(n), -counts))[: cfg.popular]
    model = ItemModel(
        codes=codes_all.astype(np.uint32),
        item_ids=ids,
        indptr=indptr,
        neighbours=np.concatenate(kept_cols).astype(np.int32) if kept_cols else np.zeros(0, np.int32),
        weights=np.concatenate(kept_w).astype(np.float32) if kept_w else np.zeros(0, np.float32),
        popular=popular.astype(np.int32),
        popularity=share.astype(np.float32),
        manifest={},
    )
    info = {
        "events_used": int(use.sum()),
        "users": len(np.unique(c.user[use])),
        "contexts": int(xs.shape[0]),
        "items": n,
        "crc_collisions": c.collisions,
        "pairs": int(co.nnz),
        "nnz": int(indptr[-1]),
        "mean_neighbours": float(indptr[-1] / n) if n else 0.0,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return model, info


def train_items(paths: Sequence[Path | str], out: Path, cfg: ItemTrainConfig, progress: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    c = clicks(read_events(paths), cfg.session_gap_s)
    if not len(c):
        raise ValueError("no events in the data")
    until_ms = split_time(c, cfg.until)
    model, info = fit(c, until_ms, cfg, progress)
    manifest = {
        "name": "items-knn",
        "method": "item-kNN, cosine on session and user co-occurrence, support shrinkage; popularity fallback",
        "train": asdict(cfg),
        "serving": ItemConfig().to_dict(),
        "data_hash": files_hash(paths),
        "sources": [str(p) for p in paths],
        "t_start": int(c.ts.min()),
        "t_end": int(c.ts.max()),
        "trained_until_ms": until_ms,
        "fit": info,
    }
    path = save_items(model, out, manifest)
    return {"artifact": str(path), "total_seconds": round(time.perf_counter() - t0, 2), **info}


# ---- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__  # what it does, in order
    d = ItemTrainConfig()
    parser.add_argument(
        "--data", nargs="+", required=True, metavar="FILE", help="JSON lines (.gz ok), REES46 or Taobao CSV"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="MODEL_DIR", help="item artifacts directory")
    parser.add_argument(
        "--until",
        default=d.until,
        help="train on events before this: a fraction of the data's time span (default 0.75) or an ISO-8601 time; "
        "evaluate-items judges the rest",
    )
    parser.add_argument("--neighbours", type=int, default=d.neighbours, help="neighbours kept per item")
    parser.add_argument("--shrink", type=float, default=d.shrink, help="support shrinkage of the cosine")
    parser.add_argument(
        "--user-weight", type=float, default=d.user_weight, help="weight of co-occurrence across a user's sessions"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write a JSON summary here")


def run(args: argparse.Namespace, settings: Any) -> int:
    cfg = ItemTrainConfig(
        until=args.until, neighbours=args.neighbours, shrink=args.shrink, user_weight=args.user_weight
    )
    try:
        summary = train_items(args.data, args.out, cfg, progress=not args.quiet)
    except ValueError as exc:
        print(f"intentstream train-items: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {summary['artifact']} in {summary['total_seconds']:.1f} s: {summary['items']} items, "
        f"{summary['mean_neighbours']:.1f} neighbours each, from {summary['events_used']} events of "
        f"{summary['users']} users in {summary['contexts']} sessions"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return 0
