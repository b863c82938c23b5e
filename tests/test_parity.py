"""One scoring path: what the engine emits equals what the trainer's ``training.train.predict`` computes on the same
history, for every architecture.

Events go through ``Engine.process`` in batches of 1, 7 and 256 (the hidden state carried between batches, the CNN's
context read from the window), with late events (the window rescored), duplicates, an event too late for the window,
and a model swap in the middle to another artifact with the same version string (the users' hidden states must be
rebuilt: they are tied to the weights' sha256). Every intent event's score and every churn alert's risk is compared
with ``predict`` + ``probabilities`` (the one calibration function) over the user's history as the engine had it
when it scored: the events it had accepted by then, in time order. Churn alerts must fire exactly where training
judges churn (``Dataset.session_end``).

Users here have at most a window of events, so that a user rebuilt after the swap or a late event is rebuilt from
their whole history; ``test_long_histories_carry_past_the_window`` proves the carried state beyond the window.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from models.artifact import LoadedModel, load_artifact, save_artifact, untrained_model
from models.features import FeaturizerConfig
from models.model import ARCHS, probabilities
from stream.contract import TOO_LATE_REASON, Event
from stream.engine import Engine, InRecord
from stream.settings import Settings
from tests.helpers import BASE_TS
from training.data import DataConfig, build_dataset
from training.train import Tensors, predict

GAP_MS = 1_800_000
CALIBRATION = {"purchase": [1.3, -0.4], "churn": [0.7, 0.2]}  # not the identity: the engine must apply it
TYPES = ("page_view", "search", "product_view", "add_to_cart", "remove_from_cart", "checkout_start", "purchase")


def artifact(model_dir: Path, arch: str, seed: int) -> LoadedModel:
    path = save_artifact(
        untrained_model(arch, seed),
        model_dir,
        featurizer=FeaturizerConfig(),
        calibration=CALIBRATION,
        thresholds={"purchase": {"medium": 0.3, "high": 0.6}, "churn": {"alert": 0.0}},  # every closed session
        horizon_s=3600,
        churn_days=14,
        data_hash="parity",
        metrics={},
        name=f"parity-{arch}",
    )
    return load_artifact(path, expect_window=64, expect_session_gap_s=GAP_MS / 1000)


def user_events(rng: random.Random, user: str, n: int, start: int, sessions: bool) -> list[Event]:
    """``n`` events of one user from ``start``: seconds to minutes apart, and with ``sessions``, sometimes a pause
    that ends the session (one of exactly the session gap: the deadline itself closes it)."""
    events, ts = [], start
    for i in range(n):
        if sessions and i and rng.random() < 0.12:
            ts += GAP_MS if rng.random() < 0.3 else rng.randrange(GAP_MS + 1, 3 * GAP_MS)
        else:
            ts += rng.randrange(5_000, 400_000)
        item = f"sku-{rng.randrange(40)}"
        events.append(
            Event(
                f"{user}-e{i}", user, rng.choice(TYPES), ts, session_id=f"{user}-s{ts // 7_200_000}",
                item_id=item, category=f"c{int(item[4:]) % 5}", price=round(rng.uniform(3, 300), 2),
                quantity=rng.choice((None, 1, 2)),
            )
        )  # fmt: skip
    return events


def stream_of(rng: random.Random, n_users: int, max_events: int) -> tuple[list[Event], dict[str, int]]:
    """Every user's events in time order across users, then: some events delivered late (after later events of
    their user, within the allowed lateness), a few duplicates (a producer's retries), one event older than the
    lateness bound, and a last event of another user far enough ahead to close every session. Returns the events
    in delivery order and how many of them are late, duplicates and too late."""
    by_time = sorted(
        (ev for u in range(n_users) for ev in user_events(rng, f"u{u:03d}", rng.randrange(1, max_events + 1),
                                                           BASE_TS + rng.randrange(0, 3_600_000), sessions=u % 3 != 0)),
        key=lambda e: e.ts,
    )  # fmt: skip
    delivered: list[Event] = []
    held: list[tuple[Event, int]] = []  # (event, deliveries to wait)
    for ev in by_time:
        if ev.user_id.endswith("0") and rng.random() < 0.25:  # some users' events arrive after their next ones
            held.append((ev, rng.randrange(5, 40)))  # minutes of event time: within the lateness, not a session
            continue
        delivered.append(ev)
        held = [(late, wait - 1) for late, wait in held]
        delivered += [late for late, wait in held if wait <= 0]
        held = [(late, wait) for late, wait in held if wait > 0]
    delivered += [late for late, _ in held]
    newest: dict[str, int] = {}
    late = 0
    for ev in delivered:
        late += ev.ts < newest.get(ev.user_id, 0)
        newest[ev.user_id] = max(ev.ts, newest.get(ev.user_id, 0))
    for dup in rng.sample(delivered[: len(delivered) // 2], 5):
        delivered.insert(delivered.index(dup) + rng.randrange(1, 30), dup)
    first = delivered[0]
    delivered.append(dataclasses.replace(first, event_id="stale", ts=first.ts - 2 * 3_600_000))  # 1 h lateness
    delivered.append(Event("tick-e0", "tick", "page_view", max(e.ts for e in delivered) + 3 * GAP_MS))
    return delivered, {"late": late, "duplicates": 5, "too_late": 1}


class Reference:
    """What ``predict`` must give for each emitted score: queries (model, history, position) answered at the end,
    one dataset and one ``predict`` call per model."""

    def __init__(self) -> None:
        self.histories: dict[int, list[list[Event]]] = {}  # model index -> histories
        self.accepted: dict[str, list[Event]] = {}

    def batch(self, model: int, new: dict[str, list[Event]]) -> dict[tuple[str, str], tuple[int, int, int]]:
        """Each user's accepted events of a batch -> (model, history, position) per event_id, and for the user's
        last event under the key ("last", user). A batch that inserted a late event rescores the user's window:
        all its events get the score of the window's end, as the engine emits them."""
        out = {}
        for user, events in new.items():
            before = self.accepted.get(user, [])
            last_ts = before[-1].ts if before else -1
            rescore = False
            for ev in events:
                rescore |= ev.ts < last_ts
                last_ts = max(last_ts, ev.ts)
            history = sorted(before + events, key=lambda e: e.ts)
            self.accepted[user] = history
            hist_list = self.histories.setdefault(model, [])
            hist_list.append(history)
            h = len(hist_list) - 1
            position = {ev.event_id: i for i, ev in enumerate(history)}
            for ev in events:
                out[(user, ev.event_id)] = (model, h, len(history) - 1 if rescore else position[ev.event_id])
            out[("last", user)] = (model, h, len(history) - 1)
        return out

    def answers(self, models: list[LoadedModel]) -> dict[tuple[int, int], np.ndarray]:
        """(model, history) -> calibrated [len(history), 3] from the trainer's predict."""
        got = {}
        for m, histories in self.histories.items():
            model = models[m]
            events = [dataclasses.replace(ev, user_id=f"q{h}") for h, hist in enumerate(histories) for ev in hist]
            ds = build_dataset(events, DataConfig(featurizer=model.featurizer))
            raw = predict(model.model, ds, Tensors(ds), np.arange(ds.n_users), torch.device("cpu"))
            probs = probabilities(torch.from_numpy(raw), model.calibration).numpy()
            for u, uid in enumerate(ds.user_ids):
                got[(m, int(uid[1:]))] = probs[ds.user_start[u] : ds.user_start[u + 1]]
        return got


def run_engine(models: list[LoadedModel], delivered: list[Event], batch: int, swap_at: int | None) -> dict:
    settings = Settings.from_env(
        emit_policy="every_event", churn_cooldown_s=0, session_gap_s=GAP_MS / 1000, allowed_lateness_s=3600
    )
    engine = Engine(settings, models[0], torch.device("cpu"))
    table: dict[str, bytes] = {}
    ref = Reference()
    intents, alerts, dlq, expected, risk_of = [], [], [], {}, {}
    serving = 0
    for b, start in enumerate(range(0, len(delivered), batch)):
        if swap_at is not None and start >= swap_at and serving == 0:
            engine.swap_model(models[1])
            serving = 1
        chunk = delivered[start : start + batch]
        records = [
            InRecord(ev.user_id.encode(), orjson.dumps(dataclasses.asdict(ev)), "clickstream", 0, start + i, ev.ts)
            for i, ev in enumerate(chunk)
        ]
        result = engine.process(records, lambda uid, rec: table.get(uid))
        for uid, (blob, _rec) in result.states.items():
            table[uid] = blob
        new: dict[str, list[Event]] = {}
        by_id = {ev.event_id: ev for ev in chunk}
        for out in result.outputs:
            body = orjson.loads(out.value)
            if out.topic == settings.topic_intent:
                intents.append((b, body))
                new.setdefault(body["user_id"], []).append(by_id[body["event_id"]])
            elif out.topic == settings.topic_churn:
                alerts.append((b, body))
            else:
                dlq.append(body)
        queries = ref.batch(serving, new)
        expected.update({(b, *k): v for k, v in queries.items()})
        for user, events in new.items():  # the churn risk kept for each event (the user's state keeps the last)
            for ev in events:
                risk_of[(user, ev.ts)] = queries[(user, ev.event_id)]
            risk_of[(user, ref.accepted[user][-1].ts)] = queries[("last", user)]
        for _, body in alerts:
            if "checked" not in body:
                body["checked"] = risk_of[(body["user_id"], body["last_seen"])]
    return {"ref": ref, "intents": intents, "alerts": alerts, "dlq": dlq, "expected": expected}


def check(models: list[LoadedModel], got: dict, delivered: list[Event], counts: dict[str, int]) -> None:
    answers = got["ref"].answers(models)
    worst = 0.0
    for b, body in got["intents"]:
        m, h, pos = got["expected"][(b, body["user_id"], body["event_id"])]
        worst = max(worst, abs(body["score"] - float(answers[(m, h)][pos, 0])))
    assert worst <= 1e-5, f"largest purchase-score difference {worst:.2e}"
    worst = 0.0
    for _, body in got["alerts"]:
        m, h, pos = body["checked"]
        worst = max(worst, abs(body["risk"] - float(answers[(m, h)][pos, 1])))
    assert worst <= 1e-5, f"largest churn-risk difference {worst:.2e}"

    # Every event was scored once, but the duplicates and the one beyond the lateness bound (to the DLQ).
    assert len(got["intents"]) == len(delivered) - counts["duplicates"] - counts["too_late"]
    assert len({(body["user_id"], body["event_id"]) for _, body in got["intents"]}) == len(got["intents"])
    assert [d["reason"] for d in got["dlq"]] == [TOO_LATE_REASON] * counts["too_late"]

    # Churn is judged where training judges it: a session end of the final histories, except each user's newest
    # session, which the last event closed, and the closing user's own, still open.
    accepted = got["ref"].accepted
    events = [ev for user in accepted for ev in accepted[user]]
    ds = build_dataset(events, DataConfig(featurizer=models[0].featurizer))
    ends = ds.session_end()
    ts = ds.records["ts"]
    judged = {
        (ds.user_ids[u], int(ts[i]))
        for u in range(ds.n_users)
        for i in range(ds.user_start[u], ds.user_start[u + 1])
        if ends[i] and ds.user_ids[u] != "tick"
    }
    assert {(body["user_id"], body["last_seen"]) for _, body in got["alerts"]} == judged


VARIANTS = (*ARCHS, "gru+rate")  # gru+rate: the visit-rate accumulators carried in the hidden state


@pytest.mark.parametrize("batch", [1, 7, 256])
@pytest.mark.parametrize("arch", VARIANTS)
def test_engine_scores_equal_the_trainers_predict(arch: str, batch: int, tmp_path: Path) -> None:
    # Two artifacts of the same architecture, each the v0001 of its own folder: a version string cannot tell them
    # apart, their sha256 can.
    models = [artifact(tmp_path / "a", arch, seed=0), artifact(tmp_path / "b", arch, seed=1)]
    assert models[0].version == models[1].version and models[0].state_tag != models[1].state_tag
    delivered, counts = stream_of(random.Random(7), n_users=30, max_events=60)  # at most a window per user
    assert counts["late"] >= 10
    got = run_engine(models, delivered, batch, swap_at=len(delivered) // 2)
    check(models, got, delivered, counts)
    assert len(got["alerts"]) >= 30  # every user's last session, and the earlier ones


@pytest.mark.parametrize("arch", VARIANTS)
def test_long_histories_carry_past_the_window(arch: str, tmp_path: Path) -> None:
    """Users with three windows of events, in order, one model: the GRU's hidden state carried across batches and
    the CNN's context read from the window score every event as the trainer's pass over the whole history."""
    models = [artifact(tmp_path / "a", arch, seed=0)]
    rng = random.Random(11)
    events = sorted(
        (ev for u in range(4) for ev in user_events(rng, f"long{u}", 190, BASE_TS + u * 1000, sessions=True)),
        key=lambda e: e.ts,
    )
    events.append(Event("tick-e0", "tick", "page_view", events[-1].ts + 3 * GAP_MS))
    for batch in (1, 100):
        check(models, run_engine(models, events, batch, swap_at=None), events, {"duplicates": 0, "too_late": 0})
