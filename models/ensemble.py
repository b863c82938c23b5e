"""K GRU models folded into one: an exact ensemble (the mean of the members' logits) that the engine serves as one
ordinary ``gru`` IntentModel.

A GRU's gates act unit by unit, so K independent GRUs of hidden size H are one GRU of hidden size K x H whose weight
matrices are block-diagonal (gate by gate); the embeddings and the input layer are concatenated the same way (each
member reads its own embeddings and the shared numeric features), the heads' first layers are block-diagonal and
their last layers average. The engine's hidden state is the members' states side by side; nothing in the engine, the
state record or the exporter changes, and the parity with ``training.train.predict`` holds as for any GRU
(tests/test_training.py checks the fold against the members' mean).

What it costs: the merged GRU's matrices are K times wider and K times taller (dense: K^2 the multiply-adds of a
member per step); docs/training.md has the measured scores per second.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from models.features import N_NUMERIC
from models.model import IntentModel, ModelConfig


def merged_config(c: ModelConfig, k: int) -> ModelConfig:
    return dataclasses.replace(
        c, d_type=c.d_type * k, d_category=c.d_category * k, d_model=c.d_model * k, gru_hidden=c.gru_hidden * k
    )


def _block_diag_gates(mats: list[torch.Tensor], gates: int) -> torch.Tensor:
    """[gates x H, I] per member -> [gates x K H, K I]: gate g of member k at rows g K H + k H, columns k I."""
    h = mats[0].shape[0] // gates
    i = mats[0].shape[1]
    k = len(mats)
    out = torch.zeros(gates * k * h, k * i, dtype=mats[0].dtype)
    for m, w in enumerate(mats):
        for g in range(gates):
            out[g * k * h + m * h : g * k * h + (m + 1) * h, m * i : (m + 1) * i] = w[g * h : (g + 1) * h]
    return out


def _gate_vector(vecs: list[torch.Tensor], gates: int) -> torch.Tensor:
    h = vecs[0].shape[0] // gates
    return torch.cat([v[g * h : (g + 1) * h] for g in range(gates) for v in vecs])


@torch.no_grad()
def merge(members: list[IntentModel]) -> IntentModel:
    """One IntentModel whose outputs are the mean of the members' outputs (purchase and churn logits, log order
    value) at every position, from any hidden state that is the members' states side by side."""
    c = members[0].config
    if c.arch != "gru" or c.rate_state:
        raise ValueError("merge: plain gru members only")
    if any(m.config != c for m in members):
        raise ValueError("merge: the members' configurations differ")
    k = len(members)
    merged = IntentModel(merged_config(c, k)).eval()
    merged.type_emb.weight.copy_(torch.cat([m.type_emb.weight for m in members], dim=1))
    merged.category_emb.weight.copy_(torch.cat([m.category_emb.weight for m in members], dim=1))

    # input layer: [type embeddings of every member, category embeddings of every member, numeric]
    w = torch.zeros_like(merged.input.weight)
    for i, m in enumerate(members):
        rows = slice(i * c.d_model, (i + 1) * c.d_model)
        mw = m.input.weight
        w[rows, i * c.d_type : (i + 1) * c.d_type] = mw[:, : c.d_type]
        at = k * c.d_type + i * c.d_category
        w[rows, at : at + c.d_category] = mw[:, c.d_type : c.d_type + c.d_category]
        w[rows, k * (c.d_type + c.d_category) :] = mw[:, c.d_type + c.d_category :]
    assert w.shape[1] == k * (c.d_type + c.d_category) + N_NUMERIC
    merged.input.weight.copy_(w)
    merged.input.bias.copy_(torch.cat([m.input.bias for m in members]))

    gru, grus = merged.gru, [m.gru for m in members]
    assert gru is not None and all(g is not None for g in grus)
    for name in ("weight_ih_l0", "weight_hh_l0"):
        getattr(gru, name).copy_(_block_diag_gates([getattr(g, name) for g in grus], 3))
    for name in ("bias_ih_l0", "bias_hh_l0"):
        getattr(gru, name).copy_(_gate_vector([getattr(g, name) for g in grus], 3))

    first, last = _linear(merged.head[0]), _linear(merged.head[-1])
    firsts = [_linear(m.head[0]) for m in members]
    lasts = [_linear(m.head[-1]) for m in members]
    first.weight.copy_(torch.block_diag(*[f.weight for f in firsts]))
    first.bias.copy_(torch.cat([f.bias for f in firsts]))
    last.weight.copy_(torch.cat([f.weight for f in lasts], dim=1) / k)
    last.bias.copy_(torch.stack([f.bias for f in lasts]).mean(dim=0))
    return merged


def _linear(module: nn.Module) -> nn.Linear:
    assert isinstance(module, nn.Linear)
    return module
