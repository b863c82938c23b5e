"""Simulator speed, and the sanity experiment that the targets depend on order and timing.

python -m load_tests.bench_simulator [--events 1000000] [--json PATH]
    simulate about N events and write them gzipped (with the truth file): events/s, one process.
python -m load_tests.bench_simulator --experiment [--users 3000] [--days 30] [--seed 0] [--json PATH]
    on a time-based holdout (the last third of each head's labelled period), compare (a) the oracle,
    (b) gradient-boosted trees on aggregate history features (counts, no order or timing), (c) the same
    plus a few order/timing features. docs/simulator.md has the results.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from stream.contract import EVENT_TYPES, TYPE_CODE
from stream.traffic import simulator

DAY_MS = 86_400_000


# ---- speed ------------------------------------------------------------------------------------------


def bench(events: int, days: float, seed: int) -> dict[str, Any]:
    pilot_users = 300
    pilot = simulator.simulate(pilot_users, days, seed)
    users = max(1, round(events * pilot_users / max(1, len(pilot.events))))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.jsonl.gz"
        started, cpu_started = time.perf_counter(), time.process_time()
        summary = simulator.write_simulation(out, users, days, seed)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        sizes = {"events_bytes": out.stat().st_size, "truth_bytes": simulator.truth_path(out).stat().st_size}
    result = {
        "events": summary["events"],
        "users": users,
        "days": days,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "events_per_s": round(summary["events"] / seconds),
        "seconds_per_million": round(seconds * 1e6 / summary["events"], 2),
        **sizes,
    }
    print(
        f"simulate: {result['events']} events ({users} users x {days:g} days) written gzipped with truth in "
        f"{seconds:.1f} s ({cpu_seconds:.1f} s of CPU) = {result['events_per_s']} events/s "
        f"({result['seconds_per_million']} s per million)"
    )
    return result


# ---- the experiment -----------------------------------------------------------------------------------


def _group_start(keys: np.ndarray) -> np.ndarray:
    """Index of the first row of each row's run of equal keys (rows grouped by key)."""
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return np.maximum.accumulate(np.where(first, np.arange(len(keys)), 0))


def _cumsum_in_group(values: np.ndarray, start: np.ndarray) -> np.ndarray:
    c = np.cumsum(values, axis=0)
    before = np.concatenate([np.zeros((1, *values.shape[1:])), c[:-1]])
    return c - before[start]


def features(sim: simulator.Simulation) -> dict[str, Any]:
    """Per-event features of the user's history up to and including the event, in (user, time) order."""
    ev = sim.events
    n = len(ev)
    user = np.fromiter((int(e.user_id[1:]) for e in ev), np.int64, n)
    ts = np.fromiter((e.ts for e in ev), np.int64, n)
    order = np.lexsort((np.arange(n), ts, user))
    user, ts = user[order], ts[order]
    ev = [ev[i] for i in order]
    truth = [sim.truth[i] for i in order]
    etype = np.fromiter((TYPE_CODE[e.type] for e in ev), np.int64, n)
    price = np.fromiter((math.nan if e.price is None else e.price for e in ev), np.float64, n)
    qty = np.fromiter((1 if e.quantity is None else e.quantity for e in ev), np.float64, n)
    session_codes: dict[str, int] = {}
    session = np.fromiter((session_codes.setdefault(e.session_id or "", len(session_codes)) for e in ev), np.int64, n)
    u_start = _group_start(user)
    s_start = _group_start(session)
    onehot = np.eye(8)[etype]
    hist = _cumsum_in_group(onehot, u_start)
    sess = _cumsum_in_group(onehot, s_start)
    new_session = (s_start == np.arange(n)).astype(np.float64)
    n_sessions = _cumsum_in_group(new_session, u_start)
    is_view = (etype == TYPE_CODE["product_view"]) & ~np.isnan(price)
    views = _cumsum_in_group(is_view.astype(np.float64), u_start)
    view_price = _cumsum_in_group(np.where(is_view, price, 0.0), u_start)
    is_buy = etype == TYPE_CODE["purchase"]
    bought = _cumsum_in_group(np.where(is_buy, price * qty, 0.0), u_start)
    aggregate = np.column_stack(
        [
            hist,
            sess,
            hist.sum(axis=1),
            n_sessions,
            np.where(views > 0, view_price / np.maximum(views, 1), np.nan),
            bought,
            (ts - ts[u_start]) / DAY_MS,
        ]
    )
    aggregate_names = [f"n_{t}" for t in EVENT_TYPES] + [f"session_n_{t}" for t in EVENT_TYPES]
    aggregate_names += ["n_events", "n_sessions", "mean_view_price", "purchased_value", "days_since_first"]
    # Order and timing: gap since the previous event, the last three types, time since the last addition.
    first = u_start == np.arange(n)
    gap = np.where(first, np.nan, (ts - np.concatenate([[0], ts[:-1]])) / 1000.0)
    prev = [etype]
    for lag in (1, 2):
        shifted = np.concatenate([np.full(lag, -1), etype[:-lag]])
        ok = np.arange(n) - lag >= u_start
        prev.append(np.where(ok, shifted, -1))
    last_add = np.maximum.accumulate(np.where(etype == TYPE_CODE["add_to_cart"], np.arange(n), -1))
    since_add = np.where(last_add >= u_start, (ts - ts[np.maximum(last_add, 0)]) / 1000.0, np.nan)
    timing = np.column_stack([gap, *prev, since_add])
    timing_names = ["gap_s", "type_0", "type_1", "type_2", "since_add_s"]
    # What a sequence model can reconstruct: the simulator's chain state replayed from the visible events with
    # the persona unknown (everyone replayed as a loyal regular): stage, intent and cart lines.
    _, stage, intent, cart = simulator.state_parts(simulator.replay_states(ev))
    replayed = np.column_stack([stage, intent, cart])
    next_new = np.ones(n, dtype=bool)  # the event closes its session (what the engine scores churn at)
    next_new[:-1] = s_start[1:] == np.arange(1, n)
    return {
        "ts": ts,
        "aggregate": aggregate,
        "aggregate_names": aggregate_names,
        "timing": timing,
        "timing_names": timing_names,
        "replayed": replayed,
        "session_end": next_new,
        "label_purchase": np.array([t["label_purchase"] for t in truth], dtype=np.float64),
        "label_churn": np.array([t["label_churn"] for t in truth], dtype=np.float64),
        "p_purchase": np.array([t["p_purchase"] for t in truth]),
        "p_churn": np.array([t["p_churn"] for t in truth]),
        "p_churn_session_end": np.array([t["p_churn_session_end"] for t in truth]),
    }


def _gbt(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, categorical: list[bool]) -> np.ndarray:
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(
        max_iter=300,
        learning_rate=0.08,
        max_leaf_nodes=31,
        min_samples_leaf=40,
        l2_regularization=1.0,
        early_stopping=True,
        validation_fraction=0.15,
        n_iter_no_change=20,
        categorical_features=np.array(categorical) if any(categorical) else None,
        random_state=0,
    )
    model.fit(x_train, y_train)
    return model.predict_proba(x_test)[:, 1]


def _metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {"roc_auc": float(roc_auc_score(y, p)), "pr_auc": float(average_precision_score(y, p))}


def experiment(users: int, days: float, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    sim = simulator.simulate(users, days, seed, progress=True)
    f = features(sim)
    ts = f["ts"]
    agg, timing = f["aggregate"], f["timing"]
    both = np.column_stack([agg, timing])
    # (d) the replayed chain state and the gap since the previous event: what a sequence model can reconstruct
    # (few features: history sizes such as days_since_first shift between the train and test periods).
    rich = np.column_stack([f["replayed"], timing[:, 0]])
    cat_agg = [False] * agg.shape[1]
    cat_both = [*cat_agg, False, True, True, True, False]
    cat_rich = [True, False, False, False]
    horizon_ms, churn_ms = sim.horizon_ms, sim.churn_ms
    heads = {
        # head: (label, oracle, mask of positions, end of the period whose labels are fully observed)
        "purchase": (f["label_purchase"], f["p_purchase"], np.ones(len(ts), bool), sim.end_ms - horizon_ms),
        "churn": (f["label_churn"], f["p_churn"], np.ones(len(ts), bool), sim.end_ms - churn_ms),
        "churn_at_session_end": (f["label_churn"], f["p_churn_session_end"], f["session_end"], sim.end_ms - churn_ms),
    }
    results: dict[str, Any] = {"users": users, "days": days, "seed": seed, "events": len(ts), "heads": {}}
    for head, (label, oracle, where, labelled_end) in heads.items():
        known = where & ~np.isnan(label) & (ts <= labelled_end)
        split = sim.start_ms + (labelled_end - sim.start_ms) * 2 // 3
        train, test = known & (ts < split), known & (ts >= split)
        y_train, y_test = label[train], label[test]
        rows = {
            "a_oracle": _metrics(y_test, oracle[test]),
            "b_gbt_aggregate": _metrics(y_test, _gbt(agg[train], y_train, agg[test], cat_agg)),
            "c_gbt_aggregate_plus_timing": _metrics(y_test, _gbt(both[train], y_train, both[test], cat_both)),
            "d_gbt_replayed_state_gap": _metrics(y_test, _gbt(rich[train], y_train, rich[test], cat_rich)),
        }
        results["heads"][head] = {
            "train": int(train.sum()),
            "test": int(test.sum()),
            "test_positive_rate": float(y_test.mean()),
            "split_day": round((split - sim.start_ms) / DAY_MS, 2),
            **rows,
        }
    results["seconds"] = round(time.perf_counter() - started, 1)
    _print_table(results)
    return results


MODELS = ("a_oracle", "b_gbt_aggregate", "c_gbt_aggregate_plus_timing", "d_gbt_replayed_state_gap")


def _print_table(results: dict[str, Any]) -> None:
    print(f"\n{results['users']} users x {results['days']:g} days, seed {results['seed']}: {results['events']} events")
    print(f"{'head':22s} {'model':30s} {'ROC-AUC':>8s} {'PR-AUC':>8s}   test n (positive rate)")
    for head, r in results["heads"].items():
        for model in MODELS:
            m = r[model]
            tail = f"   {r['test']} ({100 * r['test_positive_rate']:.1f} %)" if model == "a_oracle" else ""
            print(f"{head:22s} {model:30s} {m['roc_auc']:8.4f} {m['pr_auc']:8.4f}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="events to simulate for the speed figure")
    parser.add_argument("--experiment", action="store_true", help="run the oracle vs. baselines experiment instead")
    parser.add_argument("--users", type=int, default=3000, help="experiment: users")
    parser.add_argument("--days", type=float, default=30.0, help="simulated days")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args(argv)
    result = (
        experiment(args.users, args.days, args.seed) if args.experiment else bench(args.events, args.days, args.seed)
    )
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
