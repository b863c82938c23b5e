"""Item suggestions in intent events, in the engine (no broker): the field, what is left out, batching, swaps."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import orjson
import pytest
import torch

from models.artifact import load_newest, sha256_file
from models.items import ARRAYS, save_items
from stream import engine as engine_module
from stream import hot_swap
from stream.engine import Engine, InRecord
from stream.settings import Settings
from stream.views import items_info
from tests.helpers import BASE_TS, item_model, make_events, write_model

# a-b-c viewed together (a-b strongest), d alone; popularity d > a > b > c
TABLE = {"a": [("b", 0.8), ("c", 0.3)], "b": [("a", 0.8), ("c", 0.5)], "c": [("b", 0.5), ("a", 0.3)], "d": []}


def event(n: int, kind: str, item: str | None, user: str = "u1") -> dict:
    return {
        "event_id": f"{user}-{n}",
        "user_id": user,
        "type": kind,
        "ts": BASE_TS + n * 10_000,
        "session_id": f"s-{user}",
        **({"item_id": item} if item else {}),
    }


def records(events: list[dict]) -> list[InRecord]:
    return [
        InRecord(e["user_id"].encode(), orjson.dumps(e), "clickstream", 0, n, BASE_TS) for n, e in enumerate(events)
    ]


def intents(engine: Engine, events: list[dict], batch: int) -> list[dict]:
    """The intent events of ``events`` cut into batches of ``batch``, states kept between batches."""
    table: dict[str, bytes] = {}
    out = []
    recs = records(events)
    for i in range(0, len(recs), batch):
        result = engine.process(recs[i : i + batch], lambda uid, rec: table.get(uid))
        table.update({uid: blob for uid, (blob, _) in result.states.items()})
        out += [orjson.loads(o.value) for o in result.outputs if o.topic == engine.settings.topic_intent]
    return out


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    write_model(tmp_path)
    model = load_newest(tmp_path, expect_window=64)[0]
    assert model is not None
    settings = Settings.from_env({}, emit_policy="every_event", suggestions_k=3)
    return Engine(settings, model, torch.device("cpu"), item_model(TABLE, popular=["d", "a", "b", "c"]))


def test_intent_events_carry_suggestions_and_leave_bought_items_out(engine: Engine):
    events = [event(0, "page_view", None), event(1, "product_view", "a"), event(2, "add_to_cart", "b")]
    events += [event(3, "purchase", "b"), event(4, "product_view", "zz")]
    got = intents(engine, events, batch=len(events))
    assert [i["event_id"] for i in got] == [e["event_id"] for e in events]
    by_event = {i["event_id"]: i["suggestions"] for i in got}
    # before any item: the popular ones
    assert by_event["u1-0"] == [{"item_id": x, "score": 0.0, "reason": "popular"} for x in ("d", "a", "b")]
    # after viewing a: a itself, then its neighbours, each with why
    first = by_event["u1-1"]
    assert [s["item_id"] for s in first] == ["a", "b", "c"]
    assert first[0]["reason"] == "seen recently" and first[1]["reason"] == "viewed together with a"
    assert first[0]["score"] > first[1]["score"] > first[2]["score"] > 0
    # once b is bought it is suggested no more; an item the model does not know only ages the others
    for e in ("u1-3", "u1-4"):
        assert "b" not in [s["item_id"] for s in by_event[e]], e
    assert [s["item_id"] for s in by_event["u1-4"]] == [s["item_id"] for s in by_event["u1-3"]]


def test_suggestions_do_not_depend_on_the_batching(engine: Engine):
    events = make_events(n_users=6, sessions=2, per_session=8, seed=3)
    for e in events:  # the items of the table, so that the suggestions come from it, not only from popularity
        e["item_id"] = "abcd"[int(e["item_id"].split("-")[1]) % 4]
    whole = {i["event_id"]: i["suggestions"] for i in intents(engine, events, batch=len(events))}
    assert len(whole) == len(events)
    for batch in (1, 7):  # a batch writes its events user by user: compare them by event
        engine.sessions.clear()
        assert {i["event_id"]: i["suggestions"] for i in intents(engine, events, batch=batch)} == whole, batch
    assert any(s["reason"].startswith("viewed together") for got in whole.values() for s in got)


def test_without_an_item_model_suggestions_are_null(engine: Engine):
    events = [event(0, "product_view", "a"), event(1, "add_to_cart", "b")]
    engine.swap_items(None)
    got = intents(engine, events, batch=2)
    assert len(got) == 2 and all(i["suggestions"] is None for i in got)
    # and a model swapped in takes effect at the next batch
    engine.swap_items(item_model({"a": [], "b": [], "c": [], "d": []}, popular=["c"], version=2))
    got = intents(engine, [event(2, "product_view", "d")], batch=1)
    assert [s["item_id"] for s in got[0]["suggestions"]] == ["d", "c"]  # the item seen, then the popular one


def test_only_emitted_events_are_looked_up_once_per_batch(engine: Engine, monkeypatch: pytest.MonkeyPatch):
    """Under on_change most scored events emit nothing: they must cost no lookup, and a batch costs one call."""
    calls: list[int] = []
    real = engine_module.suggest_json

    def counting(model, codes, types, times, lengths, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(lengths))
        return real(model, codes, types, times, lengths, *args, **kwargs)

    monkeypatch.setattr(engine_module, "suggest_json", counting)
    engine.settings = Settings.from_env({}, emit_policy="on_change", suggestions_k=3)
    events = make_events(n_users=10, sessions=2, per_session=8, seed=4)
    table: dict[str, bytes] = {}
    result = engine.process(records(events), lambda uid, rec: table.get(uid))
    assert result.scored == len(events) and 0 < result.intents < len(events)
    assert calls == [result.intents]


def items_metric() -> dict[str, str]:
    """The labels of intentstream_items_model_info in /metrics' text."""
    from stream import metrics

    [line] = [x for x in metrics.render()[0].decode().splitlines() if x.startswith("intentstream_items_model_info{")]
    return dict(re.findall(r'(\w+)="([^"]*)"', line))


def test_the_item_model_served_is_in_health_and_metrics(engine: Engine, tmp_path: Path):
    """/health's ``items`` and the intentstream_items_model info metric name the item model served: none before
    there is one, then its version and the sha256 of its arrays, at start and after a hot swap."""
    settings = Settings.from_env({}, items_dir=str(tmp_path / "items"))
    engine.swap_items(hot_swap.load_items(settings))
    assert items_info(engine) is None and items_metric() == {"name": "", "version": "none", "sha256": ""}

    path = save_items(item_model(TABLE, popular=["d"]), settings.items_dir, {})
    engine.swap_items(hot_swap.load_items(settings))  # as at the worker's start
    served = {"name": "items-knn", "version": "v0001", "sha256": sha256_file(path / ARRAYS)}
    assert items_info(engine) == served and items_metric() == served

    path = save_items(item_model(TABLE, popular=["a"]), settings.items_dir, {})
    asyncio.run(hot_swap.poll_items_once(settings, engine, set()))  # the hot swap
    served = {"name": "items-knn", "version": "v0002", "sha256": sha256_file(path / ARRAYS)}
    assert items_info(engine) == served and items_metric() == served
