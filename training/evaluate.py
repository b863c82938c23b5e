"""`intentstream evaluate`: sequence models, baselines and the oracle side by side on the held-out test split.

    intentstream evaluate --model var/models --data var/sim.jsonl.gz --truth var/sim.truth.jsonl.gz --out var/report

``--model`` is a model directory (the newest version of each architecture is evaluated) or one artifact
folder. Every scorer is judged on the same positions: the test users' events at or after t_split whose
label is known; churn where a session closes (where the engine reads the churn risk and alerts). The
sequence models use the calibration and thresholds in their manifest (what the engine serves); baselines
and the oracle get theirs from validation. Writes report.json, report.md and PR / calibration plots.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from models.artifact import MANIFEST, ArtifactError, LoadedModel, list_versions, load_artifact, resolve_device
from models.model import probabilities
from stream import emit
from stream.settings import Settings
from stream.state.user import UserState
from training import metrics as M
from training.baselines import (
    BASELINE_KINDS,
    AggregateBaseline,
    aggregate_features,
    baseline_features,
    rule_baseline,
)
from training.data import DAY_MS, TEST, VAL, DataConfig, Dataset, add_format_argument, load_dataset
from training.train import Tensors, _finite, predict

HEADS = ("purchase", "churn")
MIN_POSITIVES = 50  # fewer test positives than this: the head's figures are reported but called not meaningful


# ---- inputs ----------------------------------------------------------------------------------------


def select_artifacts(path: Path, device: str = "cpu") -> list[LoadedModel]:
    """One artifact folder, or the newest version of each architecture in a model directory. Raises
    ArtifactError (one line: which artifact, why) for anything that must not be evaluated."""
    if (path / MANIFEST).is_file():
        return [load_artifact(path, device)]
    newest: dict[str, Path] = {}
    for _, p in list_versions(path):  # newest first
        newest.setdefault(p.name.split("-", 1)[1], p)
    if not newest:
        raise ArtifactError(f"{path}: no model artifacts (expected vNNNN-<arch> folders or a {MANIFEST})")
    return [load_artifact(p, device) for p in newest.values()]


def data_config_for(models: list[LoadedModel]) -> DataConfig:
    """The label horizons and user split the (first) model was trained with, so its judged positions stay unseen
    (and the baselines train on what it trained on: ``train_users``)."""
    m = models[0].manifest
    d = m.get("data_config", {})
    base = DataConfig()
    return DataConfig(
        horizon_s=float(m.get("horizon_s", base.horizon_s)),
        churn_days=float(m.get("churn_days", base.churn_days)),
        split_seed=int(d.get("split_seed", base.split_seed)),
        train_frac=float(d.get("train_frac", base.train_frac)),
        val_frac=float(d.get("val_frac", base.val_frac)),
        time_split=float(d.get("time_split", base.time_split)),
        train_users=str(d.get("train_users", base.train_users)),
        featurizer=models[0].featurizer,
    )


def read_truth(paths: list[Path], ds: Dataset) -> np.ndarray:
    """Oracle probabilities [N, 2] (purchase, churn) in record order, NaN where the truth file says nothing.

    Churn is judged where a session closes, so the oracle's churn is P(churn | the session ended here)
    (``p_churn_session_end``) when the truth file has it, else ``p_churn``. Rows are matched by event_id when
    the truth lines carry one, else by line number (one line per event, in the events files' order)."""
    p_purchase, p_churn, ids = [], [], []
    for path in paths:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            for line in f:
                if line.strip():
                    row = orjson.loads(line)
                    ids.append(row.get("event_id"))
                    p_purchase.append(row.get("p_purchase", math.nan))
                    p_churn.append(row.get("p_churn_session_end", row.get("p_churn", math.nan)))
    truth = np.array([p_purchase, p_churn], dtype=np.float64).reshape(2, -1).T
    out = np.full((len(ds), 2), np.nan)
    if ids and ids[0] is not None:
        where = {e: i for i, e in enumerate(ids)}
        rows = np.array([where.get(e, -1) for e in ds.event_ids])
        found = rows >= 0
        out[found] = truth[rows[found]]
    elif len(truth) == len(ds):
        out[:] = truth[ds.source_index]
    else:
        raise ValueError(f"truth files have {len(truth)} rows without event_id for {len(ds)} events")
    return out


# ---- scoring ---------------------------------------------------------------------------------------


def head_positions(ds: Dataset, split: int) -> dict[str, np.ndarray]:
    """Where each head is judged: purchase at every scored event, churn where a session closes."""
    return {head: ds.head_mask(split, head) for head in ("purchase", "churn", "order_value")}


def churn_labellable(ds: Dataset) -> bool:
    return ds.t_end - ds.t_start > ds.config.churn_ms


def score_table(
    ds: Dataset, probs: np.ndarray, thresholds: dict[str, float] | None, heads: tuple[str, ...]
) -> dict[str, Any]:
    """Test metrics of one scorer from its probabilities [N, 3] (purchase, churn, order value). Thresholds
    default to the F1-optimal ones on validation (baselines, oracle)."""
    val, test = head_positions(ds, VAL), head_positions(ds, TEST)
    labels = {"purchase": ds.purchase, "churn": ds.churn}
    out: dict[str, Any] = {}
    for k, head in enumerate(HEADS):
        if head not in heads:
            continue
        y = labels[head]
        threshold = (thresholds or {}).get(head)
        if threshold is None:
            threshold = M.f1_optimal_threshold(y[val[head]], probs[val[head], k])
        out[head] = M.head_metrics(y[test[head]], probs[test[head], k], threshold)
    rows = test["order_value"]
    out["order_value"] = {"mae": M.order_value_mae(ds.order_value[rows], probs[rows, 2]), "n": int(rows.sum())}
    return out


def served_volumes(ds: Dataset, probs: np.ndarray, thresholds: dict[str, dict[str, float]], serving: Settings) -> dict:
    """What the CRM receives from a served model on the test users from t_split, judged against the truth: churn
    alerts (the engine's cooldown applied) per 1,000 active users per day with their precision and recall, and
    intent events per user per day under each emission policy (``stream.emit``'s own rules, each user's state
    starting empty at t_split)."""
    test = head_positions(ds, TEST)
    ts = ds.records["ts"].astype(np.int64)
    out: dict[str, Any] = {}
    at = test["churn"]
    if at.any():
        period = (ds.record_split == TEST) & (ts >= ds.t_split["churn"])
        user_days = M.active_user_days(ds.record_user[period], ts[period])
        cooldown_ms = round(serving.churn_cooldown_s * 1000)
        out["churn_alert"] = M.alert_summary(
            ds.record_user[at], ts[at], probs[at, 1], ds.churn[at], thresholds["churn"]["alert"], cooldown_ms, user_days
        )
    rows = np.flatnonzero(test["purchase"])
    user_days = M.active_user_days(ds.record_user[rows], ts[rows])
    bands = thresholds["purchase"]
    emitted = 0
    state, user = UserState(), -1
    for i in rows:  # in user, then time order
        if ds.record_user[i] != user:
            state, user = UserState(), ds.record_user[i]
        score = float(probs[i, 0])
        band = emit.band_of(score, bands)
        if emit.should_emit(state, score, band, int(ts[i]), "on_change", serving.emit_delta,
                            round(serving.emit_cooldown_s * 1000)):  # fmt: skip
            emitted += 1
            state.last_score, state.last_band, state.last_emit_ts = score, band, int(ts[i])
    high = probs[rows, 0] >= bands["high"]
    out["intents"] = {
        "on_change_per_user_day": emitted / user_days if user_days else math.nan,
        "every_event_per_user_day": len(rows) / user_days if user_days else math.nan,
        "high_per_1k_users_day": M.per_1k_user_days(int(high.sum()), user_days),
        **{f"high_{k}": v for k, v in M.at_threshold(ds.purchase[rows], probs[rows, 0], bands["high"]).items()},
    }
    return out


def sequence_probs(loaded: LoadedModel, ds: Dataset, tensors: Tensors, device) -> np.ndarray:
    """Calibrated probabilities of a served model on the val and test users (engine-equivalent pass)."""
    users = np.flatnonzero(ds.user_split >= VAL)
    raw = predict(loaded.model, ds, tensors, users, device)
    return probabilities(torch.from_numpy(raw), loaded.calibration).numpy()  # the engine's function


def evaluate(
    ds: Dataset,
    models: list[LoadedModel],
    truth: np.ndarray | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    bootstrap: int = 0,
    serving: Settings | None = None,  # the worker's: its emission and churn cooldowns decide the volumes
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(report, probabilities [N, 3] per scorer) on the test split; ``bootstrap``: user-level replicates of every
    model-vs-baseline difference (0: none)."""
    say = print if progress else (lambda *a, **k: None)
    heads = HEADS if churn_labellable(ds) else ("purchase",)
    rows = np.flatnonzero(ds.record_split >= VAL)  # val and test users' records
    scorers: dict[str, np.ndarray] = {}
    thresholds: dict[str, dict[str, float] | None] = {}
    served: dict[str, LoadedModel] = {}
    tensors = Tensors(ds)
    torch_device = resolve_device(device)
    for loaded in models:
        t0 = time.perf_counter()
        name = loaded.config.arch if sum(m.config.arch == loaded.config.arch for m in models) == 1 else loaded.name
        scorers[name] = sequence_probs(loaded, ds, tensors, torch_device)
        served[name] = loaded
        th = loaded.thresholds
        thresholds[name] = {"purchase": th["purchase"]["high"], "churn": th["churn"]["alert"]}
        say(f"{name} ({loaded.path.name}): scored in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    aggregates = aggregate_features(ds)
    full = np.full((len(ds), 3), np.nan)
    full[rows] = rule_baseline(ds, aggregates, rows)
    scorers["rule"] = full
    for kind in BASELINE_KINDS:
        feats = baseline_features(ds, kind, aggregates)
        full = np.full((len(ds), 3), np.nan)
        full[rows] = AggregateBaseline(kind, seed=seed).fit(ds, feats).predict(feats, rows)
        scorers[kind] = full
    say(f"baselines: fitted and scored in {time.perf_counter() - t0:.1f} s")
    if truth is not None:
        scorers["oracle"] = np.concatenate([truth, np.full((len(ds), 1), np.nan)], axis=1)
    report: dict[str, Any] = {"models": {}, "served": {}}
    for name, probs in scorers.items():
        report["models"][name] = score_table(ds, probs, thresholds.get(name), heads)
    for name, loaded in served.items():
        report["served"][name] = {
            "expected_on_validation": loaded.manifest.get("metrics", {}).get("expected"),
            "test": served_volumes(ds, scorers[name], loaded.thresholds, serving or Settings()),
        }
    if truth is not None:
        del report["models"]["oracle"]["order_value"]  # the oracle knows probabilities, not order values
    if bootstrap:
        t0 = time.perf_counter()
        report["bootstrap"] = differences(
            ds, scorers, [n for n in scorers if n not in BASELINES], heads, bootstrap, seed
        )
        say(f"bootstrap: {bootstrap} user-level replicates in {time.perf_counter() - t0:.1f} s")
    notes = _notes(ds, models, report, heads, truth is not None)
    summary = ds.summary()
    report.update(
        {
            "split": {s: summary[s] for s in ("train", "val", "test")},
            "base_rates": {
                "purchase": summary["test"]["purchase_base_rate"],
                **({"churn": summary["test"]["churn_base_rate"]} if "churn" in heads else {}),
            },
            "data": {k: summary[k] for k in ("events", "users", "days", "t_start", "t_end", "t_split")}
            | {"data_hash": ds.data_hash, "sources": ds.sources, "heads": list(heads)},
            "artifacts": {m.path.name: _artifact_summary(m, ds) for m in models},
            "notes": notes,
        }
    )
    if bootstrap:
        report["verdicts"] = verdicts(report)
    return report, scorers


BASELINES = ("rule", *BASELINE_KINDS, "oracle")
STRONG_BASELINE = "gbt"  # order and timing features: the bar a sequence model must clear (docs/training.md)


def verdicts(report: dict[str, Any]) -> dict[str, Any]:
    """Per head, whether the best model (by test PR-AUC) beats the strong baseline: yes when the bootstrap 95%
    interval of its PR-AUC difference lies above zero, no otherwise, said in so many words; and, where the truth is
    known, how far its ROC-AUC is behind the oracle's. Empty without bootstrap replicates: a difference without its
    interval decides nothing."""
    out: dict[str, Any] = {}
    boot, models = report.get("bootstrap"), report["models"]
    candidates = [n for n in models if n not in BASELINES]
    if not boot or not candidates or STRONG_BASELINE not in models:
        return out
    for head in report["data"]["heads"]:
        best = max(candidates, key=lambda n: _or_lowest(models[n][head]["pr_auc"]))
        diff = boot[head][f"{best} - {STRONG_BASELINE}"]["pr_auc"]
        beats: bool | None = bool(diff["lo"] > 0)
        if not diff.get("n") or not (math.isfinite(diff["lo"]) and math.isfinite(diff["hi"])):
            beats, text = None, f"undecided against {STRONG_BASELINE}: no interval (too few positives to resample)"
        elif beats:
            text = f"{best} beats {STRONG_BASELINE}"
        elif diff["hi"] < 0:
            text = f"{best} is worse than {STRONG_BASELINE}"
        else:
            text = f"{best} does not beat {STRONG_BASELINE}: the interval includes zero (a tie)"
        if len(candidates) > 1:  # chosen on the test set it is judged on: the bootstrap table has every model's
            text += f" (the best of {len(candidates)} models by test PR-AUC)"
        v: dict[str, Any] = {
            "best_model": best,
            "baseline": STRONG_BASELINE,
            "pr_auc_difference": diff,
            "beats_baseline": beats,
            "text": f"{head}: {text} on PR-AUC ({_signed(diff['mean'])}, 95% interval {_signed(diff['lo'])} to "
            f"{_signed(diff['hi'])})",
        }
        gap = boot[head].get(f"oracle - {best}")
        if gap is not None:
            v["oracle_roc_auc_gap"] = gap["roc_auc"]
            v["text"] += (
                f"; its ROC-AUC is the oracle's minus {_signed(gap['roc_auc']['mean'])} (95% interval "
                f"{_signed(gap['roc_auc']['lo'])} to {_signed(gap['roc_auc']['hi'])})"
            )
        out[head] = v
    return out


def _or_lowest(v: float | None) -> float:
    """A metric to rank by: one that could not be computed ranks last."""
    return v if v is not None and math.isfinite(v) else -math.inf


def differences(
    ds: Dataset, scorers: dict[str, np.ndarray], models: list[str], heads: tuple[str, ...], n: int, seed: int
) -> dict[str, Any]:
    """Per head, PR-AUC and ROC-AUC of each model minus each baseline (and the oracle minus each model) over ``n``
    bootstrap replicates of the test users: mean, 95% interval, share of replicates above zero."""
    test = head_positions(ds, TEST)
    labels = {"purchase": ds.purchase, "churn": ds.churn}
    out: dict[str, Any] = {"replicates": n, "level": 0.95, "unit": "user"}
    for k, head in enumerate(HEADS):
        if head not in heads:
            continue
        rows = test[head]
        reps = M.bootstrap_replicates(
            labels[head][rows], {name: p[rows, k] for name, p in scorers.items()}, ds.record_user[rows], n, seed
        )
        pairs = [(m, b) for m in models for b in BASELINES if b in scorers and b != "oracle"]
        pairs += [("oracle", m) for m in models if "oracle" in scorers]
        out[head] = {
            f"{a} - {b}": {metric: M.interval(reps[a][metric] - reps[b][metric]) for metric in ("pr_auc", "roc_auc")}
            for a, b in pairs
        }
    return out


def _artifact_summary(m: LoadedModel, ds: Dataset) -> dict[str, Any]:
    return {"name": m.name, "version": m.version, "trained_on_this_data": m.manifest.get("data_hash") == ds.data_hash}


def _notes(ds: Dataset, models: list[LoadedModel], report: dict, heads: tuple[str, ...], oracle: bool) -> list[str]:
    notes = []
    if "churn" not in heads:
        hours = (ds.t_end - ds.t_start) / 3_600_000
        notes.append(
            f"churn: the data spans {hours:.1f} hours, less than the {ds.config.churn_days:g}-day churn horizon, so "
            "no churn label can be known: churn is not evaluated."
        )
    any_model = next(iter(report["models"].values()))
    for head in heads:
        pos = any_model[head]["positives"]
        if pos < MIN_POSITIVES:
            notes.append(
                f"{head}: only {pos} positive test positions (of {any_model[head]['n']}): ROC-AUC, PR-AUC, F1 and "
                "calibration figures are not meaningful at this size."
            )
    if ds.t_end - ds.t_start < 2 * DAY_MS:
        notes.append(
            "the data covers less than two days: the time split leaves the models little history per user, and "
            "the test period is a few hours."
        )
    for m in models:
        if m.manifest.get("train_only_sources"):
            notes.append(
                f"{m.path.name} also trained on other users (--train-only-data {' '.join(m.manifest['train_only_sources'])}): "
                "the baselines here are fitted without them, so part of its lead may be that data."
            )
        if m.manifest.get("data_hash") != ds.data_hash:
            notes.append(
                f"{m.path.name} was trained on other data (data_hash {str(m.manifest.get('data_hash'))[:12]}…): all of "
                "this data is unseen by it; the user x time split still decides the baselines' training rows."
            )
    if oracle:
        notes.append(
            "oracle: the simulator's own probabilities; an upper reference for ranking (ROC-AUC, PR-AUC), not a "
            "trained model. Its thresholds are chosen on validation like the baselines'."
        )
    return notes


# ---- output ----------------------------------------------------------------------------------------

METRIC_COLUMNS = (("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC"), ("precision", "precision"), ("recall", "recall"),
                  ("f1", "F1"), ("threshold", "threshold"), ("brier", "Brier"), ("ece", "ECE"))  # fmt: skip


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _signed(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:+.4f}"


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Evaluation report", ""]
    d = report["data"]
    lines.append(
        f"Data: {d['events']} events, {d['users']} users, {d['days']} days ({', '.join(d['sources'])}). "
        f"Test split: {report['split']['test']['users']} users, events at or after t_split (day "
        f"{(d['t_split']['purchase'] - d['t_start']) / DAY_MS:.1f} for purchase, "
        f"{(d['t_split']['churn'] - d['t_start']) / DAY_MS:.1f} for churn)."
    )
    lines.append("")
    for head in d["heads"]:
        where = "every scored event" if head == "purchase" else "events where a session closes"
        rate = report["base_rates"].get(head)
        lines += [f"## {head} (judged at {where}; test base rate {_fmt(rate)})", ""]
        lines.append("| model | " + " | ".join(title for _, title in METRIC_COLUMNS) + " | n | positives |")
        lines.append("|---" * (len(METRIC_COLUMNS) + 3) + "|")
        for name, m in report["models"].items():
            h = m[head]
            lines.append(
                f"| {name} | " + " | ".join(_fmt(h[k]) for k, _ in METRIC_COLUMNS) + f" | {h['n']} | {h['positives']} |"
            )
        lines.append("")
    lines += [
        "## order value (events followed by a purchase within the horizon)",
        "",
        "| model | MAE | n |",
        "|---|---|---|",
    ]
    for name, m in report["models"].items():
        if "order_value" in m:
            lines.append(f"| {name} | {_fmt(m['order_value']['mae'])} | {m['order_value']['n']} |")
    lines.append("")
    lines += ["## split", "", "| split | users | events scored | purchase labelled | purchase rate | churn labelled | "
              "churn rate |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s, v in report["split"].items():
        lines.append(
            f"| {s} | {v['users']} | {v['events_scored']} | {v['purchase_labelled']} | "
            f"{_fmt(v['purchase_base_rate'])} | {v['churn_labelled']} | {_fmt(v['churn_base_rate'])} |"
        )
    train = report["split"].get("train", {})
    if "users_trained_on" in train and train["users_trained_on"] > train["users"]:
        lines += ["", f"The events of {train['users_trained_on']} users trained (`--train-users all`): the train users' "
                  "and the validation and test users' where nothing trained on reaches the earliest judged period; the "
                  "validation and test rows are the positions judged."]  # fmt: skip
    if report.get("served"):
        lines += ["", "## at the served thresholds (test users from t_split; what the CRM receives)", "",
                  "| model | churn alerts per 1k users/day | (validation) | alert precision | base rate | recall | "
                  "intents per user/day (on_change) | high band per 1k users/day | high precision |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, v in report["served"].items():
            c, i = v["test"].get("churn_alert", {}), v["test"]["intents"]
            expected = (v.get("expected_on_validation") or {}).get("churn_alert") or {}
            lines.append(
                f"| {name} | {_fmt(c.get('alerts_per_1k_users_day'))} | {_fmt(expected.get('alerts_per_1k_users_day'))} "
                f"| {_fmt(c.get('precision'))} | {_fmt(c.get('base_rate'))} | {_fmt(c.get('recall'))} | "
                f"{_fmt(i['on_change_per_user_day'])} | {_fmt(i['high_per_1k_users_day'])} | {_fmt(i['high_precision'])} |"
            )
    if "bootstrap" in report:
        b = report["bootstrap"]
        lines += ["", f"## differences ({b['replicates']} bootstrap replicates of the test users, 95% interval)", "",
                  "| head | difference | PR-AUC | 95% interval | replicates above 0 | ROC-AUC | 95% interval |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for head in d["heads"]:
            for pair, m in b.get(head, {}).items():
                pr, roc = m["pr_auc"], m["roc_auc"]
                lines.append(
                    f"| {head} | {pair} | {_signed(pr['mean'])} | {_signed(pr['lo'])} to {_signed(pr['hi'])} | "
                    f"{_fmt(pr['share_above_zero'])} | {_signed(roc['mean'])} | {_signed(roc['lo'])} to "
                    f"{_signed(roc['hi'])} |"
                )
    if report.get("verdicts"):
        lines += ["", f"## verdicts (the best model against the strong `{STRONG_BASELINE}`)", ""]
        lines += [f"- {v['text']}." for v in report["verdicts"].values()]
    if report["notes"]:
        lines += ["", "## notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def plots(ds: Dataset, scorers: dict[str, np.ndarray], heads: tuple[str, ...], out: Path) -> list[str]:
    """PR curves and calibration curves per head (test positions), one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    test = head_positions(ds, TEST)
    labels = {"purchase": ds.purchase, "churn": ds.churn}
    written = []
    for k, head in enumerate(HEADS):
        if head not in heads:
            continue
        rows = test[head]
        y = labels[head][rows]
        fig_pr, ax_pr = plt.subplots(figsize=(6, 5))
        fig_cal, ax_cal = plt.subplots(figsize=(6, 5))
        ax_cal.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
        for name, probs in scorers.items():
            p = probs[rows, k]
            keep = ~np.isnan(y) & ~np.isnan(p)
            if keep.sum() == 0 or y[keep].sum() == 0:
                continue
            precision, recall, _ = precision_recall_curve(y[keep], p[keep])
            ax_pr.plot(recall, precision, label=f"{name} (AP {M.pr_auc(y[keep], p[keep]):.3f})")
            mean_p, rate, _ = M.calibration_curve(y[keep], p[keep])
            ax_cal.plot(mean_p, rate, marker="o", label=name)
        ax_pr.axhline(float(np.nanmean(y)) if len(y) else 0, color="grey", linestyle=":", label="base rate")
        for ax, title, xl, yl in ((ax_pr, "precision-recall", "recall", "precision"),
                                  (ax_cal, "calibration", "mean predicted probability", "observed rate")):  # fmt: skip
            ax.set_title(f"{head}: {title} (test)")
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=8)
        for fig, kind in ((fig_pr, "pr"), (fig_cal, "calibration")):
            name = f"{kind}_{head}.png"
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written.append(name)
    return written


def write_report(out: Path, report: dict[str, Any], text: str, json_path: Path | None) -> None:
    """report.json (non-finite numbers as null) and report.md in ``out``, and the JSON at ``json_path`` if given."""
    data = json.dumps(_finite(report), indent=2)
    (out / "report.json").write_text(data)
    (out / "report.md").write_text(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(data)


# ---- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="model dir (newest per arch) or one artifact folder")
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE", help="JSON lines (.gz ok) or REES46 CSV")
    parser.add_argument("--truth", nargs="+", type=Path, default=None, metavar="FILE", help="simulator truth files")
    parser.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: INTENTSTREAM_DEVICE)")
    parser.add_argument("--seed", type=int, default=0, help="baselines' and the bootstrap's seed")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=200,
        metavar="N",
        help="user-level bootstrap replicates for the 95%% intervals of every model-vs-baseline difference "
        "(default 200; 0: none)",
    )
    add_format_argument(parser)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write report.json here")


def run(args: argparse.Namespace, settings: Settings) -> int:
    t0 = time.perf_counter()
    device = args.device or settings.device
    try:
        models = select_artifacts(args.model or settings.model_dir)
    except ArtifactError as exc:
        print(f"intentstream evaluate: refused: {exc}")
        return 2
    ds = load_dataset(args.data, data_config_for(models), args.format)
    truth = read_truth(args.truth, ds) if args.truth else None
    report, scorers = evaluate(
        ds, models, truth, device=device, seed=args.seed, progress=not args.quiet, bootstrap=args.bootstrap,
        serving=settings,
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plots(ds, scorers, tuple(report["data"]["heads"]), args.out)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(args.out, report, markdown(report), args.json)
    if not args.quiet:
        print(markdown(report))
    print(f"wrote {args.out / 'report.json'}, report.md and {len(report['plots'])} plots in {report['seconds']} s")
    return 0
