"""`intentstream train`: fit a GRU / CNN / hybrid intent+churn model and publish a versioned artifact.

    intentstream train --data var/sim.jsonl.gz --arch gru --out var/models

What happens, in order (docs/training.md explains the choices):
1. events -> records, labels and the user x time split (training/data.py);
2. training on chunks of the train users' events before t_split (``--train-users all``: every user's, where
   nothing trained on reaches the judged period): masked BCE for purchase and churn plus MSE
   of log order value where a purchase follows; AdamW; early stopping on the validation PR-AUCs;
3. Platt calibration of both heads and the engine's band thresholds, both fitted on validation;
4. test metrics, and ``models.artifact.save_artifact`` (the engine hot-swaps the new version).

Every model is scored the way the engine scores it: over each user's whole history from a zero state
(``predict``), so validation and test figures are the engine's figures.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.artifact import ArtifactError, resolve_device, save_artifact
from models.ensemble import merge
from models.features import N_TYPES, FeaturizerConfig, model_inputs, session_deadline
from models.model import ARCHS, IntentModel, ModelConfig
from stream.settings import Settings
from training import metrics as M
from training.data import (
    TEST,
    TRAIN,
    TRAIN_USERS,
    VAL,
    DataConfig,
    Dataset,
    add_format_argument,
    batch_order,
    load_dataset,
    make_chunks,
)


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "gru"  # one of models.model.ARCHS
    epochs: int = 20  # upper bound: early stopping usually ends it sooner (20k simulated users: ~20 epochs)
    batch_size: int = 64  # chunks per step
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # CPU threads for torch. One: the matrices are small (64 x 64), so a second thread buys little, and on a
    # shared machine OpenMP threads that spin-wait for a busy core made training 20x slower (measured).
    threads: int = 1
    max_minutes: float = 0.0  # stop training (not calibration and scoring) after this long; 0 = no limit
    chunk_len: int = 128  # loss positions per training example
    burn_in: int = 64  # context events before each chunk (no loss): the engine's window
    patience: int = 4  # epochs without a better validation score before stopping (val PR-AUCs are noisy)
    w_purchase: float = 1.0
    w_churn: float = 1.0
    w_order_value: float = 0.1  # log-value MSE is ~1 at the start: keep it from dominating the BCEs
    # Auxiliary, training only (not in the artifact): predict the user's next move (event type or "session
    # ends") and the gap to it at every position. Dense self-supervision that makes the state summarise how
    # this user behaves (the latent "persona" that purchase and churn depend on); the labels alone are sparse.
    w_next_move: float = 0.5
    w_next_gap: float = 0.1
    # > 0: the next gap as a distribution over this many bins (quantiles of the training gaps; cross-entropy), the
    # way temporal point-process models predict time, instead of an MSE of its log. The gaps within a session are
    # bimodal (clicks seconds apart, pauses of minutes): a mean of the log says little of which one comes next.
    next_gap_bins: int = 0
    grad_clip: float = 1.0
    # > 0: validation, early stopping and the artifact use an exponential moving average of the weights, updated
    # after every step with this decay (0.999 averages about the last 1,000 steps)
    ema_decay: float = 0.0
    d_model: int = 64
    gru_hidden: int = 64
    dropout: float = 0.1
    rate_state: bool = False  # ModelConfig.rate_state: visit-rate accumulators in the hidden state (gru, hybrid)
    # gru: train this many members (seeds seed, seed + 1, ...) and serve their mean as one block-diagonal GRU
    # (models/ensemble.py); calibration and thresholds are fitted on the merged model
    ensemble: int = 1
    medium_recall: float = 0.8  # purchase "medium" band: the threshold that still catches this recall
    # Thresholds for what the CRM can act on (``calibrate``): volumes and precision, not F1.
    purchase_min_precision: float = 0.5  # purchase "high" band
    churn_alert_budget: float = 10.0  # churn alerts per 1,000 active users per day
    churn_min_precision: float = 0.0  # > 0: the churn threshold for this precision instead of the budget
    churn_cooldown_s: float = Settings().churn_cooldown_s  # the worker's, for the expected alert volume

    def model_config(self, category_buckets: int) -> ModelConfig:
        return ModelConfig(
            arch=self.arch,
            d_model=self.d_model,
            gru_hidden=self.gru_hidden,
            dropout=self.dropout,
            rate_state=self.rate_state,
            category_buckets=category_buckets,
        )


@dataclass
class TrainResult:
    model: IntentModel
    calibration: dict[str, list[float]]
    thresholds: dict[str, dict[str, float]]
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    seconds: float


# ---- batches ---------------------------------------------------------------------------------------


N_MOVES = N_TYPES + 1  # next move: one of the event types, or N_TYPES = the session ends


class Tensors:
    """Model inputs and training targets of every record, computed once; a batch gathers rows by index.

    One padding row is appended at index N: right padding, which causal models never read for real positions.
    """

    def __init__(self, ds: Dataset, next_gap_bins: int = 0):
        x = model_inputs(ds.records, ds.config.featurizer)
        self.n = len(ds)
        self.type = torch.cat([x["type"], torch.zeros(1, dtype=torch.int64)])
        self.category = torch.cat([x["category"], torch.zeros(1, dtype=torch.int64)])
        self.numeric = torch.cat([x["numeric"], torch.zeros(1, x["numeric"].shape[1])])
        # Training labels, NaN wherever the head does not count for the train split (time, session end).
        # Churn counts only where a session closes: the engine judges churn when it sees the session closed, so
        # the head learns P(churn | history, the session ends here), not "is this the session's last event".
        purchase = np.where(ds.head_mask(TRAIN, "purchase"), ds.purchase, np.nan)
        churn = np.where(ds.head_mask(TRAIN, "churn"), ds.churn, np.nan)
        value = np.where(ds.head_mask(TRAIN, "order_value"), ds.order_value, np.nan).astype(np.float64)
        next_move, next_gap = next_event_targets(ds)
        if next_gap_bins > 0:
            next_gap = gap_bins(next_gap, ds.user_split[ds.record_user] == TRAIN, next_gap_bins)
        self.targets = {
            "purchase": _with_pad(purchase, np.nan, torch.float32),
            "churn": _with_pad(churn, np.nan, torch.float32),
            "log_value": _with_pad(np.log(np.maximum(value, 1e-2)), np.nan, torch.float32),
            "next_move": _with_pad(next_move, -1, torch.int64),
            "next_gap": _with_pad(next_gap, np.nan, torch.float32),
        }

    def known(self, name: str) -> np.ndarray:
        y = self.targets[name].numpy()
        return y >= 0 if name == "next_move" else ~np.isnan(y)

    def targets_per_batch(self, chunks: np.ndarray, n_batches: int) -> dict[str, float]:
        """Average number of known targets per batch, by target, over the training chunks' loss positions."""
        out = {}
        for name in self.targets:
            known = np.concatenate([[0], np.cumsum(self.known(name)[:-1])])
            out[name] = max(float((known[chunks[:, 2]] - known[chunks[:, 1]]).sum()) / n_batches, 1.0)
        return out

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        """Inputs [B, T] for rows (input_start, loss_start, end); also the record index and loss mask [B, T]."""
        start, loss_start, end = rows[:, 0:1], rows[:, 1:2], rows[:, 2:3]
        pos = start + np.arange(int((end - start).max()))[None, :]
        real = pos < end
        idx = np.where(real, pos, self.n)
        loss = real & (pos >= loss_start)
        t = torch.from_numpy(idx)
        return self.type[t], self.category[t], self.numeric[t], idx, loss

    def gather_targets(self, idx: np.ndarray, loss_mask: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """Targets [B, T] of a batch, unknown (NaN / -1) outside its loss positions."""
        t = torch.from_numpy(np.where(loss_mask, idx, self.n))
        return {name: y[t].to(device) for name, y in self.targets.items()}


def _cross_entropy_of_bins(logits: torch.Tensor, bins: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.cross_entropy(logits, bins.long(), reduction=reduction)


def _with_pad(values: np.ndarray, pad, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.append(values, pad)).to(dtype)


def next_event_targets(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(next move, log1p of the gap in seconds to it) per record. The move is the type of the user's next
    event when it continues the session, N_TYPES when the session ends there; -1 (unknown) for the user's last
    event while the data ends too soon after it to tell. The gap is known within a session only."""
    rec = ds.records
    n = len(ds)
    has_next = np.zeros(n, dtype=bool)
    has_next[:-1] = np.diff(ds.record_user) == 0
    session_end = ds.session_end()
    next_type = np.append(rec["type"][1:], 0).astype(np.int64)
    data_outlasts = ds.data_end() >= session_deadline(rec["ts"].astype(np.int64), ds.config.featurizer.session_gap_ms)
    ended = session_end & (has_next | data_outlasts)
    move = np.where(ended, N_TYPES, np.where(has_next & ~session_end, next_type, -1))
    gap = np.where(has_next & ~session_end, np.log1p(np.append(rec["gap_s"][1:], 0).astype(np.float64)), np.nan)
    return move, gap


def gap_bins(log_gap: np.ndarray, fit: np.ndarray, k: int) -> np.ndarray:
    """Each known log gap's bin among ``k`` quantile bins of the known gaps where ``fit`` (the train users' records,
    which no judged position is); NaN stays NaN. Ties leave fewer, wider bins: the simulator's whole seconds repeat.
    No gap to fit (no train user's session has two events): no target, as the log gap would have none."""
    known = ~np.isnan(log_gap)
    out = np.full(log_gap.shape, np.nan)
    if not (known & fit).any():
        return out
    edges = np.unique(np.quantile(log_gap[known & fit], np.linspace(0.0, 1.0, k + 1)[1:-1]))
    out[known] = np.searchsorted(edges, log_gap[known], side="right")
    return out


def multitask_loss(
    out: torch.Tensor,
    aux: torch.Tensor | None,
    y: dict[str, torch.Tensor],
    cfg: TrainConfig,
    per_batch: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked multi-task loss: BCE purchase, BCE churn, MSE log order value (+ next move CE, and next gap MSE of its
    log or, with ``cfg.next_gap_bins``, CE of its bin, when ``aux`` is given). Each term sums over the positions whose
    target is known and divides by ``per_batch``, the target's average count per batch (default: this batch's count).
    A constant divisor weighs every label alike: batches are grouped by chunk length, and a batch of short chunks
    holds far fewer labels (with other base rates) than one of long chunks."""
    known = {k: (v >= 0 if k == "next_move" else ~v.isnan()) for k, v in y.items()}
    norm = per_batch or {k: max(int(m.sum()), 1) for k, m in known.items()}

    def term(name: str, pred: torch.Tensor, fn) -> torch.Tensor:
        m = known[name]
        return fn(pred[m], y[name][m], reduction="sum") / norm[name]

    parts = {
        "purchase": term("purchase", out[..., 0], F.binary_cross_entropy_with_logits),
        "churn": term("churn", out[..., 1], F.binary_cross_entropy_with_logits),
        "log_value": term("log_value", out[..., 2], F.mse_loss),
    }
    total = cfg.w_purchase * parts["purchase"] + cfg.w_churn * parts["churn"] + cfg.w_order_value * parts["log_value"]
    if aux is not None:
        parts["next_move"] = term("next_move", aux[..., :N_MOVES], F.cross_entropy)
        if cfg.next_gap_bins > 0:
            parts["next_gap"] = term("next_gap", aux[..., N_MOVES:], _cross_entropy_of_bins)
        else:
            parts["next_gap"] = term("next_gap", aux[..., N_MOVES], F.mse_loss)
        total = total + cfg.w_next_move * parts["next_move"] + cfg.w_next_gap * parts["next_gap"]
    return total, {k: v.item() for k, v in parts.items()}


# ---- scoring like the engine -----------------------------------------------------------------------


@torch.no_grad()
def predict(
    model: IntentModel | Callable[..., tuple[torch.Tensor, Any]],
    ds: Dataset,
    tensors: Tensors,
    users: np.ndarray,
    device: torch.device,
    max_positions: int = 1 << 16,
) -> np.ndarray:
    """Raw outputs [N, 3] (NaN for records of other users): each user's whole history in one causal pass
    from a zero state, as the engine scores a user event by event (tests/test_model.py proves the equality).
    ``model`` may also be any callable of the model's inputs (another runtime: load_tests/model_bench.py)."""
    if isinstance(model, nn.Module):
        model.eval()
    out = np.full((len(ds), 3), np.nan, dtype=np.float32)
    starts, ends = ds.user_start[users], ds.user_start[users + 1]
    order = np.argsort(ends - starts, kind="stable")
    i = 0
    while i < len(order):
        width = int(ends[order[i]] - starts[order[i]])
        j = i + 1  # users sorted by length: grow the batch while it fits the position budget
        while j < len(order) and (j - i + 1) * int(ends[order[j]] - starts[order[j]]) <= max_positions:
            j += 1
        sel = order[i:j]
        rows = np.stack([starts[sel], starts[sel], ends[sel]], axis=1)
        t, c, x, idx, real = tensors.gather(rows)
        y, _ = model(t.to(device), c.to(device), x.to(device))
        out[idx[real]] = y.float().cpu().numpy()[real]
        i = j
        del width
    return out


def head_scores(
    ds: Dataset, raw: np.ndarray, split: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(labels, logits) for purchase and churn and (actual, log predicted) order value where each head counts
    for ``split`` (``Dataset.head_mask``: churn where a session closes, where the engine reads it)."""
    p, c, v = (ds.head_mask(split, h) for h in ("purchase", "churn", "order_value"))
    return (ds.purchase[p], raw[p, 0]), (ds.churn[c], raw[c, 1]), (ds.order_value[v], raw[v, 2])


def validation_score(ds: Dataset, raw: np.ndarray) -> tuple[float, float, float]:
    """(purchase PR-AUC + churn PR-AUC, purchase PR-AUC, churn PR-AUC) on validation: the early-stopping
    criterion. A head without positives counts 0."""
    (yp, zp), (yc, zc), _ = head_scores(ds, raw, VAL)
    p, c = M.pr_auc(yp, zp), M.pr_auc(yc, zc)
    total = (0.0 if math.isnan(p) else p) + (0.0 if math.isnan(c) else c)
    return total, p, c


def evaluate_split(
    ds: Dataset, raw: np.ndarray, split: int, calibration: dict[str, list[float]], thresholds: dict
) -> dict[str, Any]:
    """Report metrics of one split from raw outputs, with the calibration and thresholds chosen on val."""
    (yp, zp), (yc, zc), (v, zv) = head_scores(ds, raw, split)
    pp = M.platt_apply(zp, calibration["purchase"])
    pc = M.platt_apply(zc, calibration["churn"])
    return {
        "purchase": M.head_metrics(yp, pp, thresholds["purchase"]["high"]),
        "churn": M.head_metrics(yc, pc, thresholds["churn"]["alert"]),
        "order_value": {"mae": M.order_value_mae(v, np.exp(np.minimum(zv, 15.0))), "n": len(v)},
    }


def calibrate(ds: Dataset, raw: np.ndarray, cfg: TrainConfig) -> tuple[dict, dict, dict]:
    """Platt parameters per head, the engine's thresholds chosen for what the CRM can act on, and what to expect of
    them, all on validation:

    - purchase ``high``: the lowest threshold with precision >= ``purchase_min_precision`` (the F1-optimal one when
      none reaches it); ``medium``: the threshold that still catches ``medium_recall`` of the purchases;
    - churn ``alert``: the lowest risk whose alerts, with the engine's cooldown, stay within ``churn_alert_budget``
      per 1,000 active users per day; or, with ``churn_min_precision``, the lowest with that precision.
    """
    (yp, zp), (yc, zc), _ = head_scores(ds, raw, VAL)
    calibration = {"purchase": M.platt_fit(zp, yp), "churn": M.platt_fit(zc, yc)}
    pp = M.platt_apply(zp, calibration["purchase"])
    pc = M.platt_apply(zc, calibration["churn"])
    purchase_target = f"precision >= {cfg.purchase_min_precision:g}"
    high = M.threshold_for_precision(yp, pp, cfg.purchase_min_precision)
    if high is None:
        high, purchase_target = M.f1_optimal_threshold(yp, pp), purchase_target + " (unreachable: F1-optimal)"
    medium = min(M.threshold_at_recall(yp, pp, cfg.medium_recall), high)

    ts = ds.records["ts"].astype(np.int64)
    at = ds.head_mask(VAL, "churn")  # every session end of the validation period: labelled or not, it may alert
    period = (ds.record_split == VAL) & (ts >= ds.t_split["churn"])
    user_days = M.active_user_days(ds.record_user[period], ts[period])
    cooldown_ms = round(cfg.churn_cooldown_s * 1000)
    if cfg.churn_min_precision > 0:
        churn_target = f"precision >= {cfg.churn_min_precision:g}"
        found = M.threshold_for_precision(yc, pc, cfg.churn_min_precision)
        alert = M.f1_optimal_threshold(yc, pc) if found is None else found
        churn_target += " (unreachable: F1-optimal)" if found is None else ""
    else:
        churn_target = f"{cfg.churn_alert_budget:g} alerts per 1,000 active users per day"
        alert = M.threshold_for_budget(ds.record_user[at], ts[at], pc, cfg.churn_alert_budget, user_days, cooldown_ms)
    purchase_at = ds.head_mask(VAL, "purchase")
    purchase_days = M.active_user_days(ds.record_user[purchase_at], ts[purchase_at])
    expected = {
        "purchase_high": {
            "target": purchase_target,
            **M.at_threshold(yp, pp, high),
            "per_1k_users_day": M.per_1k_user_days(int((pp >= high).sum()), purchase_days),
        },
        "churn_alert": {
            "target": churn_target,
            **M.alert_summary(ds.record_user[at], ts[at], pc, yc, alert, cooldown_ms, user_days),
            "cooldown_s": cfg.churn_cooldown_s,
        },
        "on": "validation users, from t_split",
    }
    thresholds = {"purchase": {"medium": medium, "high": high}, "churn": {"alert": alert}}
    return calibration, thresholds, expected


# ---- training --------------------------------------------------------------------------------------


def init_head_bias(model: IntentModel, ds: Dataset) -> None:
    """Start the heads at the training base rates and the mean log order value: the first steps then learn
    the signal instead of the offsets (the order value head would otherwise start ~4 off)."""
    last = model.head[-1]
    assert isinstance(last, nn.Linear)
    bias = last.bias
    with torch.no_grad():
        for k, y in enumerate((ds.purchase[ds.head_mask(TRAIN, "purchase")], ds.churn[ds.head_mask(TRAIN, "churn")])):
            rate = float(np.nanmean(y)) if (~np.isnan(y)).any() else 0.5
            bias[k] = float(M.logit(np.array(min(max(rate, 1e-4), 1 - 1e-4))))
        values = ds.order_value[ds.head_mask(TRAIN, "order_value")]
        if (~np.isnan(values)).any():
            bias[2] = float(np.nanmean(np.log(np.maximum(values, 1e-2))))


class NextEventHead(nn.Module):
    """Training-only head on the representation the model's own heads read (captured with a forward pre-hook
    on ``model.head``, so IntentModel stays exactly what the engine loads): next-move logits and next gap (its log,
    or logits of its bins)."""

    def __init__(self, model: IntentModel, next_gap_bins: int = 0):
        super().__init__()
        c = model.config
        self.linear = nn.Linear(c.head_dim, N_MOVES + max(next_gap_bins, 1))
        self.features: torch.Tensor | None = None
        self.hook = model.head.register_forward_pre_hook(self._capture)

    def _capture(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.features = args[0]

    def forward(self) -> torch.Tensor:
        assert self.features is not None, "run the model first"
        return self.linear(self.features)

    def detach_from(self) -> None:
        self.hook.remove()
        self.features = None


class ExponentialAverage:
    """A copy of the model whose weights follow the trained ones as an exponential moving average: the average of
    the last ~1 / (1 - decay) steps' weights, which sits nearer the loss's valley floor than the noisy last step."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model)
        self.decay = decay
        self._averaged = list(self.model.state_dict().values())  # the copy's own tensors, updated in place

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for avg, new in zip(self._averaged, model.state_dict().values(), strict=True):
            if avg.dtype.is_floating_point:
                avg.lerp_(new, 1.0 - self.decay)
            else:
                avg.copy_(new)


def train_model(ds: Dataset, cfg: TrainConfig, progress: bool = True) -> TrainResult:
    if cfg.ensemble > 1:
        return train_ensemble(ds, cfg, progress)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = IntentModel(cfg.model_config(ds.config.featurizer.category_buckets))
    init_head_bias(model, ds)
    model.to(device)
    # Copied before the auxiliary head hooks itself on the model: the copy must not capture features for it.
    ema = ExponentialAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    use_aux = cfg.w_next_move > 0 or cfg.w_next_gap > 0
    aux_head = NextEventHead(model, cfg.next_gap_bins) if use_aux else None
    params = list(model.parameters()) + (list(aux_head.parameters()) if aux_head else [])
    if aux_head:
        aux_head.to(device)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tensors = Tensors(ds, cfg.next_gap_bins)
    chunks = make_chunks(ds, TRAIN, cfg.chunk_len, cfg.burn_in)
    if not len(chunks):
        raise ValueError("no labelled training positions: the data is too short or has too few users")
    val_users = np.flatnonzero(ds.user_split == VAL)
    n_batches = math.ceil(len(chunks) / cfg.batch_size)
    per_batch = tensors.targets_per_batch(chunks, n_batches)
    total_steps = cfg.epochs * n_batches
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.1)
    deadline = t0 + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf

    best, best_state, best_epoch, stale = -math.inf, None, 0, 0
    history: list[dict[str, float]] = []
    bar = tqdm(total=total_steps, desc=f"train {cfg.arch}", unit="batch", disable=not progress, leave=False)
    out_of_time = False
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        running: dict[str, float] = {}
        seen = 0
        for batch in batch_order(chunks, cfg.batch_size, rng):
            t, c, x, idx, loss_mask = tensors.gather(chunks[batch])
            out, _ = model(t.to(device), c.to(device), x.to(device))
            y = tensors.gather_targets(idx, loss_mask, device)
            loss, parts = multitask_loss(out, aux_head() if aux_head else None, y, cfg, per_batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            for k, v in parts.items():
                running[k] = running.get(k, 0.0) + v
            seen += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", best_val=f"{best:.4f}" if best > -math.inf else "-")
            if time.perf_counter() > deadline:
                out_of_time = True
                break
        judged = ema.model if ema is not None else model
        raw = predict(judged, ds, tensors, val_users, device)
        val_score, auc_purchase, auc_churn = validation_score(ds, raw)
        losses = {f"loss_{k}": v / max(seen, 1) for k, v in running.items()}
        history.append({"epoch": epoch, **losses, "val_pr_auc_purchase": auc_purchase, "val_pr_auc_churn": auc_churn,
                        "val_score": val_score, "seconds": time.perf_counter() - t0})  # fmt: skip
        if progress:
            tqdm.write(
                f"epoch {epoch}: "
                + " ".join(f"{k[5:]} {v:.4f}" for k, v in losses.items())
                + f" | val PR-AUC purchase {auc_purchase:.4f} churn {auc_churn:.4f}"
            )
        if val_score > best:
            best, best_epoch, stale = val_score, epoch, 0
            best_state = copy.deepcopy(judged.state_dict())
        else:
            stale += 1
        if stale >= cfg.patience or out_of_time:
            break
    bar.close()
    if aux_head:
        aux_head.detach_from()
    if best_state is not None:
        model.load_state_dict(best_state)

    metrics = {"best_epoch": best_epoch, "epochs_run": len(history), "stopped_by_time": out_of_time,
               "train_chunks": len(chunks)}  # fmt: skip
    return finish(model, ds, tensors, cfg, device, metrics, history, t0)


def finish(
    model: IntentModel,
    ds: Dataset,
    tensors: Tensors,
    cfg: TrainConfig,
    device: torch.device,
    metrics: dict[str, Any],
    history: list[dict[str, float]],
    t0: float,
) -> TrainResult:
    """Calibration and thresholds on validation, validation and test metrics: the trained model as a result."""
    raw_val = predict(model, ds, tensors, np.flatnonzero(ds.user_split == VAL), device)
    raw_test = predict(model, ds, tensors, np.flatnonzero(ds.user_split == TEST), device)
    calibration, thresholds, expected = calibrate(ds, raw_val, cfg)
    metrics = {
        "val": evaluate_split(ds, raw_val, VAL, calibration, thresholds),
        "test": evaluate_split(ds, raw_test, TEST, calibration, thresholds),
        "expected": expected,  # at the served thresholds: what the CRM will receive
        "data": ds.summary(),
        **metrics,
    }
    seconds = time.perf_counter() - t0
    metrics["train_seconds"] = round(seconds, 1)
    return TrainResult(model.cpu().eval(), calibration, thresholds, metrics, history, seconds)


def train_ensemble(ds: Dataset, cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """``cfg.ensemble`` GRUs, seeds ``cfg.seed`` on, each trained as ``train_model`` trains one (``max_minutes``
    is each member's), folded into one block-diagonal GRU that outputs their mean (models/ensemble.py); the merged
    model is calibrated and judged like any other. Its history lists each member's epochs, with ``member``."""
    if cfg.arch != "gru" or cfg.rate_state:
        raise ValueError("--ensemble: plain gru members only")
    t0 = time.perf_counter()
    members, history, member_metrics = [], [], []
    for i in range(cfg.ensemble):
        one = train_model(ds, dataclasses.replace(cfg, ensemble=1, seed=cfg.seed + i), progress)
        members.append(one.model)
        history += [{"member": i, **h} for h in one.history]
        test = one.metrics["test"]
        member_metrics.append(
            {k: one.metrics[k] for k in ("best_epoch", "epochs_run", "stopped_by_time", "train_seconds")}
            | {f"test_pr_auc_{h}": test[h]["pr_auc"] for h in ("purchase", "churn")}
        )
        if progress:
            tqdm.write(f"member {i + 1}/{cfg.ensemble}: {member_metrics[-1]}")
    device = resolve_device(cfg.device)
    model = merge(members).to(device)
    metrics = {"members": member_metrics, "best_epoch": [m["best_epoch"] for m in member_metrics],
               "epochs_run": sum(m["epochs_run"] for m in member_metrics),
               "stopped_by_time": any(m["stopped_by_time"] for m in member_metrics),
               "train_chunks": len(make_chunks(ds, TRAIN, cfg.chunk_len, cfg.burn_in))}  # fmt: skip
    return finish(model, ds, Tensors(ds), cfg, device, metrics, history, t0)


def _train_only_note(summary: dict) -> str:
    extra = summary.get("train_only")
    if not extra:
        return ""
    return (
        f"; {extra['users']} of the train users from --train-only-data, {extra['users_trained_on']} of them trained on"
    )


def publish(result: TrainResult, ds: Dataset, cfg: TrainConfig, out: Path) -> Path:
    return save_artifact(
        result.model,
        out,
        featurizer=ds.config.featurizer,
        calibration=result.calibration,
        thresholds=result.thresholds,
        horizon_s=ds.config.horizon_s,
        churn_days=ds.config.churn_days,
        data_hash=ds.data_hash,
        metrics=_finite(result.metrics),
        extra={
            "data_config": ds.config.to_dict(),
            "train_config": asdict(cfg),
            "history": _finite(result.history),
            "sources": ds.sources,
            "train_only_sources": ds.train_only_sources,
            "train_only_data_hash": ds.train_only_hash,
        },
    )


def _finite(obj: Any) -> Any:
    """JSON has no NaN: metrics that cannot be computed become null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return None if not math.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def train_small(
    data: list[Path | str],
    out: Path,
    arch: str = "gru",
    max_minutes: float = 2.0,
    seed: int = 0,
    progress=False,
    settings: Settings | None = None,
) -> Path:
    """A usable model in a couple of minutes on a laptop CPU (the demo's path): fewer, larger steps. ``settings``:
    the worker's, whose window, session gap and churn cooldown the model must agree with to be served."""
    s = settings or Settings()
    cfg = TrainConfig(
        arch=arch, epochs=4, batch_size=64, max_minutes=max_minutes, seed=seed, patience=1,
        churn_cooldown_s=s.churn_cooldown_s,
    )  # fmt: skip
    featurizer = FeaturizerConfig(window=s.window_size, session_gap_s=s.session_gap_s)
    ds = load_dataset(data, DataConfig(featurizer=featurizer))
    return publish(train_model(ds, cfg, progress=progress), ds, cfg, out)


# ---- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE", help="JSON lines (.gz ok) or REES46 CSV")
    parser.add_argument("--arch", choices=ARCHS, default=d.arch)
    parser.add_argument("--out", type=Path, default=None, help="model directory (default: INTENTSTREAM_MODEL_DIR)")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--patience", type=int, default=d.patience, help="epochs without a better val score")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument(
        "--ema",
        type=float,
        default=d.ema_decay,
        metavar="DECAY",
        help="judge, keep and ship an exponential moving average of the weights with this decay per step "
        "(e.g. 0.999); 0: the weights as trained",
    )
    parser.add_argument(
        "--next-move-weight",
        type=float,
        default=d.w_next_move,
        metavar="W",
        help="weight of the training-only target 'the user's next move' (an event type or the session's end) "
        f"(default {d.w_next_move:g}; 0 with --next-gap-weight 0: no next-event targets)",
    )
    parser.add_argument(
        "--next-gap-weight",
        type=float,
        default=d.w_next_gap,
        metavar="W",
        help="weight of the training-only target 'the time to the next event in the session' "
        f"(default {d.w_next_gap:g})",
    )
    parser.add_argument(
        "--next-gap-bins",
        type=int,
        default=d.next_gap_bins,
        metavar="K",
        help="predict that time as a distribution over K quantile bins of the training gaps (cross-entropy) instead "
        "of its log (MSE); 0: the log (default)",
    )
    parser.add_argument(
        "--rate-state",
        action="store_true",
        help="gru/hybrid: carry the visit-rate accumulators (days since the first event, sessions) in the hidden "
        "state and feed rate features to the GRU and the heads (models/model.py)",
    )
    parser.add_argument(
        "--ensemble",
        type=int,
        default=d.ensemble,
        metavar="K",
        help="gru: train K members (seeds --seed on) and serve their mean as one block-diagonal GRU of K x the hidden "
        f"size (default {d.ensemble})",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="model init and data order (same seed, same weights)")
    parser.add_argument("--split-seed", type=int, default=DataConfig().split_seed, help="salt of the user split")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: INTENTSTREAM_DEVICE)")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop training after this long (0: no limit)")
    parser.add_argument(
        "--train-users",
        choices=TRAIN_USERS,
        default=DataConfig().train_users,
        help="whose events train: 'train' (the train users only: validation and test users are never seen) or "
        "'all' (validation and test users' events train too where nothing trained on reaches the earliest judged "
        "period, as the engine scores users it was trained on; the judged positions are the same)",
    )
    parser.add_argument(
        "--train-only-data",
        nargs="+",
        default=[],
        metavar="FILE",
        help="more users who only train: their events before t_split train, they are never validated, tested or "
        "calibrated on (e.g. another simulation's users, in --format; the files form one set of users). Their ids are "
        "kept apart from --data's (the simulator's repeat across seeds); --data alone sets the period, t_split and the "
        "split of its users, so its judged positions are unchanged",
    )
    parser.add_argument("--horizon-s", type=float, default=DataConfig().horizon_s, help="purchase label horizon")
    parser.add_argument("--churn-days", type=float, default=DataConfig().churn_days, help="churn label horizon")
    parser.add_argument(
        "--session-gap-s",
        type=float,
        default=None,
        help="a session ends after this much time without an event: where churn is judged, here and in the worker, "
        "which refuses a model trained with another gap (default: INTENTSTREAM_SESSION_GAP_S, 1800)",
    )
    parser.add_argument(
        "--churn-alert-budget",
        type=float,
        default=d.churn_alert_budget,
        metavar="N",
        help="churn alerts per 1,000 active users per day the CRM can act on: the alert threshold is the lowest "
        f"that stays within it on validation (default {d.churn_alert_budget:g})",
    )
    parser.add_argument(
        "--churn-min-precision",
        type=float,
        default=d.churn_min_precision,
        metavar="P",
        help="instead of the budget: the lowest churn threshold with at least this precision on validation",
    )
    parser.add_argument(
        "--purchase-min-precision",
        type=float,
        default=d.purchase_min_precision,
        metavar="P",
        help=f"the purchase 'high' band: the lowest threshold with this precision (default {d.purchase_min_precision:g})",
    )
    add_format_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write a JSON summary here")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if not 0.0 <= args.ema < 1.0:
        print(f"intentstream train: --ema {args.ema:g}: a decay is at least 0 (off) and below 1 (e.g. 0.999)")
        return 2
    weights = (args.next_move_weight, args.next_gap_weight)
    if not all(math.isfinite(w) and w >= 0 for w in weights) or args.next_gap_bins < 0 or args.next_gap_bins == 1:
        print(
            "intentstream train: --next-move-weight and --next-gap-weight are finite and 0 or more, --next-gap-bins 0 "
            "or 2 or more"
        )
        return 2
    cfg = TrainConfig(
        arch=args.arch,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        lr=args.lr,
        ema_decay=args.ema,
        w_next_move=args.next_move_weight,
        w_next_gap=args.next_gap_weight,
        next_gap_bins=args.next_gap_bins,
        ensemble=args.ensemble,
        rate_state=args.rate_state,
        seed=args.seed,
        device=args.device or settings.device,
        max_minutes=args.max_minutes,
        purchase_min_precision=args.purchase_min_precision,
        churn_alert_budget=args.churn_alert_budget,
        churn_min_precision=args.churn_min_precision,
        churn_cooldown_s=settings.churn_cooldown_s,
    )
    gap_s = settings.session_gap_s if args.session_gap_s is None else args.session_gap_s
    data_cfg = DataConfig(
        horizon_s=args.horizon_s,
        churn_days=args.churn_days,
        split_seed=args.split_seed,
        train_users=args.train_users,
        featurizer=FeaturizerConfig(session_gap_s=gap_s),
    )
    out = args.out or settings.model_dir
    t0 = time.perf_counter()
    try:
        ds = load_dataset(args.data, data_cfg, args.format, args.train_only_data)
    except ValueError as exc:  # e.g. no events in the files
        print(f"intentstream train: {exc}")
        return 2
    load_s = time.perf_counter() - t0
    s = ds.summary()
    print(
        f"data: {s['events']} events, {s['users']} users, {s['days']} days; users train/val/test "
        f"{s['train']['users']}/{s['val']['users']}/{s['test']['users']} (the events of "
        f"{s['train']['users_trained_on']} train{_train_only_note(s)}); t_split at day "
        f"{(ds.t_split['purchase'] - ds.t_start) / 86_400_000:.1f} (purchase), "
        f"{(ds.t_split['churn'] - ds.t_start) / 86_400_000:.1f} (churn) ({load_s:.1f} s)"
    )
    try:
        result = train_model(ds, cfg, progress=not args.quiet)
    except ArtifactError as exc:  # e.g. --device cuda without CUDA
        print(f"intentstream train: {exc}")
        return 2
    except ValueError as exc:  # no labelled position: a trace shorter than the label horizons
        hours = (ds.t_end - ds.t_start) / 3_600_000
        print(
            f"intentstream train: {exc}: the data spans {hours:.2f} h and a purchase label needs "
            f"--horizon-s {data_cfg.horizon_s:g} s after its event; pass a shorter --horizon-s (e.g. "
            f"{max(60, int(hours * 3600 / 4))}) or more data"
        )
        return 2
    path = publish(result, ds, cfg, Path(out))
    test = result.metrics["test"]
    print(
        f"wrote {path} in {time.perf_counter() - t0:.0f} s (training {result.seconds:.0f} s, "
        f"{result.metrics['epochs_run']} epochs, best {result.metrics['best_epoch']}): test purchase "
        f"PR-AUC {test['purchase']['pr_auc']:.4f} ROC-AUC {test['purchase']['roc_auc']:.4f}, churn PR-AUC "
        f"{test['churn']['pr_auc']:.4f} ROC-AUC {test['churn']['roc_auc']:.4f}"
    )
    if args.json:
        summary = {"artifact": str(path), "load_seconds": load_s, "total_seconds": time.perf_counter() - t0,
                   "metrics": result.metrics, "history": result.history, "thresholds": result.thresholds,
                   "calibration": result.calibration}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_finite(summary), indent=2))
    return 0
