"""Models: causal structure, the incremental step equals the full pass, artifacts round-trip and refuse tampering."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.artifact import ArtifactError, load_artifact, load_newest, save_artifact, untrained_model
from models.ensemble import merge
from models.features import FeaturizerConfig, encode_events, model_inputs
from models.model import ARCHS, packing
from tests.test_features import random_events


def _inputs(n=80, seed=3):
    events = [e for e in random_events(n_users=1, n_events=n, seed=seed)]
    rec, _ = encode_events(events, FeaturizerConfig())
    x = model_inputs(rec[None, :], FeaturizerConfig())
    return x["type"], x["category"], x["numeric"]


@pytest.mark.parametrize("arch", ARCHS)
def test_step_by_step_equals_the_full_window_pass(arch):
    model = untrained_model(arch)
    t, c, x = _inputs()
    ctx = model.config.context_len
    with torch.no_grad():
        full, _ = model(t, c, x)
        h = None
        steps = []
        for i in range(t.shape[1]):
            lo = max(0, i - ctx)
            pad = ctx - (i - lo)  # left zero padding, as at the start of a sequence in training
            ti, ci, xi = t[:, lo : i + 1], c[:, lo : i + 1], x[:, lo : i + 1]
            if pad:  # pad to a fixed context with the same zeros the causal conv would see
                out, states = model(t[:, : i + 1], c[:, : i + 1], x[:, : i + 1], h0=h, context_len=i)
            else:
                out, states = model(ti, ci, xi, h0=h, context_len=ctx)
            steps.append(out[:, -1])
            h = None if states is None else states[:, -1]
    stepped = torch.stack(steps, dim=1)
    assert torch.allclose(stepped, full, atol=1e-5), (stepped - full).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_are_causal(arch):
    model = untrained_model(arch)
    t, c, x = _inputs()
    x2 = x.clone()
    x2[:, 50:] += 1.0  # change the future
    with torch.no_grad():
        a, _ = model(t, c, x)
        b, _ = model(t, c, x2)
    assert torch.allclose(a[:, :50], b[:, :50], atol=1e-6)
    assert not torch.allclose(a[:, 50:], b[:, 50:])


def _save(tmp_path, arch="gru", featurizer=None):
    return save_artifact(
        untrained_model(arch),
        tmp_path,
        featurizer=featurizer or FeaturizerConfig(),
        calibration={"purchase": [1.0, 0.0], "churn": [1.0, 0.0]},
        thresholds={"purchase": {"medium": 0.2, "high": 0.5}, "churn": {"alert": 0.5}},
        horizon_s=3600,
        churn_days=14,
        data_hash="test",
        metrics={},
    )


def test_artifact_round_trip_and_versions(tmp_path):
    first = _save(tmp_path)
    second = _save(tmp_path, "cnn")
    assert (first.name, second.name) == ("v0001-gru", "v0002-cnn")
    loaded = load_artifact(first)
    ref = untrained_model("gru")
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    newest, refused = load_newest(tmp_path)
    assert newest is not None and newest.version == "v0002" and refused == []


def test_tampered_weights_are_refused_and_the_previous_version_serves(tmp_path):
    good = _save(tmp_path)
    bad = _save(tmp_path)
    weights = bad / "weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_artifact(bad)
    newest, refused = load_newest(tmp_path)
    assert newest is not None and newest.path == good
    assert len(refused) == 1 and "sha256 mismatch" in refused[0]


def test_mismatched_featurizer_is_refused(tmp_path):
    path = _save(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["featurizer"]["version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="featurizer version 99"):
        load_artifact(path)
    with pytest.raises(ArtifactError, match="window"):
        load_artifact(_save(tmp_path), expect_window=32)


def test_a_model_trained_with_another_session_gap_is_refused(tmp_path):
    """Churn is judged where a session ends: a model trained with another session gap than the worker's would be
    read at positions it never learned. The worker refuses it and keeps the model that agrees."""
    from stream.hot_swap import load_model
    from stream.settings import Settings

    agrees = _save(tmp_path)
    _save(tmp_path, featurizer=FeaturizerConfig(session_gap_s=900.0))
    with pytest.raises(ArtifactError, match=r"session gap of 900\.0 s.*INTENTSTREAM_SESSION_GAP_S"):
        load_artifact(tmp_path / "v0002-gru", expect_session_gap_s=1800.0)
    served = load_model(Settings.from_env(model_dir=tmp_path, session_gap_s=1800), torch.device("cpu"))
    assert served.path == agrees
    assert load_model(Settings.from_env(model_dir=tmp_path, session_gap_s=900), torch.device("cpu")).version == "v0002"


def test_weights_load_without_pickle(tmp_path):
    path = _save(tmp_path)
    assert (path / "weights.safetensors").read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle stream
    assert np.frombuffer((path / "weights.safetensors").read_bytes()[:8], "<u8")[0] > 0  # safetensors header len


def test_merged_grus_output_their_mean_from_the_start_and_from_a_carried_state():
    members = [untrained_model("gru", seed) for seed in (0, 1, 2)]
    with torch.no_grad():
        for m in members:  # away from the initialisation's symmetries: every block must land where it belongs
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
    merged = merge(members)
    assert merged.config.gru_hidden == 3 * members[0].config.gru_hidden and merged.config.arch == "gru"
    t, c, x = _inputs()
    with torch.no_grad():
        outs = [m(t, c, x) for m in members]
        mean = torch.stack([o for o, _ in outs]).mean(dim=0)
        got, states = merged(t, c, x)
        assert torch.allclose(got, mean, atol=1e-5)
        h = torch.cat([s[:, 29] for _, s in outs], dim=-1)
        assert states is not None and torch.allclose(states[:, 29], h, atol=1e-6)
        later, _ = merged(t[:, 30:], c[:, 30:], x[:, 30:], h0=h)
        assert torch.allclose(later, mean[:, 30:], atol=1e-5)


@pytest.mark.parametrize("variant", ["gru", "gru+rate", "hybrid"])
def test_rows_of_different_lengths_score_as_each_row_alone(variant):
    """A worker's batch: right-padded rows of 1 to 20 real positions with hidden states from before. With ``lengths``
    the GRU models step over real positions only (for a plain GRU the input layer and heads run on them alone too);
    every row's outputs and states at its real positions are those of the row scored alone."""
    model = untrained_model(variant)
    packed_calls = []
    packed = model._forward_packed
    model._forward_packed = lambda *a: packed_calls.append(1) or packed(*a)  # type: ignore[method-assign]
    t, c, x = _inputs(n=20 * 6, seed=5)
    n_rows, width = 6, 20
    t, c, x = t.view(n_rows, width), c.view(n_rows, width), x.view(n_rows, width, -1)
    lengths = torch.tensor([1, 20, 3, 1, 7, 2])
    h0 = torch.randn(n_rows, model.config.gru_hidden) * 0.5
    if model.config.rate_state:
        h0[:, -2:] = h0[:, -2:].abs() * 10  # accumulators: days and sessions, never negative
    for start in (h0, None):  # users with a state, and new users
        with torch.no_grad():
            out, states = model(t, c, x, h0=start, lengths=lengths)
            for r, n in enumerate(lengths.tolist()):
                row_h0 = None if start is None else start[r : r + 1]
                alone, alone_states = model(t[r : r + 1, :n], c[r : r + 1, :n], x[r : r + 1, :n], h0=row_h0)
                assert torch.allclose(out[r, :n], alone[0], atol=1e-5), (out[r, :n] - alone[0]).abs().max()
                assert states is not None and alone_states is not None
                assert torch.allclose(states[r, :n], alone_states[0], atol=1e-5)
                if packed_calls:  # the plain GRU's packed pass leaves zeros beyond each row's real positions
                    assert not out[r, n:].any() and not states[r, n:].any()
    assert bool(packed_calls) == (variant == "gru")  # only a plain GRU takes the packed pass


def test_rows_end_to_end_score_as_each_row_alone():
    """The engine's path for a plain GRU: rows laid end to end, without padding (``forward_rows``). Every position's
    outputs, and each row's hidden state after its last position, are those of the row scored alone, with a state
    from before or without one; rows of one position and rows longer than all others included, in any order."""
    model = untrained_model("gru")
    lengths = np.array([1, 20, 3, 1, 7, 2, 20], dtype=np.int64)
    t, c, x = (v[0] for v in _inputs(n=int(lengths.sum()), seed=7))  # one row of all positions, end to end
    h0 = torch.randn(len(lengths), model.config.gru_hidden) * 0.5
    starts = np.cumsum(lengths) - lengths
    for start in (h0, None):
        with torch.no_grad():
            out, last = model.forward_rows(t, c, x, lengths, start)
            assert out.shape == (int(lengths.sum()), 3) and last.shape == (len(lengths), model.config.gru_hidden)
            for r, (a, n) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
                row_h0 = None if start is None else start[r : r + 1]
                rows = slice(a, a + n)
                alone, alone_states = model(t[None, rows], c[None, rows], x[None, rows], h0=row_h0)
                assert alone_states is not None
                assert torch.allclose(out[rows], alone[0], atol=1e-5), (out[rows] - alone[0]).abs().max()
                assert torch.allclose(last[r], alone_states[0, -1], atol=1e-5)


def test_packing_orders_rows_by_length_and_steps_through_them():
    """Rows end to end as a PackedSequence: the longest rows first (ties in row order), each step's rows, and
    positions that map back and forth."""
    lengths = np.array([2, 3, 1, 3], dtype=np.int64)  # rows at 0-1, 2-4, 5, 6-8
    order, unsorted, batch_sizes, packed_at, unpacked_at = packing(lengths)
    assert order.tolist() == [1, 3, 0, 2]
    assert unsorted.tolist() == [2, 0, 3, 1] and (order[unsorted] == torch.arange(4)).all()
    assert batch_sizes.tolist() == [4, 3, 2]
    assert packed_at.tolist() == [2, 6, 0, 5, 3, 7, 1, 4, 8]
    assert (packed_at.numpy()[unpacked_at] == np.arange(9)).all()
