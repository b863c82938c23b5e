"""Batched scoring: one forward pass for all the users of a batch, each user's events in order.

What each architecture needs to score k new events of a user (see models/model.py):
- gru: the k new records and the hidden state kept in the table (one GRU step per event);
- cnn and transformer: the window's last ``context_len`` records before the new ones, as context (the transformer
  attends to the window: each batch rescores it, there is no state to carry);
- hybrid: both, when the table holds a hidden state and the window holds the full context.
A user whose hidden state is missing or came from another model version (a model swap, a late event
inserted into the window) is *rebuilt*: the model runs over the whole window from a zero state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from models.artifact import LoadedModel
from models.features import RECORD_DTYPE, concat_records, model_inputs


@dataclass(slots=True)
class UserBatch:
    """One user's share of a batch."""

    prior: np.ndarray  # window records before this batch (oldest first)
    hidden: np.ndarray | None  # hidden state after the prior records, if valid for the serving model
    new: np.ndarray = field(default_factory=lambda: np.zeros(0, RECORD_DTYPE))  # records appended in this batch
    rescore_window: np.ndarray | None = None  # set when a late event was inserted: score the final window


@dataclass(slots=True)
class UserScores:
    probs: np.ndarray  # [k, 3]: purchase probability, churn probability, expected order value
    hidden: np.ndarray | None  # hidden state after the user's last event


def _rows(model: LoadedModel, user: UserBatch) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None, int]:
    """(records of the row before the new ones, the new ones, context_len, h0, number of outputs to read at the end
    of the row)."""
    cfg = model.config
    if user.rescore_window is not None:
        return user.rescore_window, user.rescore_window[:0], 0, None, 1
    new, k, prior = user.new, len(user.new), user.prior
    ctx = cfg.context_len
    if cfg.arch == "gru" and (user.hidden is not None or len(prior) == 0):
        return prior[:0], new, 0, user.hidden, k
    if not cfg.has_state:  # cnn, transformer: the window's last records as context, outputs at the new ones
        return prior[len(prior) - min(ctx, len(prior)) :], new, 0, None, k
    if cfg.arch == "hybrid" and user.hidden is not None and len(prior) >= ctx:
        return prior[len(prior) - ctx :], new, ctx, user.hidden, k
    # Rebuild from the window. For a user whose whole history is in the window this is exact.
    return prior, new, 0, None, k


def score_batch(model: LoadedModel, users: list[UserBatch], device: torch.device) -> list[UserScores]:
    """Score every user's new events; one forward pass per distinct context length (at most two). The rows are
    assembled per batch (the records featurized together, then one scatter per input), not per user."""
    rows = [_rows(model, u) for u in users]
    results: list[UserScores | None] = [None] * len(users)
    for ctx in sorted({r[2] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r[2] == ctx]
        lengths = np.array([len(rows[i][0]) + len(rows[i][1]) for i in idx], dtype=np.int64)
        # Each row's records end to end (its prior ones, then its new ones), featurized once. A plain GRU on PyTorch
        # scores them so, end to end (``scores_rows``); for the others they are placed in rows right-padded with zeros:
        # causal models never read the padding for a real position, and featurizing the records alone skips the
        # padding, most of a batch whose users bring 1 to 40 events each.
        flat = concat_records([part for i in idx for part in rows[i][:2] if len(part)])
        inputs = model_inputs(flat, model.featurizer)
        h0: np.ndarray | None = None
        if model.config.has_state:
            h0 = np.zeros((len(idx), model.config.gru_hidden), dtype=np.float32)
            have = [j for j, i in enumerate(idx) if rows[i][3] is not None]
            if have:
                h0[have] = np.stack([rows[idx[j]][3] for j in have])  # type: ignore[misc]
        if ctx == 0 and h0 is not None and model.scores_rows:  # the rows end to end, as featurized: no padding
            flat_probs, row_hidden = model.infer_rows(inputs, h0, lengths, device)
            for j, (i, end) in enumerate(zip(idx, np.cumsum(lengths).tolist(), strict=True)):
                results[i] = UserScores(probs=flat_probs[end - rows[i][4] : end], hidden=row_hidden[j])
            continue
        at, shape = (np.repeat(np.arange(len(idx)), lengths), _ranks(lengths)), (len(idx), int(lengths.max()))
        x = {k: torch.from_numpy(_padded(v.numpy(), at, shape)) for k, v in inputs.items()}
        ends = lengths - ctx  # outputs exclude the context positions
        # The runtime (models/runtime.py) returns each row's hidden state at its last output, not all positions'
        probs, last_hidden = model.infer(x, h0, ends - 1, ctx, device)
        hidden = [None] * len(idx) if last_hidden is None else list(last_hidden)
        for j, (i, end) in enumerate(zip(idx, ends.tolist(), strict=True)):
            results[i] = UserScores(probs=probs[j, end - rows[i][4] : end], hidden=hidden[j])
    return results  # type: ignore[return-value]


def _padded(values: np.ndarray, at: tuple[np.ndarray, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """``values`` [N, ...] placed at rows and positions ``at`` of a zeroed [rows, width, ...] array."""
    out = np.zeros((*shape, *values.shape[1:]), dtype=values.dtype)
    out[at] = values
    return out


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., c - 1 for each count c, end to end."""
    starts = np.cumsum(counts) - counts
    return np.arange(int(counts.sum())) - np.repeat(starts, counts)
