"""The clickstream simulator: deterministic contract events, labels that match training/labels.py and a brute
force reference, and calibrated oracle probabilities."""

from __future__ import annotations

import gzip
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest

from stream.cli import main as cli_main
from stream.contract import EVENT_TYPES, Event, validate
from stream.traffic import simulator
from training.labels import compute_labels


@pytest.fixture(scope="module")
def small() -> simulator.Simulation:
    return simulator.simulate(400, 21, seed=7)


def _arrays(sim: simulator.Simulation):
    ev = sim.events
    users = np.array([e.user_id for e in ev])
    ts = np.array([e.ts for e in ev], dtype=np.int64)
    buy = np.array([e.type == "purchase" for e in ev])
    value = np.array([e.price * e.quantity if e.type == "purchase" else np.nan for e in ev])
    return users, ts, buy, value


def _truth_column(sim: simulator.Simulation, name: str) -> np.ndarray:
    return np.array([np.nan if t[name] is None else t[name] for t in sim.truth], dtype=np.float64)


# ---- files and determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["events.jsonl.gz", "events.jsonl"])
def test_same_arguments_same_bytes_other_seed_other_bytes(tmp_path: Path, name: str):
    outs = []
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        (tmp_path / run).mkdir()
        out = tmp_path / run / name
        simulator.write_simulation(out, 60, 5, seed)
        outs.append((out.read_bytes(), simulator.truth_path(out).read_bytes()))
    assert outs[0] == outs[1]
    assert outs[0][0] != outs[2][0] and outs[0][1] != outs[2][1]
    if name.endswith(".gz"):
        assert gzip.decompress(outs[0][0]).count(b"\n") == gzip.decompress(outs[0][1]).count(b"\n") > 0


def test_file_matches_the_in_memory_api(tmp_path: Path):
    out = tmp_path / "events.jsonl.gz"
    summary = simulator.write_simulation(out, 80, 6, 11)
    sim = simulator.simulate(80, 6, 11)
    assert list(simulator.read_events(out)) == sim.events
    assert list(simulator.read_truth(simulator.truth_path(out))) == sim.truth
    assert summary["events"] == len(sim.events)


def test_truth_path():
    assert simulator.truth_path("d/x.jsonl") == Path("d/x.truth.jsonl")
    assert simulator.truth_path("d/x.jsonl.gz") == Path("d/x.truth.jsonl.gz")
    assert simulator.truth_path("x.json.gz") == Path("x.json.truth.jsonl.gz")
    assert simulator.truth_path("x.out") == Path("x.out.truth.jsonl")


def test_read_events_names_the_bad_line(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    good = Event("e1", "u1", "page_view", 1_767_571_200_000).to_json()
    path.write_bytes(good + b"\n\n" + b'{"event_id": "e2", "user_id": "u1", "type": "teleport", "ts": 1}\n')
    reader = simulator.read_events(path)
    assert next(reader).event_id == "e1"
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid event: type"):
        next(reader)


def test_a_user_does_not_depend_on_how_many_others_there_are():
    few, many = simulator.simulate(30, 7, 5), simulator.simulate(60, 7, 5)
    first_30 = {f"u{u:07d}" for u in range(30)}
    assert [e for e in many.events if e.user_id in first_30] == few.events


# ---- the events --------------------------------------------------------------------------------------


def test_events_are_valid_contract_events_sorted_by_time(small: simulator.Simulation):
    ev = small.events
    assert len(ev) > 2000
    for e in ev:
        assert validate(e.to_json(), e.user_id.encode()) == e
    ts = [e.ts for e in ev]
    assert ts == sorted(ts)
    assert small.start_ms <= ts[0] and ts[-1] < small.end_ms
    assert len({e.event_id for e in ev}) == len(ev)
    assert all(len(e.user_id) == 8 and e.user_id.startswith("u") for e in ev)
    assert {e.type for e in ev} == set(EVENT_TYPES)
    assert {e.device for e in ev} <= set(simulator.DEVICES)


def test_per_user_order_sessions_and_funnel(small: simulator.Simulation):
    by_user: dict[str, list[Event]] = defaultdict(list)
    for e in small.events:
        by_user[e.user_id].append(e)
    gap_ms = simulator.MIN_SESSION_GAP_S * 1000
    for events in by_user.values():
        seqs = [int(e.event_id.rsplit("-", 1)[1]) for e in events]
        assert seqs == list(range(len(events)))  # the file keeps each user's own order
        assert len({e.device for e in events}) == 1
        cart = 0
        for prev, e in zip([None, *events], events, strict=False):
            if prev is not None and e.session_id != prev.session_id:
                assert e.ts - prev.ts >= gap_ms  # sessions are at least an hour apart
            elif prev is not None:
                gap = e.ts - prev.ts
                assert gap >= 1000 and gap % 1000 == 0  # whole seconds within a session
            if e.type == "add_to_cart":
                cart += 1
            elif e.type == "remove_from_cart":
                assert cart > 0
                cart -= 1
            elif e.type == "purchase":
                assert prev is not None and prev.type == "checkout_start" and prev.session_id == e.session_id
                assert cart > 0 and e.quantity >= 1 and e.price > 0
                cart = 0
            elif e.type == "checkout_start":
                assert cart > 0


def test_all_personas_present(small: simulator.Simulation):
    assert {t["persona"] for t in small.truth} == set(simulator.PERSONAS)


# ---- labels ------------------------------------------------------------------------------------------


def test_truth_labels_match_training_labels(small: simulator.Simulation):
    users, ts, buy, value = _arrays(small)
    got = compute_labels(users, ts, buy, value, small.horizon_ms, small.churn_ms, small.end_ms)
    np.testing.assert_array_equal(got.purchase, _truth_column(small, "label_purchase"))
    np.testing.assert_array_equal(got.churn, _truth_column(small, "label_churn"))
    np.testing.assert_allclose(got.order_value, _truth_column(small, "order_value"), atol=0.006)
    assert [t["event_id"] for t in small.truth] == [e.event_id for e in small.events]


def test_truth_labels_match_brute_force():
    sim = simulator.simulate(40, 16, seed=2, horizon_s=900, churn_days=3)
    ev, truth = sim.events, sim.truth
    for i, e in enumerate(ev):
        later = [f for f in ev[i + 1 :] if f.user_id == e.user_id]  # the file is in each user's own order
        buys = [f for f in later if f.type == "purchase" and f.ts <= e.ts + sim.horizon_ms]
        if buys:
            want_p, want_v = 1, round(buys[0].price * buys[0].quantity, 2)
        else:
            want_p, want_v = (None if e.ts + sim.horizon_ms > sim.end_ms else 0), None
        if any(f.ts <= e.ts + sim.churn_ms for f in later):
            want_c = 0
        else:
            want_c = None if e.ts + sim.churn_ms > sim.end_ms else 1
        assert (truth[i]["label_purchase"], truth[i]["label_churn"]) == (want_p, want_c)
        if want_v is None:
            assert truth[i]["order_value"] is None
        else:
            assert truth[i]["order_value"] == pytest.approx(want_v, abs=0.006)


def test_censoring_only_where_the_window_passes_the_end(small: simulator.Simulation):
    for e, t in zip(small.events, small.truth, strict=True):
        if t["label_purchase"] is None:
            assert e.ts + small.horizon_ms > small.end_ms
        if t["label_churn"] is None:
            assert e.ts + small.churn_ms > small.end_ms
        if e.ts + small.churn_ms > small.end_ms:
            assert t["label_churn"] in (0, None)  # a churn that late cannot be known
    assert any(t["label_churn"] is None for t in small.truth)


# ---- the oracle --------------------------------------------------------------------------------------


def _calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[float, float, float]:
    """(expected calibration error, Brier score, Brier score of the base rate)."""
    which = np.minimum((p * bins).astype(int), bins - 1)
    ece = np.abs(np.bincount(which, y, bins) - np.bincount(which, p, bins)).sum() / len(y)
    base = y.mean()
    return float(ece), float(np.mean((p - y) ** 2)), float(np.mean((base - y) ** 2))


@pytest.mark.parametrize("horizon_s", [3600, 600])
def test_oracle_is_calibrated(horizon_s: int):
    sim = simulator.simulate(2500, 28, seed=1, horizon_s=horizon_s)
    ts = np.array([e.ts for e in sim.events])
    for label, prob, window in (
        ("label_purchase", "p_purchase", sim.horizon_ms),
        ("label_churn", "p_churn", sim.churn_ms),
    ):
        known = ts + window <= sim.end_ms  # whole window observed: no censoring bias
        y, p = _truth_column(sim, label)[known], _truth_column(sim, prob)[known]
        assert not np.isnan(y).any()
        ece, brier, base_brier = _calibration(y, p)
        assert ece < 0.03, (label, ece)
        assert brier < base_brier, (label, brier, base_brier)
    # Conditional on the session ending at the event (the engine scores churn when a session closes).
    known = (ts + sim.churn_ms <= sim.end_ms) & _last_of_session(sim)
    y, p = _truth_column(sim, "label_churn")[known], _truth_column(sim, "p_churn_session_end")[known]
    ece, brier, base_brier = _calibration(y, p)
    assert ece < 0.04 and brier < base_brier


def _last_of_session(sim: simulator.Simulation) -> np.ndarray:
    last: dict[str, int] = {}
    for i, e in enumerate(sim.events):
        last[e.session_id] = i
    out = np.zeros(len(sim.events), dtype=bool)
    out[list(last.values())] = True
    return out


def test_base_rates_make_both_tasks_meaningful(small: simulator.Simulation):
    ts = np.array([e.ts for e in small.events])
    purchase = _truth_column(small, "label_purchase")[ts + small.horizon_ms <= small.end_ms]
    churn = _truth_column(small, "label_churn")[ts + small.churn_ms <= small.end_ms]
    assert 0.03 <= purchase.mean() <= 0.15
    assert 0.03 <= churn.mean() <= 0.25


def test_purchase_oracle_needs_only_the_persona_and_the_visible_events(small: simulator.Simulation):
    # What makes the oracle reachable by a sequence model: replaying the chain from the events alone (plus the
    # persona) gives exactly the simulator's p_purchase.
    personas = {t["user_id"]: t["persona"] for t in small.truth}
    states = simulator.replay_states(small.events, personas)
    oracle = np.array(simulator.purchase_oracle(small.horizon_ms // 1000))
    np.testing.assert_allclose(oracle[states], _truth_column(small, "p_purchase"), atol=1e-6)
    # Without the persona (everyone replayed as a loyal regular) the stage and the cart still come out right.
    _, stage, _, cart = simulator.state_parts(states)
    _, guessed_stage, _, guessed_cart = simulator.state_parts(simulator.replay_states(small.events))
    assert (stage == guessed_stage).all() and (cart == guessed_cart).all()


def test_purchase_oracle_is_zero_without_time_and_grows_with_the_horizon():
    short, long = np.array(simulator.purchase_oracle(30)), np.array(simulator.purchase_oracle(3600))
    assert (short <= long + 1e-12).all()
    assert (np.array(simulator.purchase_oracle(0)) == 0).all()
    assert long.max() < 1.0


# ---- command line ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sim.jsonl", "sim.jsonl.gz"])
def test_cli_writes_events_truth_and_summary(tmp_path: Path, name: str, capsys):
    out, summary_path = tmp_path / name, tmp_path / "summary.json"
    argv = ["simulate", "--users", "50", "--days", "4", "--seed", "9", "--out", str(out), "--json", str(summary_path)]
    assert cli_main([*argv, "--no-progress"]) == 0
    events = list(simulator.read_events(out))
    truth = list(simulator.read_truth(simulator.truth_path(out)))
    summary = orjson.loads(summary_path.read_bytes())
    assert len(events) == len(truth) == summary["events"] > 0
    assert summary["users"] == 50
    assert {"seconds", "events_per_s", "purchase_positive_rate", "churn_positive_rate"} <= summary.keys()
    assert f"{len(events)} events" in capsys.readouterr().out
    if name.endswith(".gz"):
        assert out.read_bytes()[:2] == b"\x1f\x8b"


def test_cli_rejects_bad_arguments(tmp_path: Path, capsys):
    out = str(tmp_path / "x.jsonl")
    assert cli_main(["simulate", "--users", "0", "--days", "1", "--out", out, "--no-progress"]) == 2
    assert cli_main(["simulate", "--users", "5", "--days", "1", "--out", out, "--start", "soon"]) == 2
    assert "--start" in capsys.readouterr().err
    assert cli_main(["simulate", "--users", "5", "--days", "1", "--out", out, "--start", "1999-12-01"]) == 2
    assert "2000" in capsys.readouterr().err
    assert cli_main(["simulate", "--users", "5", "--days", "1", "--out", str(tmp_path / "no" / "x.jsonl")]) == 2


# ---- items and the item oracle ------------------------------------------------------------------------


def _next_cart_items(sim: simulator.Simulation) -> list[str | None]:
    """Per event: the item of the user's next add to cart or purchase (None if there is none)."""
    out: list[str | None] = [None] * len(sim.events)
    following: dict[str, str] = {}
    for i in range(len(sim.events) - 1, -1, -1):
        e = sim.events[i]
        out[i] = following.get(e.user_id)
        if e.type in ("add_to_cart", "purchase"):
            following[e.user_id] = e.item_id
    return out


def test_item_outcomes_are_distributions():
    table = simulator.item_outcomes()
    assert table.shape == (simulator.N_STATES, 3, simulator.N_OUTCOMES)
    assert (table >= 0).all()
    np.testing.assert_allclose(table.sum(axis=2), 1.0, atol=1e-9)


def test_next_items_are_ranked_where_a_cart_event_follows(small: simulator.Simulation):
    nxt = _next_cart_items(small)
    for truth, item in zip(small.truth, nxt, strict=True):
        ranking = truth["next_items"]
        assert (ranking is None) == (item is None)
        if ranking is None:
            continue
        ps = [p for _, p in ranking]
        assert 0 < len(ranking) <= simulator.ORACLE_TOP
        assert ps == sorted(ps, reverse=True) and ps[-1] > 0 and sum(ps) <= 1.0001
        assert len({i for i, _ in ranking}) == len(ranking)


def test_sessions_browse_item_clusters(small: simulator.Simulation):
    """Within a session, consecutive fresh product views mostly stay in one cluster of 10 items."""
    same = pairs = 0
    last: dict[str, tuple[str, str]] = {}
    for e in small.events:
        if e.type != "product_view":
            continue
        prev = last.get(e.user_id)
        if prev and prev[0] == e.session_id and prev[1] != e.item_id:
            pairs += 1
            same += prev[1][:-1] == e.item_id[:-1]  # sku-cc-iii<r>: the cluster is all but the last digit
        last[e.user_id] = (e.session_id or "", e.item_id or "")
    assert pairs > 500 and same / pairs > 0.35


def test_item_oracle_is_nearly_calibrated():
    """The oracle's probabilities are those of the simulator's own item process, up to the approximations in
    item_rankings: its top-1 and top-10 mass are close to the hit rates they predict."""
    sim = simulator.simulate(1500, 30, seed=3)
    hit1 = hit10 = p1 = p10 = n = 0.0
    for truth, item in zip(sim.truth, _next_cart_items(sim), strict=True):
        if item is None:
            continue
        ranked = [i for i, _ in truth["next_items"]]
        n += 1
        hit1 += ranked[0] == item
        hit10 += item in ranked
        p1 += truth["next_items"][0][1]
        p10 += sum(p for _, p in truth["next_items"])
    assert n > 3000
    assert hit10 / n > 0.5
    assert abs(hit1 - p1) / n < 0.06 and abs(hit10 - p10) / n < 0.08
