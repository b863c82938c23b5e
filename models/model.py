"""Sequence models over a user's events: GRU, causal temporal CNN, CNN+GRU hybrid, and a causal transformer.

Three heads at every position: purchase-within-horizon logit, churn logit, and log expected order value.
All four architectures are causal, so one pass over a user's sequence predicts at every event (cheap
training), and the engine can score a new event from what its table keeps:

- ``gru``: the hidden state after the user's last event is kept in the engine's table; a new event costs
  one GRU step (``forward(x_new, h0=h)``).
- ``cnn``: dilated causal convolutions whose receptive field (63 events) fits in the window; the engine
  passes the window as context (``context_len``) and reads outputs at the new positions.
- ``hybrid``: the CNN over the window feeds a GRU whose hidden state is kept like ``gru``'s.
- ``transformer``: causal self-attention in which, in each of its two layers, an event attends to itself and the
  31 events before it (``attention_span``), with ALiBi distance biases instead of absolute positions: an event's
  output depends on the last 63 events alone (the receptive field, like the CNN's), wherever they sit in a
  history, so the engine rescores the window each batch (no hidden state) and gets what training computed over
  the whole history.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from models.features import N_NUMERIC, N_TYPES

HEADS = ("purchase", "churn", "order_value")
RATE_STATE = 2  # accumulators carried in the hidden state: days since the user's first event, sessions so far
RATE_FEATURES = 4  # features derived from them (``rate_features``)
DAY_S = 86_400.0
ARCHS = ("gru", "cnn", "hybrid", "transformer")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "gru"  # gru | cnn | hybrid | transformer
    d_model: int = 64
    d_type: int = 8
    d_category: int = 8
    category_buckets: int = 64
    gru_hidden: int = 64
    cnn_kernel: int = 3
    cnn_dilations: tuple[int, ...] = (1, 2, 4, 8, 16)  # receptive field 1 + 2 * 31 = 63 events
    dropout: float = 0.1
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4
    attention_span: int = 32  # events a layer's position attends to, itself included (two layers reach 63 back)
    # gru / hybrid: carry the user's visit-rate accumulators (days since the first event, sessions) in the last
    # RATE_STATE entries of the hidden state (gru_hidden counts them) and feed rate features to the GRU and the heads
    rate_state: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.rate_state and self.arch not in ("gru", "hybrid"):
            raise ValueError(f"rate_state needs a hidden state to carry it (gru or hybrid), not {self.arch!r}")

    @property
    def recurrent_hidden(self) -> int:
        """The GRU's own hidden size: ``gru_hidden`` less the rate accumulators."""
        return self.gru_hidden - (RATE_STATE if self.rate_state else 0)

    @property
    def head_dim(self) -> int:
        """Width of the representation the heads read."""
        if not self.has_state:
            return self.d_model
        return self.recurrent_hidden + (RATE_FEATURES if self.rate_state else 0)

    @property
    def receptive_field(self) -> int:
        if self.arch == "transformer":  # each layer reaches span - 1 events further back
            return 1 + self.n_layers * (self.attention_span - 1)
        return 1 + (self.cnn_kernel - 1) * sum(self.cnn_dilations)

    @property
    def context_len(self) -> int:
        """Earlier events the model must see to score a new one (0 when a hidden state carries history)."""
        return self.receptive_field - 1 if self.arch in ("cnn", "hybrid", "transformer") else 0

    @property
    def has_state(self) -> bool:
        return self.arch in ("gru", "hybrid")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cnn_dilations"] = list(self.cnn_dilations)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**{**d, "cnn_dilations": tuple(d["cnn_dilations"])})


class CausalConvBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilation: int, dropout: float):
        super().__init__()
        self.pad = (kernel - 1) * dilation
        self.conv = nn.Conv1d(channels, channels, kernel, dilation=dilation)
        self.norm = nn.LayerNorm(channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, T]
        y = self.conv(F.pad(x, (self.pad, 0)))  # left padding only: position t sees t and earlier
        y = self.norm(F.gelu(y).transpose(1, 2)).transpose(1, 2)
        return x + self.dropout(y)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions t - window + 1 .. t, biased by distance
    (ALiBi: a fixed slope per head), so that outputs do not depend on where a window sits in a sequence."""

    slopes: torch.Tensor

    def __init__(self, d_model: int, n_heads: int, window: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.n_heads, self.window = n_heads, window
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)])
        self.register_buffer("slopes", slopes.view(n_heads, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, C]
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        pos = torch.arange(t, device=x.device)
        distance = pos.view(-1, 1) - pos.view(1, -1)  # query - key
        seen = (distance >= 0) & (distance < self.window)
        bias = (-self.slopes * distance.clamp(min=0)).masked_fill(~seen, float("-inf"))  # [H, T, T]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.n_heads) + bias
        y = self.dropout(torch.softmax(att, dim=-1)) @ v  # [B, H, T, C / H]
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class TransformerBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.d_model)
        self.attn = CausalSelfAttention(c.d_model, c.n_heads, c.attention_span, c.dropout)
        self.norm2 = nn.LayerNorm(c.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(c.d_model, 4 * c.d_model), nn.GELU(), nn.Linear(4 * c.d_model, c.d_model), nn.Dropout(c.dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class IntentModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.type_emb = nn.Embedding(N_TYPES, c.d_type)
        self.category_emb = nn.Embedding(c.category_buckets + 1, c.d_category)
        self.input = nn.Linear(c.d_type + c.d_category + N_NUMERIC, c.d_model)
        self.convs = nn.ModuleList(
            [CausalConvBlock(c.d_model, c.cnn_kernel, d, c.dropout) for d in c.cnn_dilations]
            if c.arch in ("cnn", "hybrid")
            else []
        )
        self.blocks = nn.ModuleList([TransformerBlock(c) for _ in range(c.n_layers)] if c.arch == "transformer" else [])
        self.final_norm = nn.LayerNorm(c.d_model) if c.arch == "transformer" else None
        n_rate = RATE_FEATURES if c.rate_state else 0
        self.gru = nn.GRU(c.d_model + n_rate, c.recurrent_hidden, batch_first=True) if c.has_state else None
        d_out = c.head_dim
        self.head = nn.Sequential(nn.Linear(d_out, d_out), nn.GELU(), nn.Dropout(c.dropout), nn.Linear(d_out, 3))

    def forward(
        self,
        type_idx: torch.Tensor,  # [B, T] int64
        category_idx: torch.Tensor,  # [B, T] int64
        numeric: torch.Tensor,  # [B, T, N_NUMERIC]
        h0: torch.Tensor | None = None,  # [B, gru_hidden] hidden state after the events before x
        context_len: int = 0,  # leading positions that are context only (cnn/hybrid): no output, no GRU step
        lengths: torch.Tensor | None = None,  # [B] int64 on the CPU: each row's real positions after the context
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (outputs [B, T - context_len, 3], hidden states [B, T - context_len, gru_hidden] or None).

        outputs[..., 0] purchase logit, [..., 1] churn logit, [..., 2] log expected order value.
        The hidden state after position t is states[:, t]: the engine keeps the one at each user's last event.
        With ``lengths`` (rows right-padded beyond them), the GRU steps over each row's real positions only when
        the padding would be most of its work (a plain GRU runs its input layer and heads on them alone too);
        outputs and states at padded positions are then meaningless.
        """
        x = torch.cat([self.type_emb(type_idx), self.category_emb(category_idx), numeric], dim=-1)
        if (
            self.gru is not None
            and not self.convs
            and not self.config.rate_state
            and context_len == 0
            and lengths is not None
            and _mostly_padding(lengths, x.shape[1])
        ):
            return self._forward_packed(x, h0, lengths)
        x = F.gelu(self.input(x))
        if self.convs:
            x = x.transpose(1, 2)
            for block in self.convs:
                x = block(x)
            x = x.transpose(1, 2)
        if self.final_norm is not None:
            for block in self.blocks:
                x = block(x)
            x = self.final_norm(x)
        x = x[:, context_len:]
        states = None
        rate_acc = rate = None
        if self.config.rate_state:
            n_gru = self.config.recurrent_hidden
            rate_acc = rate_accumulators(numeric[:, context_len:], None if h0 is None else h0[:, n_gru:])
            rate = rate_features(rate_acc)
            x = torch.cat([x, rate], dim=-1)
            h0 = None if h0 is None else h0[:, :n_gru]
        if self.gru is not None:
            hx = None if h0 is None else h0.unsqueeze(0).contiguous()
            if lengths is not None and _mostly_padding(lengths, x.shape[1]):
                packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
                x, _ = pad_packed_sequence(self.gru(packed, hx)[0], batch_first=True, total_length=x.shape[1])
            else:
                x, _ = self.gru(x, hx)
            states = x  # one layer: the output at t is the hidden state after t
        if rate_acc is not None and rate is not None and states is not None:
            states = torch.cat([states, rate_acc], dim=-1)
            x = torch.cat([x, rate], dim=-1)
        return self.head(x), states

    def forward_rows(
        self,
        type_idx: torch.Tensor,  # [N] int64: the rows' positions end to end (row 0's, then row 1's, ...)
        category_idx: torch.Tensor,  # [N] int64
        numeric: torch.Tensor,  # [N, N_NUMERIC]
        lengths: np.ndarray,  # [B] int64, each at least 1: the rows' numbers of positions
        h0: torch.Tensor | None = None,  # [B, gru_hidden]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` of a plain GRU (no convolutions, no rate state) over rows laid end to end rather than
        right-padded: outputs [N, 3] at every position, in the same order, and each row's hidden state after its last
        position [B, gru_hidden]. What the engine scores, with no padding anywhere: a worker's batch of users bringing
        1 to 40 new events each was six parts padding in seven, and the scatter into padded rows, the embeddings,
        ``pack_padded_sequence`` and ``pad_packed_sequence`` all ran over it (``_forward_packed``'s input layer and
        heads already ran on real positions only).

        The PackedSequence is built here rather than by ``pack_padded_sequence`` (which wants padded rows): its
        ``batch_sizes`` int64 on the CPU, its data step-major with the rows by decreasing length, ``unsorted_indices``
        the inverse of ``sorted_indices``; tests/test_model.py checks every position against the row scored alone."""
        assert self.gru is not None and not self.convs and not self.config.rate_state and self.final_norm is None
        x = torch.cat([self.type_emb(type_idx), self.category_emb(category_idx), numeric], dim=-1)
        x = F.gelu(self.input(x))
        p = packing(lengths)
        device = x.device
        packed = PackedSequence(x[p.packed_at.to(device)], p.batch_sizes, p.order.to(device), p.unsorted.to(device))
        hx = None if h0 is None else h0.unsqueeze(0).contiguous()
        states, last = self.gru(packed, hx)
        return self.head(states.data)[torch.from_numpy(p.unpacked_at).to(device)], last[0]

    def _forward_packed(
        self, x: torch.Tensor, h0: torch.Tensor | None, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` of a plain GRU over right-padded rows, computed at each row's real positions only: the input
        layer and the heads too, not just the recurrence (a worker's batch of users bringing 1 to 20 new events each
        is mostly padding). Outputs and states at padded positions are zeros."""
        assert self.gru is not None
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        packed = packed._replace(data=F.gelu(self.input(packed.data)))
        hx = None if h0 is None else h0.unsqueeze(0).contiguous()
        states = self.gru(packed, hx)[0]
        outputs = states._replace(data=self.head(states.data))
        width = x.shape[1]
        return (
            pad_packed_sequence(outputs, batch_first=True, total_length=width)[0],
            pad_packed_sequence(states, batch_first=True, total_length=width)[0],
        )


class Packing(NamedTuple):
    """How rows laid end to end (row i's ``lengths[i]`` positions, then row i + 1's) become a PackedSequence."""

    order: torch.Tensor  # the rows by decreasing length, stable (PackedSequence.sorted_indices)
    unsorted: torch.Tensor  # its inverse: where each row is in ``order`` (PackedSequence.unsorted_indices)
    batch_sizes: torch.Tensor  # the number of rows still running at each step
    packed_at: torch.Tensor  # where each packed position is in the rows end to end
    unpacked_at: np.ndarray  # where each position of the rows end to end is among the packed ones


def packing(lengths: np.ndarray) -> Packing:
    order = np.argsort(-lengths, kind="stable")
    unsorted = np.empty_like(order)
    unsorted[order] = np.arange(len(order))
    by_length = lengths[order]
    steps, rows = np.nonzero(np.arange(int(by_length[0]))[:, None] < by_length[None, :])  # step-major, as packed
    packed_at = (np.cumsum(lengths) - lengths)[order][rows] + steps
    unpacked_at = np.empty_like(packed_at)
    unpacked_at[packed_at] = np.arange(len(packed_at))
    batch_sizes = torch.from_numpy(np.bincount(steps, minlength=int(by_length[0])))
    return Packing(
        torch.from_numpy(order), torch.from_numpy(unsorted), batch_sizes, torch.from_numpy(packed_at), unpacked_at
    )


def rate_accumulators(numeric: torch.Tensor, acc0: torch.Tensor | None) -> torch.Tensor:
    """[B, T, 2]: days since the user's first event and sessions started so far, after each position, from the
    record features (the gap before the event, ``log1p(gap_s) / 10``, and the new-session flag) and the values after
    the events before (``acc0`` [B, 2], zeros for a new user). Causal sums: one pass over a history gives what the
    engine's step-by-step hidden state gives."""
    days = (torch.exp(numeric[..., 0] * 10.0) - 1.0) / DAY_S
    acc = torch.cumsum(torch.stack([days, numeric[..., 1]], dim=-1), dim=1)
    return acc if acc0 is None else acc + acc0.unsqueeze(1)


def rate_features(acc: torch.Tensor) -> torch.Tensor:
    """[B, T, 4] from the accumulators: log days since the first event, log sessions, log mean days between session
    starts, log sessions per day (clamped: a hidden state from elsewhere may hold anything)."""
    days = acc[..., 0].clamp(min=0.0)
    sessions = acc[..., 1].clamp(min=0.0)
    between = days / (sessions - 1.0).clamp(min=1.0)
    per_day = sessions / (days + 1.0)
    return (
        torch.stack(
            [torch.log(1.0 + days), torch.log(1.0 + sessions), torch.log(1.0 + between), torch.log(1.0 + per_day)],
            dim=-1,
        )
        / 3.0
    )


def _mostly_padding(lengths: torch.Tensor, width: int) -> bool:
    """Whether a recurrent pass over padded rows would spend most of its steps on padding. A batch's users differ in
    how many new events they bring (one, or twenty); the GRU's cost is rows x width, so the packed pass (each row
    its own steps; some fixed cost to pack) pays from about a third of padding on (measured: 1.6x to 3.3x faster on
    the GRU for a worker's batches of full windows, slower for rows of one event)."""
    return width > 1 and int(lengths.sum()) < 0.7 * len(lengths) * width


def calibrated(logits: torch.Tensor, platt: list[float]) -> torch.Tensor:
    """Platt scaling, the one place it is applied (engine, exported graphs, trainer, evaluator, baselines):
    sigmoid(a * logit + b), with [a, b] fitted on validation by training.metrics.platt_fit."""
    a, b = platt
    return torch.sigmoid(a * logits + b)


def probabilities(outputs: torch.Tensor, calibration: dict[str, list[float]] | None = None) -> torch.Tensor:
    """Calibrated purchase and churn probabilities and expected order value from raw outputs [..., 3].

    ``calibration``: Platt parameters per head fitted on validation, {"purchase": [a, b], "churn": [a, b]}.
    """
    cal = calibration or {}
    return torch.stack(
        [
            calibrated(outputs[..., 0], cal.get("purchase", [1.0, 0.0])),
            calibrated(outputs[..., 1], cal.get("churn", [1.0, 0.0])),
            torch.exp(outputs[..., 2].clamp(max=15.0)),
        ],
        dim=-1,
    )
