"""How close an event-only model can get to the simulator's purchase oracle, on the positions ``evaluate`` judges.

    python -m training.oracle_gap --data var/train/sim60k.jsonl.gz [--model ARTIFACT] [--json PATH]

The oracle (the truth file's p_purchase) knows each user's hidden persona; a model sees only events. Beside it this
scores ``stream.traffic.simulator.persona_posterior_purchase`` (the simulator's chain, the persona inferred from the
events: in-session evidence, then also the visit times), the chain replayed as if every user were a loyal regular,
and optionally a trained artifact, with ``evaluate``'s own test positions and user-level bootstrap. The Bayes rows
are a reference, not a model to ship: they know the simulator's parameters. docs/training.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.artifact import resolve_device
from stream.traffic import simulator
from training import metrics as M
from training.data import TEST, DataConfig, build_dataset, files_hash, read_events
from training.evaluate import data_config_for, head_positions, read_truth, select_artifacts, sequence_probs
from training.train import Tensors

HISTORY_BANDS = ((1, 5), (6, 20), (21, 60), (61, None))  # the user's events so far, this one included


def oracle_gap(
    data: Path,
    model: Path | None = None,
    days: float = 30.0,
    start: str = simulator.DEFAULT_START,
    bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Purchase ROC-AUC and PR-AUC of every scorer on evaluate's test positions, the oracle minus each (and each minus
    the model) with its 95% interval, and ROC-AUC by the length of the user's history so far. ``days`` and ``start``:
    the simulated period, as given to ``intentstream simulate`` (the visit-time evidence depends on it)."""
    models = select_artifacts(model)[:1] if model else []
    config = data_config_for(models) if models else DataConfig()
    events = read_events([data])
    ds = build_dataset(events, config, data_hash=files_hash([data]), sources=[str(data)])
    truth = read_truth([simulator.truth_path(data)], ds)
    start_ms = simulator.parse_start(start)
    end_ms = start_ms + round(days * simulator.DAY_MS)
    if not (start_ms <= ds.t_start and ds.t_end < end_ms and end_ms - ds.t_end <= simulator.DAY_MS):
        raise SystemExit(
            f"oracle_gap: the events run from {ds.t_start} to {ds.t_end} (epoch ms), not over {days:g} days from "
            f"{start}: pass the --days and --start that `intentstream simulate` was given"
        )
    src = ds.source_index  # record -> position in the file's order, which the simulator's functions use
    horizon_s = int(config.horizon_s)
    scores: dict[str, np.ndarray] = {"oracle": truth[:, 0]}
    for name, between in (("bayes", False), ("bayes_with_visits", True)):
        p = simulator.persona_posterior_purchase(
            events, horizon_s, between_sessions=between, start_ms=start_ms, end_ms=end_ms
        )
        scores[name] = p[src]
    scores["loyal_regular_replay"] = np.array(simulator.purchase_oracle(horizon_s))[simulator.replay_states(events)][
        src
    ]
    if models:
        scores["model"] = sequence_probs(models[0], ds, Tensors(ds), resolve_device("cpu"))[:, 0]
    test = head_positions(ds, TEST)["purchase"]
    y = ds.purchase[test].astype(np.float64)
    report: dict[str, Any] = {
        "data": str(data),
        "model": str(models[0].path) if models else None,
        "positions": int((~np.isnan(y)).sum()),
        "positives": int(np.nansum(y)),
        "scorers": {n: {"roc_auc": M.roc_auc(y, p[test]), "pr_auc": M.pr_auc(y, p[test])} for n, p in scores.items()},
    }
    reps = M.bootstrap_replicates(y, {n: p[test] for n, p in scores.items()}, ds.record_user[test], bootstrap, seed)
    pairs = [("oracle", n) for n in scores if n != "oracle"]
    pairs += [(n, "model") for n in scores if models and n not in ("oracle", "model")]
    report["differences"] = {
        f"{a} - {b}": {m: M.interval(reps[a][m] - reps[b][m]) for m in ("roc_auc", "pr_auc")} for a, b in pairs
    }
    report["bootstrap"] = {"replicates": bootstrap, "seed": seed, "unit": "user", "level": 0.95}
    seen: dict[str, int] = {}
    so_far = np.zeros(len(events), dtype=np.int64)  # the user's events up to and including this one
    for i, e in enumerate(events):
        so_far[i] = seen[e.user_id] = seen.get(e.user_id, 0) + 1
    so_far_t = so_far[src][test]
    report["roc_auc_by_history"] = {}
    for lo, hi in HISTORY_BANDS:
        m = (so_far_t >= lo) & (so_far_t <= (np.inf if hi is None else hi))
        row: dict[str, Any] = {"positions": int((~np.isnan(y[m])).sum())}
        row |= {n: M.roc_auc(y[m], p[test][m]) for n, p in scores.items()}
        report["roc_auc_by_history"][f"{lo}-{'' if hi is None else hi}"] = row
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.oracle_gap",
        description="How close an event-only predictor gets to the simulator's purchase oracle, on the test positions "
        "of `intentstream evaluate`: the oracle, a Bayes predictor that infers the persona from the events, a "
        "persona-blind replay of the chain and optionally a trained model, with user-level bootstrap intervals.",
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="events written by `intentstream simulate` (truth beside)"
    )
    parser.add_argument("--model", type=Path, help="an artifact (or a folder of them: the newest) to score beside")
    parser.add_argument("--days", type=float, default=30.0, help="the simulated period's length, as simulate's --days")
    parser.add_argument("--start", default=simulator.DEFAULT_START, help="its start, as simulate's --start")
    parser.add_argument("--bootstrap", type=int, default=200, help="user-level replicates (default 200)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    report = oracle_gap(args.data, args.model, args.days, args.start, args.bootstrap)
    print(f"{report['positions']} labelled purchase test positions, {report['positives']} positive")
    for name, s in report["scorers"].items():
        gap = report["differences"].get(f"oracle - {name}", {}).get("roc_auc")
        behind = "" if gap is None else f"  oracle - it {gap['mean']:+.4f} ({gap['lo']:+.4f} to {gap['hi']:+.4f})"
        print(f"{name:22s} ROC-AUC {s['roc_auc']:.4f}  PR-AUC {s['pr_auc']:.4f}{behind}")
    for band, row in report["roc_auc_by_history"].items():
        print(f"events so far {band:6s} ({row['positions']:>6} positions): "
              + " ".join(f"{n} {v:.3f}" for n, v in row.items() if n != "positions"))  # fmt: skip
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
