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
from training.metrics import roc_auc


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


# ---- the persona posterior: the best a model that sees only events can do ------------------------------


@pytest.fixture(scope="module")
def medium() -> simulator.Simulation:
    return simulator.simulate(1200, 30, seed=3)


def test_replay_every_persona_is_replay_states_for_each_persona(small: simulator.Simulation):
    r = simulator.replay_every_persona(small.events)
    np.testing.assert_array_equal(r.after[:, simulator.LOYAL], simulator.replay_states(small.events))
    # The true persona's column is the exact replay: the oracle at its states is the truth file's p_purchase.
    true_k = np.array([simulator.PERSONAS.index(t["persona"]) for t in small.truth])
    oracle = np.array(simulator.purchase_oracle(small.horizon_ms // 1000))
    own = oracle[r.after[np.arange(len(true_k)), true_k]]
    np.testing.assert_allclose(own, _truth_column(small, "p_purchase"), atol=1e-6)
    # A move is drawn from the state the previous event left (a START state at a session's first event).
    inside = ~r.first
    np.testing.assert_array_equal(r.before[inside], r.after[r.prev[inside]])
    _, stage, _, _ = simulator.state_parts(r.before[r.first])
    assert (stage == simulator.START).all() and (r.gap_s[r.first] == 0).all()


@pytest.mark.parametrize("between_sessions", [False, True])
def test_persona_posterior_finds_the_persona_and_ranks_between_blind_replay_and_oracle(
    medium: simulator.Simulation, between_sessions: bool
):
    sim = medium
    period = {"between_sessions": between_sessions, "start_ms": sim.start_ms, "end_ms": sim.end_ms}
    states, post = simulator.persona_posterior(sim.events, **period)
    np.testing.assert_allclose(post.sum(axis=1), 1.0)
    true_k = np.array([simulator.PERSONAS.index(t["persona"]) for t in sim.truth])
    last: dict[str, int] = {}
    for i, e in enumerate(sim.events):
        last[e.user_id] = i
    count = defaultdict(int)
    for e in sim.events:
        count[e.user_id] += 1
    long = np.array([i for u, i in last.items() if count[u] >= 30])
    assert len(long) >= 100
    # After 30 or more events the posterior mostly sits on the true persona.
    assert (post[long].argmax(axis=1) == true_k[long]).mean() >= 0.85
    assert post[long, true_k[long]].mean() >= 0.8
    # Its purchase probability ranks between the persona-blind replay (everyone a loyal regular) and the oracle.
    horizon = sim.horizon_ms // 1000
    oracle_table = np.array(simulator.purchase_oracle(horizon))
    bayes = simulator.persona_posterior_purchase(sim.events, horizon, **period)
    np.testing.assert_allclose(bayes, (post * oracle_table[states]).sum(axis=1))
    blind = oracle_table[simulator.replay_states(sim.events)]
    oracle = _truth_column(sim, "p_purchase")
    y = _truth_column(sim, "label_purchase")
    known = ~np.isnan(y) & (np.array([e.ts for e in sim.events]) + sim.horizon_ms <= sim.end_ms)
    auc = {name: roc_auc(y[known], p[known]) for name, p in (("blind", blind), ("bayes", bayes), ("oracle", oracle))}
    assert auc["blind"] < auc["bayes"] < auc["oracle"], auc
    if between_sessions:
        # With the visits as well, the likelihood is the whole generative process of what it uses: averaged over
        # all events, each persona's posterior is its frequency, and the prediction's mean is the oracle's.
        hit = (np.arange(len(simulator.PERSONAS)) == true_k[:, None]).astype(float)
        assert np.abs(post.mean(axis=0) - hit.mean(axis=0)).max() < 0.025
        assert abs(bayes.mean() - oracle.mean()) < 0.002


def test_persona_posterior_is_the_chain_likelihood_by_hand():
    # One user: page view, product view 30 s later (a short gap), another 200 s later (a hesitation); two days
    # later a second session (a page view), three days after that a third: they show that the earlier ended.
    start, end = simulator.DEFAULT_START_MS, simulator.DEFAULT_START_MS + 30 * simulator.DAY_MS
    sessions = [[("page_view", 0), ("product_view", 30), ("product_view", 200)], [("page_view", 0)], [("page_view", 0)]]
    opens = [start + 3_600_000, start + 2 * simulator.DAY_MS, start + 5 * simulator.DAY_MS]
    events = []
    for j, (steps, t) in enumerate(zip(sessions, opens, strict=True)):
        for kind, gap_s in steps:
            t += gap_s * 1000
            events.append(Event(f"ev-0000000-{len(events):05d}", "u0000000", kind, t, f"ss-0000000-{j:04d}"))
    moves = {"page_view": simulator.PAGE, "product_view": simulator.VIEW}
    chain = simulator.build_chain()
    oracle = np.array(simulator.purchase_oracle(3600))

    def gap(s: int, k: int, move: int, d: int) -> float:
        h, q, ql = chain.hesitation[s], simulator._gap_q(k, move), simulator.LONG_Q
        return h * (1 - ql) * ql ** (d - 1) + (1 - h) * (1 - q) * q ** (d - 1)

    # The visits: a customer's first session is the first point after the start of a Poisson process of rate
    # r0 x the daily rhythm; a newcomer's comes at rate 4/day after a uniform arrival (integrated minute by
    # minute here); each later one needs the user not to have stopped, then comes at r0 x the drift x the
    # session-end factors, from an hour after the last event before it. r0 is log-normal around the persona's
    # median.
    lam = simulator.cumulative_intensity

    def slope(ts: int) -> float:
        return simulator.HOURLY[(ts % simulator.DAY_MS) // simulator.HOUR_MS] / 24 / simulator.HOUR_MS

    t0 = events[0].ts
    minutes = range(start, t0, 60_000)
    newcomer = sum(4 * slope(t0) * np.exp(-4 * (lam(t0) - lam(a + 30_000))) * 60_000 for a in minutes) / (end - start)
    nodes, w = np.polynomial.hermite_e.hermegauss(24)
    w = w / w.sum()

    weights: dict[bool, list[float]] = {False: [], True: []}
    last_states = []
    for k, pp in enumerate(simulator.PERSONA_PARAMS):
        r0 = pp.visits_per_day * np.exp(0.45 * nodes)
        like = 1.0
        visits = 0.7 * r0 * slope(t0) * np.exp(-r0 * (lam(t0) - lam(start))) + 0.3 * newcomer
        s, long_gap, prev_ts = -1, False, 0  # (set by the session before the one that reads them)
        for j, steps in enumerate(sessions):
            if j:
                like *= chain.prob[s, simulator.END]
                _, stage, intent, cart = simulator.state_parts(s)
                stop_f, rate_f = simulator._end_factors(int(stage), int(intent), int(cart))
                leave_stop, leave_rate = simulator._leave_factors(0, 0, long_gap)
                p_stop = min(0.98, min(0.95, pp.stop + pp.stop_growth * (j - 1)) * stop_f * leave_stop)
                rate = r0 * pp.rate_decay ** (j - 1) * rate_f * leave_rate
                t = opens[j]
                visits = visits * (1 - p_stop) * rate * slope(t) * np.exp(-rate * (lam(t) - lam(prev_ts + 3_600_000)))
            s = simulator.state_index(k, simulator.START, pp.base_intent - int(pp.intent_drift * j), 0)
            for n, (kind, gap_s) in enumerate(steps):
                move, long_gap = moves[kind], gap_s > simulator.HESITATION_GAP_S
                like *= chain.prob[s, move] * (gap(s, k, move, gap_s) if n else 1.0)
                s = (chain.next_long if long_gap else chain.next_short)[s, move]
            prev_ts = opens[j] + sum(g for _, g in steps) * 1000
        weights[False].append(pp.share * like)
        weights[True].append(pp.share * like * (w * visits).sum())
        last_states.append(s)
    for between in (False, True):
        expected = np.array(weights[between]) / sum(weights[between])
        states, post = simulator.persona_posterior(events, between_sessions=between, start_ms=start, end_ms=end)
        np.testing.assert_allclose(post[-1], expected, rtol=1e-6)
        np.testing.assert_array_equal(states[-1], last_states)
        bayes = simulator.persona_posterior_purchase(events, between_sessions=between, start_ms=start, end_ms=end)
        np.testing.assert_allclose(bayes[-1], expected @ oracle[last_states], rtol=1e-6)
    # The visits say something: the two posteriors differ.
    assert (
        np.abs(np.array(weights[False]) / sum(weights[False]) - np.array(weights[True]) / sum(weights[True])).max()
        > 0.01
    )


def test_persona_posterior_uses_the_visits_and_only_the_past(small: simulator.Simulation):
    sim = small
    period = {"start_ms": sim.start_ms, "end_ms": sim.end_ms}
    true_k = np.array([simulator.PERSONAS.index(t["persona"]) for t in sim.truth])
    _, alone = simulator.persona_posterior(sim.events)
    _, with_visits = simulator.persona_posterior(sim.events, between_sessions=True, **period)
    rows = np.arange(len(true_k))
    assert with_visits[rows, true_k].mean() > alone[rows, true_k].mean()
    # Causal: the events before a cut get the same predictions whether or not the later ones exist.
    cut = sim.events[len(sim.events) // 2].ts
    head = [e for e in sim.events if e.ts < cut]
    for between in (False, True):
        full = simulator.persona_posterior_purchase(sim.events, between_sessions=between, **period)
        part = simulator.persona_posterior_purchase(head, between_sessions=between, **period)
        np.testing.assert_allclose(part, full[: len(head)], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="period"):
        simulator.persona_posterior(sim.events, between_sessions=True)


def test_an_impossible_move_rules_its_persona_out_for_good():
    # Running log-likelihoods per user: a -inf (a move the persona cannot make) stays -inf for that user and
    # persona only, so its posterior weight is 0 from then on.
    terms = np.array([[0.0, -1.0], [-np.inf, -1.0], [-1.0, -2.0], [-1.0, -np.inf], [-3.0, -1.0]])
    user = np.array([0, 0, 1, 1, 0])
    expected = np.array([[0.0, -1.0], [-np.inf, -2.0], [-1.0, -2.0], [-2.0, -np.inf], [-np.inf, -3.0]])
    np.testing.assert_array_equal(simulator._user_cumsum(terms, user), expected)
    # No persona opens a session with an addition to the cart (the cart allows it, the chain does not).
    add_first = [Event("ev-0000000-00000", "u0000000", "add_to_cart", simulator.DEFAULT_START_MS, "ss-0000000-0000")]
    with pytest.raises(ValueError, match="impossible under every persona"):
        simulator.persona_posterior(add_first)


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
