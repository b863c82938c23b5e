"""Batched scoring: one forward pass for all the users of a batch, each user's events in order.

What each architecture needs to score k new events of a user (see models/model.py):
- gru: the k new records and the hidden state kept in the table (one GRU step per event);
- cnn: the window's last ``context_len`` records before the new ones, as context;
- hybrid: both, when the table holds a hidden state and the window holds the full context.
A user whose hidden state is missing or came from another model version (a model swap, a late event
inserted into the window) is *rebuilt*: the model runs over the whole window from a zero state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from models.artifact import LoadedModel
from models.features import RECORD_DTYPE, model_inputs
from models.model import probabilities


@dataclass(slots=True)
class UserBatch:
    """One user's share of a batch."""

    prior: np.ndarray  # window records before this batch (oldest first)
    hidden: np.ndarray | None  # hidden state after the prior records, if valid for the serving model
    new: list[tuple] = field(default_factory=list)  # records appended in this batch, in order
    rescore_window: np.ndarray | None = None  # set when a late event was inserted: score the final window


@dataclass(slots=True)
class UserScores:
    probs: np.ndarray  # [k, 3]: purchase probability, churn probability, expected order value
    hidden: np.ndarray | None  # hidden state after the user's last event


def _rows(model: LoadedModel, user: UserBatch) -> tuple[np.ndarray, int, np.ndarray | None, int]:
    """(records of the row, context_len, h0, number of outputs to read at the end of the row)."""
    cfg = model.config
    if user.rescore_window is not None:
        return user.rescore_window, 0, None, 1
    new = np.array(user.new, dtype=RECORD_DTYPE)
    k = len(new)
    ctx = cfg.context_len
    if cfg.arch == "gru" and (user.hidden is not None or len(user.prior) == 0):
        return new, 0, user.hidden, k
    if cfg.arch == "cnn":
        return np.concatenate([user.prior[len(user.prior) - min(ctx, len(user.prior)) :], new]), 0, None, k
    if cfg.arch == "hybrid" and user.hidden is not None and len(user.prior) >= ctx:
        return np.concatenate([user.prior[len(user.prior) - ctx :], new]), ctx, user.hidden, k
    # Rebuild from the window. For a user whose whole history is in the window this is exact.
    return np.concatenate([user.prior, new]), 0, None, k


def score_batch(model: LoadedModel, users: list[UserBatch], device: torch.device) -> list[UserScores]:
    """Score every user's new events; one forward pass per distinct context length (at most two)."""
    rows = [_rows(model, u) for u in users]
    results: list[UserScores | None] = [None] * len(users)
    for ctx in sorted({r[1] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r[1] == ctx]
        lengths = np.array([len(rows[i][0]) for i in idx])
        width = int(lengths.max())
        padded = np.zeros((len(idx), width), dtype=RECORD_DTYPE)  # right padding: causal models ignore it
        for j, i in enumerate(idx):
            padded[j, : lengths[j]] = rows[i][0]
        x = model_inputs(padded, model.featurizer)
        h0 = None
        if model.config.has_state:
            h = np.zeros((len(idx), model.config.gru_hidden), dtype=np.float32)
            for j, i in enumerate(idx):
                if rows[i][2] is not None:
                    h[j] = rows[i][2]
            h0 = torch.from_numpy(h).to(device)
        with torch.inference_mode():
            out, states = model.model(
                x["type"].to(device), x["category"].to(device), x["numeric"].to(device), h0=h0, context_len=ctx
            )
            probs = probabilities(out, model.calibration).float().cpu().numpy()
            states_np = None if states is None else states.float().cpu().numpy()
        for j, i in enumerate(idx):
            end = lengths[j] - ctx  # outputs exclude the context positions
            k = rows[i][3]
            hidden = None if states_np is None else states_np[j, end - 1].copy()
            results[i] = UserScores(probs=probs[j, end - k : end], hidden=hidden)
    return results  # type: ignore[return-value]
