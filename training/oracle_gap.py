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

from stream.traffic import simulator
from training import metrics as M
from training.data import TEST, DataConfig, build_dataset, files_hash, read_events
from training.evaluate import data_config_for, head_positions, read_truth, select_artifacts, sequence_probs
from training.train import Tensors

HISTORY_BANDS = ((1, 5), (6, 20), (21, 60), (61, None))  # events of the user so far, this one included


def oracle_gap(
    data: Path, model: Path | None = None, days: float = 30.0, bootstrap: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Purchase ROC-AUC and PR-AUC of every scorer on evaluate's test positions, the oracle minus each with its 95%
    interval, and ROC-AUC by the length of the user's history so far."""
    models = select_artifacts(model) if model else []
    config = data_config_for(models) if models else DataConfig()
    events = read_events([data])
    ds = build_dataset(events, config, data_hash=files_hash([data]), sources=[str(data)])
    truth = read_truth([simulator.truth_path(data)], ds)
    start_ms = simulator.DEFAULT_START_MS
    end_ms = start_ms + round(days * simulator.DAY_MS)
    if not (ds.t_start >= start_ms and ds.t_end < end_ms):
        raise SystemExit(f"oracle_gap: the events are not within {days:g} days from {simulator.DEFAULT_START}")
    src = ds.source_index  # record -> position in the file's order, which the simulator's functions use
    table = np.array(simulator.purchase_oracle(int(config.horizon_s)))
    scores: dict[str, np.ndarray] = {"oracle": truth[:, 0]}
    for name, between in (("bayes", False), ("bayes_with_visits", True)):
        states, post = simulator.persona_posterior(events, between_sessions=between, start_ms=start_ms, end_ms=end_ms)
        scores[name] = (post * table[states]).sum(axis=1)[src]
    scores["loyal_regular_replay"] = table[simulator.replay_states(events)][src]
    if models:
        scores["model"] = sequence_probs(models[0], ds, Tensors(ds), torch_cpu())[:, 0]
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
    report["oracle_minus"] = {
        n: {m: M.interval(reps["oracle"][m] - reps[n][m]) for m in ("roc_auc", "pr_auc")}
        for n in scores
        if n != "oracle"
    }
    report["bootstrap"] = {"replicates": bootstrap, "seed": seed, "unit": "user", "level": 0.95}
    seen: dict[str, int] = {}
    so_far = np.zeros(len(events), dtype=np.int64)
    for i, e in enumerate(events):
        so_far[i] = seen[e.user_id] = seen.get(e.user_id, 0) + 1
    so_far_t = so_far[src][test]
    report["roc_auc_by_history"] = {}
    for lo, hi in HISTORY_BANDS:
        m = (so_far_t >= lo) & (so_far_t <= (hi or so_far_t.max()))
        row: dict[str, Any] = {"positions": int((~np.isnan(y[m])).sum())}
        row |= {n: M.roc_auc(y[m], p[test][m]) for n, p in scores.items()}
        report["roc_auc_by_history"][f"{lo}-{hi or ''}"] = row
    return report


def torch_cpu() -> Any:
    import torch

    return torch.device("cpu")


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
    parser.add_argument("--bootstrap", type=int, default=200, help="user-level replicates (default 200)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    report = oracle_gap(args.data, args.model, args.days, args.bootstrap)
    print(f"{report['positions']} labelled purchase test positions, {report['positives']} positive")
    for name, s in report["scorers"].items():
        gap = report["oracle_minus"].get(name, {}).get("roc_auc")
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
