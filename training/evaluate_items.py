"""`intentstream evaluate-items`: the item model against baselines and the simulator's item oracle.

    intentstream evaluate-items --model var/items --data var/sim.jsonl.gz --truth var/sim.truth.jsonl.gz --out var/ir

Positions: every event at or after the test start (``--from``; by default the time the model was trained up to)
that some later add to cart or purchase of the same user follows; the engine emits an intent event at each of
them. The truth is the item of that next add to cart or purchase. Each scorer sees what the engine's window holds
at that event: the user's last ``window`` events (any type, also from before the test start).

Metrics: hit rate@5 and @10 (the true item among the top k), MRR@10, and recall@10 of the distinct items the user
adds or buys from the next such event to an hour after it. Intervals: a user-level bootstrap (users resampled with
replacement), for each figure and for the model's lead over each other scorer. Writes report.json, report.md and
items.png.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from tqdm import tqdm

from models.artifact import ArtifactError
from models.features import FeaturizerConfig, _crc
from models.items import PURCHASE, ItemConfig, ItemModel, select_items, suggest
from stream.contract import Event
from training.data import files_hash, read_events
from training.evaluate import write_report
from training.train_items import CART_TYPES, ITEM_TYPES, Clicks, clicks, split_time

TOP = 10
RECALL_WINDOW_MS = 3_600_000
METRICS = ("hit@5", "hit@10", "recall@10", "mrr@10")
BASELINES = ("most popular", "popular in user's categories", "recently viewed")
MODEL = "item model"
ORACLE = "oracle"

# A scorer: (window item codes, type codes, ts) per position -> top-TOP item codes per position (best first)
Scorer = Callable[[list[np.ndarray], list[np.ndarray], list[np.ndarray]], list[list[int]]]


@dataclass
class Positions:
    index: np.ndarray  # event index in Clicks
    window_start: np.ndarray  # first event index of the window
    truth: np.ndarray  # uint32 code of the next added or bought item
    relevant: list[set[int]]  # codes added or bought from the next such event to RECALL_WINDOW_MS after it
    user: np.ndarray


def positions(c: Clicks, t_from: int, window: int) -> Positions:
    is_cart = np.isin(c.type, CART_TYPES) & (c.item != 0)
    carts = np.flatnonzero(is_cart)
    candidates = np.flatnonzero(c.ts >= t_from)
    j = np.searchsorted(carts, candidates, side="right")
    ok = j < len(carts)
    nxt = carts[np.minimum(j, len(carts) - 1)]
    ok &= c.user[nxt] == c.user[candidates]
    index, nxt = candidates[ok], nxt[ok]
    user_start = np.searchsorted(c.user, c.user[index])  # c is sorted by user
    relevant = []
    for k in nxt.tolist():
        items = set()
        end = c.ts[k] + RECALL_WINDOW_MS
        for m in carts[np.searchsorted(carts, k) :].tolist():
            if c.user[m] != c.user[k] or c.ts[m] > end:
                break
            items.add(int(c.item[m]))
        relevant.append(items)
    return Positions(index, np.maximum(user_start, index - window + 1), c.item[nxt], relevant, c.user[index])


# ---- scorers -----------------------------------------------------------------------------------------


def _recency(types: np.ndarray, items: np.ndarray, decay: float = 0.85) -> np.ndarray:
    has = (items != 0) & np.isin(types, ITEM_TYPES)
    after = np.cumsum(has[::-1])[::-1] - has
    return np.where(has, decay**after, 0.0)


def model_scorer(model: ItemModel, config: ItemConfig) -> Scorer:
    code_of = {name: int(code) for name, code in zip(model.item_ids, model.codes.tolist(), strict=True)}

    def score(items: list[np.ndarray], types: list[np.ndarray], ts: list[np.ndarray]) -> list[list[int]]:
        out = suggest(model, items, types, ts, k=TOP, config=config)
        return [[] if s is None else [code_of[x.item_id] for x in s] for s in out]

    return score


def popular_scorer(popular: list[int]) -> Scorer:
    def score(items: list[np.ndarray], types: list[np.ndarray], ts: list[np.ndarray]) -> list[list[int]]:
        out = []
        for it, ty in zip(items, types, strict=True):
            bought = set(it[ty == PURCHASE].tolist())
            out.append([x for x in popular[: TOP + len(bought)] if x not in bought][:TOP])
        return out

    return score


def category_scorer(
    popular: list[int], by_category: dict[int, list[tuple[int, float]]], cats: dict[int, int]
) -> Scorer:
    """The user's categories (recency-weighted, from the window's items) x each item's share of its category."""

    def score(items: list[np.ndarray], types: list[np.ndarray], ts: list[np.ndarray]) -> list[list[int]]:
        out = []
        for it, ty in zip(items, types, strict=True):
            bought = set(it[ty == PURCHASE].tolist())
            weight: dict[int, float] = {}
            for item, w in zip(it.tolist(), _recency(ty, it).tolist(), strict=True):
                if w > 0 and item in cats:
                    weight[cats[item]] = weight.get(cats[item], 0.0) + w
            scored: dict[int, float] = {}
            for cat, w in weight.items():
                for item, share in by_category.get(cat, []):
                    scored[item] = w * share
            ranked = [x for x, _ in sorted(scored.items(), key=lambda kv: (-kv[1], kv[0])) if x not in bought]
            ranked += [x for x in popular if x not in bought and x not in scored]
            out.append(ranked[:TOP])
        return out

    return score


def recently_viewed(items: list[np.ndarray], types: list[np.ndarray], ts: list[np.ndarray]) -> list[list[int]]:
    """The window's items, most recent first (any event with an item), less those bought in it."""
    out = []
    for it, ty in zip(items, types, strict=True):
        bought = set(it[ty == PURCHASE].tolist())
        seen: list[int] = []
        for x in it[::-1][np.isin(ty[::-1], ITEM_TYPES)].tolist():
            if x and x not in bought and x not in seen:
                seen.append(x)
                if len(seen) == TOP:
                    break
        out.append(seen)
    return out


def popularity(c: Clicks, until: int) -> tuple[list[int], dict[int, list[tuple[int, float]]]]:
    """Items by interactions before ``until`` (most first, ties by code), and per category its top items with their
    share of the category's interactions."""
    use = (c.ts < until) & np.isin(c.type, ITEM_TYPES) & (c.item != 0)
    codes, counts = np.unique(c.item[use], return_counts=True)
    order = np.lexsort((codes, -counts))
    ranked = codes[order].tolist()
    by_category: dict[int, list[tuple[int, float]]] = {}
    totals: dict[int, int] = {}
    for code, n in zip(ranked, counts[order].tolist(), strict=True):
        cat = c.categories.get(code, 0)
        totals[cat] = totals.get(cat, 0) + n
        if len(by_category.setdefault(cat, [])) < TOP:
            by_category[cat].append((code, float(n)))
    for cat, lst in by_category.items():
        by_category[cat] = [(code, n / totals[cat]) for code, n in lst]
    return ranked[: 4 * TOP], by_category


def oracle_rankings(paths: Sequence[Path], event_ids: list[str], pos: Positions) -> list[list[int]]:
    """The truth files' ``next_items`` at the positions (matched by event_id), as crc32 codes."""
    wanted = {event_ids[i]: k for k, i in enumerate(pos.index.tolist())}
    out: list[list[int]] = [[] for _ in range(len(pos.index))]
    for path in paths:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            for line in f:
                row = orjson.loads(line)
                k = wanted.get(row.get("event_id"))
                if k is not None and row.get("next_items"):
                    out[k] = [_crc(item) for item, _ in row["next_items"]]
    return out


# ---- metrics -----------------------------------------------------------------------------------------


def per_position(ranked: list[list[int]], pos: Positions) -> np.ndarray:
    """[n, 4]: hit@5, hit@10, recall@10, reciprocal rank (0 past 10) per position."""
    out = np.zeros((len(ranked), 4))
    for k, (top, truth, rel) in enumerate(zip(ranked, pos.truth.tolist(), pos.relevant, strict=True)):
        top = top[:TOP]
        if truth in top:
            r = top.index(truth) + 1
            out[k, 0], out[k, 1], out[k, 3] = r <= 5, 1.0, 1.0 / r
        out[k, 2] = len(rel.intersection(top)) / len(rel)
    return out


def bootstrap(values: dict[str, np.ndarray], user: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Means with user-level bootstrap 95 % intervals, the model's lead over each other scorer and its share of the
    oracle, each with its interval (the same resampled users for every scorer)."""
    users, inverse = np.unique(user, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    sums = {
        name: np.stack([np.bincount(inverse, v[:, j], len(users)) for j in range(v.shape[1])], 1)
        for name, v in values.items()
    }
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {name: [] for name in values}
    for start in range(0, n_boot, 100):
        w = np.stack(
            [
                np.bincount(rng.integers(len(users), size=len(users)), minlength=len(users))
                for _ in range(min(100, n_boot - start))
            ]
        ).astype(np.float64)
        n = w @ counts
        for name in values:
            draws[name].append((w @ sums[name]) / n[:, None])
    boot = {name: np.concatenate(d) for name, d in draws.items()}

    def ci(a: np.ndarray) -> list[float]:
        return [float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))]

    out: dict[str, Any] = {"scorers": {}, "lead": {}, "share_of_oracle": {}}
    for name, v in values.items():
        mean = v.mean(axis=0)
        out["scorers"][name] = {
            m: {"value": float(mean[j]), "ci95": ci(boot[name][:, j])} for j, m in enumerate(METRICS)
        }
    for name in values:
        if name == MODEL:
            continue
        diff = boot[MODEL] - boot[name]
        point = values[MODEL].mean(axis=0) - values[name].mean(axis=0)
        out["lead"][name] = {m: {"value": float(point[j]), "ci95": ci(diff[:, j])} for j, m in enumerate(METRICS)}
    if ORACLE in values:
        ratio = boot[MODEL] / np.maximum(boot[ORACLE], 1e-12)
        point = values[MODEL].mean(axis=0) / np.maximum(values[ORACLE].mean(axis=0), 1e-12)
        out["share_of_oracle"] = {m: {"value": float(point[j]), "ci95": ci(ratio[:, j])} for j, m in enumerate(METRICS)}
    return out


# ---- the run -----------------------------------------------------------------------------------------


def evaluate_items(
    events: list[Event],
    model: ItemModel,
    truth: Sequence[Path] | None,
    t_from: str | None,
    *,
    window: int = FeaturizerConfig().window,
    n_boot: int = 1000,
    seed: int = 0,
    batch: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """The report (see ``markdown``) of the item model, the baselines and, given truth files, the oracle, on the
    positions at or after ``t_from`` (a fraction of the data's span or an ISO time; None: the model's training
    cut)."""
    t0 = time.perf_counter()
    c = clicks(events, float(model.manifest.get("train", {}).get("session_gap_s", 1800.0)))
    start = int(model.manifest["trained_until_ms"]) if t_from is None else split_time(c, t_from)
    pos = positions(c, start, window)
    if not len(pos.index):
        raise ValueError("no position in the test period is followed by an add to cart or a purchase")
    popular, by_category = popularity(c, start)
    config = model.config
    scorers: dict[str, Scorer] = {
        MODEL: model_scorer(model, config),
        BASELINES[0]: popular_scorer(popular),
        BASELINES[1]: category_scorer(popular, by_category, c.categories),
        BASELINES[2]: recently_viewed,
    }
    ranked: dict[str, list[list[int]]] = {name: [] for name in scorers}
    seconds = dict.fromkeys(scorers, 0.0)
    bar = tqdm(total=len(pos.index), desc="evaluate-items", unit=" positions", disable=not progress, file=sys.stderr)
    for a in range(0, len(pos.index), batch):
        idx, starts = pos.index[a : a + batch].tolist(), pos.window_start[a : a + batch].tolist()
        items = [c.item[s : i + 1] for s, i in zip(starts, idx, strict=True)]
        types = [c.type[s : i + 1] for s, i in zip(starts, idx, strict=True)]
        ts = [c.ts[s : i + 1] for s, i in zip(starts, idx, strict=True)]
        for name, scorer in scorers.items():
            t = time.perf_counter()
            ranked[name].extend(scorer(items, types, ts))
            seconds[name] += time.perf_counter() - t
        bar.update(len(idx))
    bar.close()
    if truth:
        ranked[ORACLE] = oracle_rankings(truth, c.event_ids, pos)
    values = {name: per_position(r, pos) for name, r in ranked.items()}
    stats = bootstrap(values, pos.user, n_boot, seed)
    test_users = len(np.unique(pos.user))
    # per position: does the window hold an item the model knows, and the true item itself
    known = np.r_[0, np.cumsum(model.index_of(c.item) >= 0)]
    cold = known[pos.index + 1] - known[pos.window_start] == 0
    seen = [t in set(c.item[s : i + 1].tolist()) for t, s, i in zip(pos.truth.tolist(), pos.window_start.tolist(), pos.index.tolist(), strict=True)]  # fmt: skip
    return {
        **stats,
        "positions": len(pos.index),
        "users": int(test_users),
        "events": len(c),
        "t_from": start,
        "t_start": int(c.ts.min()),
        "t_end": int(c.ts.max()),
        "cold_positions": float(np.mean(cold)),
        "truth_item_unknown_to_model": float(np.mean(model.index_of(pos.truth) < 0)),
        "truth_seen_in_window": float(np.mean(seen)),
        "us_per_position": {name: round(1e6 * s / len(pos.index), 1) for name, s in seconds.items()},
        "model": {"path": str(model.path), "version": model.version, "serving": config.to_dict()},
        "bootstrap": n_boot,
        "window": window,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def markdown(report: dict[str, Any]) -> str:
    def fmt(x: dict[str, Any]) -> str:
        lo, hi = x["ci95"]
        return f"{x['value']:.4f} [{lo:.4f}, {hi:.4f}]"

    hours = (report["t_end"] - report["t_from"]) / 3_600_000
    lines = [
        "# Item suggestions: evaluation",
        "",
        f"{report['positions']} positions of {report['users']} users in the test period ({hours:.1f} h from the test "
        f"start to the last event; {report['events']} events in all): every event followed by a later add to cart or "
        "purchase of the same user; the truth is that next item. Each scorer sees the engine's window (the user's "
        f"last {report['window']} events). Values with user-level bootstrap 95 % intervals ({report['bootstrap']} "
        "resamples).",
        "",
        "| scorer | " + " | ".join(METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for name, m in report["scorers"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(m[k]) for k in METRICS) + " |")
    lines += ["", "The item model's lead (model minus scorer; an interval above zero: the model is better):", ""]
    lines += ["| over | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, m in report["lead"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(m[k]) for k in METRICS) + " |")
    if report["share_of_oracle"]:
        s = report["share_of_oracle"]
        lines += ["", "The item model as a share of the oracle: " + ", ".join(f"{k} {fmt(s[k])}" for k in METRICS)]
    lines += [
        "",
        f"- the true item was in the window already at {100 * report['truth_seen_in_window']:.1f} % of the positions; "
        f"unknown to the model (not in its training period) at {100 * report['truth_item_unknown_to_model']:.1f} %; "
        f"the model had only the popularity fallback at {100 * report['cold_positions']:.1f} %.",
        "- time per position: " + ", ".join(f"{k} {v} µs" for k, v in report["us_per_position"].items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], out: Path, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["scorers"])
    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        m = report["scorers"][name]
        vals = [m[x]["value"] for x in METRICS]
        err = np.array([[m[x]["value"] - m[x]["ci95"][0], m[x]["ci95"][1] - m[x]["value"]] for x in METRICS]).T
        ax.bar(
            np.arange(len(METRICS)) + (k - (len(names) - 1) / 2) * width, vals, width, yerr=err, capsize=2, label=name
        )
    ax.set_xticks(np.arange(len(METRICS)), METRICS)
    ax.set_ylabel("share of positions (recall: of items)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = "items.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


# ---- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__  # what it does, in order
    parser.add_argument("--model", type=Path, required=True, help="item artifacts directory (newest) or one artifact")
    parser.add_argument(
        "--data", nargs="+", required=True, metavar="FILE", help="JSON lines (.gz ok), REES46 or Taobao CSV"
    )
    parser.add_argument("--truth", nargs="+", type=Path, default=None, metavar="FILE", help="simulator truth files")
    parser.add_argument(
        "--from",
        dest="t_from",
        default=None,
        help="test start: a fraction of the data's time span or an ISO-8601 time (default: the time the model was "
        "trained up to, from its manifest)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR")
    parser.add_argument("--bootstrap", type=int, default=1000, help="user-level bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write report.json here")


def run(args: argparse.Namespace, settings: Any) -> int:
    try:
        model = select_items(args.model)
    except ArtifactError as exc:
        print(f"intentstream evaluate-items: refused: {exc}", file=sys.stderr)
        return 2
    events = read_events(args.data)
    if args.t_from is None and model.manifest.get("data_hash") != files_hash(args.data):
        print(
            "intentstream evaluate-items: the model was trained on other data; say where the test starts with --from",
            file=sys.stderr,
        )
        return 2
    try:
        report = evaluate_items(events, model, args.truth, args.t_from, n_boot=args.bootstrap, seed=args.seed,
                                progress=not args.quiet)  # fmt: skip
    except ValueError as exc:
        print(f"intentstream evaluate-items: {exc}", file=sys.stderr)
        return 2
    report["sources"] = [str(p) for p in args.data]
    args.out.mkdir(parents=True, exist_ok=True)
    report["plots"] = [plot(report, args.out, ", ".join(Path(p).name for p in args.data))]
    write_report(args.out, report, markdown(report), args.json)
    if not args.quiet:
        print(markdown(report))
    print(f"wrote {args.out / 'report.json'}, report.md and items.png in {report['seconds']} s")
    return 0
