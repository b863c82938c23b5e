"""Hostile input, property-based: the state rules and codec, the featurizer and a whole engine batch.

tests/test_contract.py holds the validator's own properties (any bytes give an Event or a reason); these go
one step further down the pipeline: whatever arrives, a user's state stays well-formed and round-trips
through its binary encoding, model inputs stay finite, and every record of a batch ends up scored, in the
DLQ with its reason, or counted as a duplicate, without an exception.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.artifact import load_newest
from models.features import (
    FLAG_FIRST,
    RECORD_DTYPE,
    FeaturizerConfig,
    encode_events,
    event_hash,
    model_inputs,
)
from stream.contract import (
    DLQ_MAX_ORIGINAL_BYTES,
    EVENT_TYPES,
    MAX_PRICE,
    MAX_QUANTITY,
    MAX_TS_MS,
    SCORE_DIGITS,
    VALUE_DIGITS,
    Event,
    dlq_record,
    reason_field,
)
from stream.emit import (
    _ago,
    ago_keys,
    band_of,
    bands_of,
    intent_numbers,
    intent_reasons,
    intent_reasons_at,
    intent_reasons_json_at,
    round_floats,
)
from stream.engine import Engine, InRecord
from stream.settings import Settings
from stream.state.user import HEADER, Accept, PendingWindow, UserState
from tests.helpers import write_model

BASE_TS = 1_767_600_000_000
DAY_MS = 86_400_000
REASON_FIELDS = {
    "record", "json", "key", "schema", "event_id", "user_id", "type", "ts",
    "price", "quantity", "session_id", "item_id", "category", "device",
}  # fmt: skip
SLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- strategies --------------------------------------------------------------------------------------------

# Gaps between a user's events: none, seconds, past the session gap, days, decades (timestamps stay in range).
GAPS = st.sampled_from((0, 1, 1_000, 60_000, 1_800_001, 3 * DAY_MS)) | st.integers(0, 40 * 365 * DAY_MS)
OPTIONAL_TEXT = st.none() | st.text(max_size=40)


@st.composite
def event_streams(draw: st.DrawFn, users: int = 1, max_events: int = 60, late: bool = True) -> list[Event]:
    """Valid events in arrival order: event time mostly moves forward, some arrive late (``late``), event ids
    repeat now and then (producer retries), prices and quantities span their whole valid range."""
    n = draw(st.integers(1, max_events))
    id_pool = draw(st.integers(max(1, n // 3), n + 1))
    clocks = [BASE_TS - 20 * 365 * DAY_MS] * users
    events = []
    for _ in range(n):
        u = draw(st.integers(0, users - 1))
        clocks[u] = min(clocks[u] + draw(GAPS), MAX_TS_MS - 1)
        ts = clocks[u]
        if late and draw(st.integers(0, 4)) == 0:
            ts = max(BASE_TS - 25 * 365 * DAY_MS, ts - draw(st.integers(0, 2 * 3_600_000)))
        events.append(
            Event(
                event_id=f"e{draw(st.integers(0, id_pool))}" if late else f"e{len(events)}",
                user_id=f"u{u}",
                type=draw(st.sampled_from(EVENT_TYPES)),
                ts=ts,
                session_id=draw(st.none() | st.sampled_from(("s1", "s2", "s3"))),
                item_id=draw(st.none() | st.sampled_from(("i1", "i2")) | st.text(max_size=20)),
                category=draw(OPTIONAL_TEXT),
                price=draw(st.none() | st.sampled_from((0.0, MAX_PRICE)) | st.floats(0, MAX_PRICE)),
                quantity=draw(st.none() | st.sampled_from((1, 255, 256, MAX_QUANTITY)) | st.integers(1, MAX_QUANTITY)),
                device=draw(OPTIONAL_TEXT),
            )
        )
    return events


CONFIGS = st.builds(FeaturizerConfig, window=st.integers(1, 20), session_gap_s=st.sampled_from((1.0, 1800.0)))
LATENESS_MS = st.sampled_from((0, 60_000, 3_600_000, 30 * DAY_MS))

# ---- state: the rules of accept() and the codec ------------------------------------------------------------


def assert_well_formed(state: UserState, config: FeaturizerConfig) -> None:
    r = state.records
    assert r.dtype == RECORD_DTYPE and len(r) <= config.window
    assert (np.diff(r["ts"]) >= 0).all(), "window out of time order"
    assert len(set(r["event_hash"].tolist())) == len(r), "an event_id twice in the window"
    if len(r):
        assert (np.diff(r["count"].astype(np.int64)) == 1).all() and int(r["count"][-1]) == state.count - 1
        expected_gaps = np.maximum(0.0, np.diff(r["ts"]) / 1000.0).astype(np.float32)
        assert np.allclose(r["gap_s"][1:], expected_gaps, rtol=1e-6), "gap_s does not follow the previous event"
        assert not (r["flags"][1:] & FLAG_FIRST).any()
        assert state.last_ts == int(r["ts"].max())


@SLOW
@given(event_streams(), CONFIGS, LATENESS_MS)
def test_any_event_stream_leaves_a_well_formed_state_that_round_trips(events, config, lateness_ms):
    blob = UserState().to_bytes()
    for event in events:
        state = UserState.from_bytes(blob)  # through the binary codec every time, as the engine does
        before = state.count
        outcome = state.accept(event, config, lateness_ms)
        after = state.to_bytes()
        if outcome in (Accept.DUPLICATE, Accept.TOO_LATE):
            assert after == blob and state.count == before  # refused events change nothing
        else:
            assert state.count == before + 1
            assert event_hash(event.event_id) in state.records["event_hash"]
        if outcome is Accept.DUPLICATE:
            assert event_hash(event.event_id) in UserState.from_bytes(blob).records["event_hash"]
        assert_well_formed(state, config)
        assert UserState.from_bytes(after).to_bytes() == after
        blob = after


@SLOW
@given(event_streams(), CONFIGS, LATENESS_MS, st.lists(st.integers(1, 70), min_size=1, max_size=8))
def test_a_batch_window_accepts_like_the_state_one_event_at_a_time(events, config, lateness_ms, cuts):
    """PendingWindow (the engine's batch path) against UserState.accept, event by event: the same outcome for every
    event and the same state bytes after every batch, whatever the batches' sizes (repeated ids pushed out of a
    small window by the batch itself, late insertions, duplicates in the window before the batch or in the batch)."""
    one_by_one, blob, i = UserState(), UserState().to_bytes(), 0
    while i < len(events):
        batch = events[i : i + cuts[i % len(cuts)]]
        i += len(batch)
        pending = PendingWindow.of(UserState.from_bytes(blob), config)
        for event in batch:
            assert pending.accept(event, lateness_ms) is one_by_one.accept(event, config, lateness_ms)
        blob = pending.finish().to_bytes()
        assert blob == one_by_one.to_bytes()


HEADER_FIELDS = st.fixed_dictionaries(
    {
        "count": st.integers(0, 2**64 - 1),
        "session_start": st.integers(-(2**63), 2**63 - 1),
        "score": st.floats(width=32, allow_nan=False),
        "last_score": st.floats(width=32, allow_nan=False),
        "last_band": st.integers(-1, 2),
        "last_emit_ts": st.integers(-(2**63), 2**63 - 1),
        "churn_risk": st.floats(width=32, allow_nan=False),
        "closed_ts": st.integers(-(2**63), 2**63 - 1),
        "churn_alert_ts": st.integers(-(2**63), 2**63 - 1),
        "model_tag": st.from_regex(r"[0-9a-f]{16}", fullmatch=True),  # what LoadedModel.state_tag writes
    }
)


@SLOW
@given(event_streams(max_events=30), HEADER_FIELDS, st.none() | st.integers(0, 256), st.integers(0, 2**32 - 1))
def test_state_codec_round_trips_any_state(events, header, n_hidden, seed):
    config = FeaturizerConfig(window=16)
    state = UserState()
    for e in events:
        state.accept(e, config, 3_600_000)
    hidden = None
    if n_hidden is not None:
        hidden = np.random.default_rng(seed).standard_normal(n_hidden).astype(np.float32)
        hidden[: n_hidden // 7] = np.nan  # whatever bits the model leaves there, they come back
    state = UserState(records=state.records, hidden=hidden, **header)
    blob = state.to_bytes()
    assert len(blob) == HEADER.size + 4 * (n_hidden or 0) + len(state.records) * RECORD_DTYPE.itemsize
    back = UserState.from_bytes(blob)
    assert back.records.tobytes() == state.records.tobytes()
    assert (back.hidden is None) == (not n_hidden)  # an empty hidden state reads back as "none kept"
    if n_hidden:
        assert back.hidden.tobytes() == hidden.tobytes()
    for name, value in header.items():
        assert getattr(back, name) == value, name
    assert back.to_bytes() == blob


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_state_decoder_fails_loudly_or_reads_back_what_it_decoded(blob):
    # The table only ever holds blobs we wrote; a corrupted one must not come back as a different state silently
    # re-encoded: either it decodes and re-encodes to itself, or it raises a ValueError/struct.error.
    import struct

    try:
        state = UserState.from_bytes(blob)
    except (ValueError, struct.error):
        return
    assert state.to_bytes() == blob


# ---- featurizer ----------------------------------------------------------------------------------------------


@SLOW
@given(event_streams(users=3, max_events=80), CONFIGS, LATENESS_MS)
def test_model_inputs_are_finite_and_in_range_for_any_window(events, config, lateness_ms):
    states: dict[str, UserState] = {}
    for e in events:
        states.setdefault(e.user_id, UserState()).accept(e, config, lateness_ms)
    for state in states.values():
        inputs = model_inputs(state.records, config)
        n = len(state.records)
        assert inputs["numeric"].shape == (n, 10) and inputs["numeric"].dtype == torch.float32
        assert torch.isfinite(inputs["numeric"]).all(), "huge prices, gaps or counts must give finite features"
        assert ((inputs["type"] >= 0) & (inputs["type"] < len(EVENT_TYPES))).all()
        assert ((inputs["category"] >= 0) & (inputs["category"] <= config.category_buckets)).all()


@SLOW
@given(event_streams(users=4, max_events=80, late=False), CONFIGS)
def test_online_windows_equal_the_offline_featurizer_for_any_in_order_stream(events, config):
    # tests/test_features.py proves this for one fixed stream; here for any: no training/serving skew.
    events.sort(key=lambda e: e.ts)  # stable: equal times keep their arrival order, as encode_events does
    online: dict[str, bytes] = {}
    for e in events:
        state = UserState.from_bytes(online[e.user_id]) if e.user_id in online else UserState()
        assert state.accept(e, config, 0) is Accept.APPENDED
        online[e.user_id] = state.to_bytes()
    records, order = encode_events(events, config)
    users = np.array([events[i].user_id for i in order])
    for user, blob in online.items():
        assert UserState.from_bytes(blob).records.tobytes() == records[users == user][-config.window :].tobytes()


# ---- a whole engine batch ------------------------------------------------------------------------------------


@functools.cache
def engine() -> Engine:
    model_dir = Path(tempfile.mkdtemp(prefix="intentstream-props-"))
    write_model(model_dir, churn_alert=0.0)
    model, refused = load_newest(model_dir, torch.device("cpu"), expect_window=64)
    assert model is not None, refused
    return Engine(Settings.from_env({}, emit_policy="every_event"), model, torch.device("cpu"))


NOW_MS = int(time.time() * 1000)
HOSTILE_VALUES = st.sampled_from(
    (
        b'{"event_id":"e1","user_id":"u1","type":"search","ts":NaN}',
        b'{"event_id":"e1","user_id":"u1","type":"search","ts":1767600000000,"price":Infinity}',
        b'{"event_id":"e1","user_id":"u1","type":"search","ts":1e400}',
        b'{"event_id":"e1","user_id":"u1","type":"search","ts":' + str(2**64).encode() + b"}",
        b'{"event_id":"e1","user_id":"u1","type":"search","ts":' + str(NOW_MS + 2 * DAY_MS).encode() + b"}",
        b'{"event_id":"e1","user_id":"u1","type":"search","ts":-1}',
        b'{"event_id":"e1","user_id":"u1","type":"search","ts":1767600000000,"x":' + b"[" * 3000 + b"]" * 3000 + b"}",
        b'{"event_id":"e1","user_id":"u1","type":"search","ts":1767600000000,"pad":"' + b"x" * 70_000 + b'"}',
        b"\xff\xfe\x00{",
        b"",
    )
)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
)


@st.composite
def hostile_batches(draw: st.DrawFn) -> list[tuple[bytes | None, bytes | None]]:
    """Records of a batch: valid events of a few users (late ones, repeated ids, far-future times included),
    arbitrary bytes, arbitrary JSON, and known-hostile values, under matching, foreign, missing or non-UTF-8 keys."""
    valid = draw(event_streams(users=3, max_events=25))
    records: list[tuple[bytes | None, bytes | None]] = []
    for e in valid:
        e.ts = e.ts - BASE_TS + NOW_MS - 10 * DAY_MS if draw(st.booleans()) else e.ts  # near now or in the past
        records.append((e.user_id.encode(), e.to_json()))
    junk = st.tuples(
        st.none() | st.sampled_from((b"u1", b"u0", b"\xff\xfe", b"")) | st.binary(max_size=10),
        st.none() | HOSTILE_VALUES | st.binary(max_size=200) | JSON.map(orjson.dumps),
    )
    for k, v in draw(st.lists(junk, max_size=15)):
        records.insert(draw(st.integers(0, len(records))), (k, v))
    return records


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_batches(), st.integers(1, 3))
def test_every_record_of_any_batch_is_scored_dead_lettered_or_a_duplicate(records, n_batches):
    eng = engine()
    eng.sessions.clear()
    table: dict[str, bytes] = {}
    inputs = [InRecord(k, v, "clickstream", 0, offset, NOW_MS) for offset, (k, v) in enumerate(records)]
    chunk = -(-len(inputs) // n_batches) or 1
    scored = duplicates = 0
    dead: list[dict] = []
    intents: list[dict] = []
    for i in range(0, len(inputs), chunk):  # state carried from batch to batch through the codec
        result = eng.process(inputs[i : i + chunk], lambda user_id, rec: table.get(user_id))
        scored += result.scored
        duplicates += result.duplicates
        for out in result.outputs:
            if out.topic == eng.settings.topic_dlq:
                dead.append(orjson.loads(out.value))
            elif out.topic == eng.settings.topic_intent:
                intents.append(orjson.loads(out.value))
        for user_id, (blob, _) in result.states.items():
            assert UserState.from_bytes(blob).to_bytes() == blob
            table[user_id] = blob
    assert scored + len(dead) + duplicates == len(inputs)
    assert len(intents) == scored  # every_event: one intent per scored event
    by_offset = {r.offset: r for r in inputs}
    for d in dead:
        assert reason_field(d["reason"]) in REASON_FIELDS, d["reason"]
        source = by_offset[d["source"]["offset"]]
        original = None if d["value_b64"] is None else base64.b64decode(d["value_b64"])
        assert original == source.value  # the original bytes, whatever they were
    for i in intents:
        assert 0.0 <= i["score"] <= 1.0 and i["band"] in ("low", "medium", "high")


def test_a_flood_of_events_for_one_user_keeps_the_state_bounded():
    eng = engine()
    eng.sessions.clear()
    table: dict[str, bytes] = {}
    n = 5_000
    events = [
        Event(f"flood-{i}", "flooder", EVENT_TYPES[i % len(EVENT_TYPES)], NOW_MS - DAY_MS + i * 10, price=1.0)
        for i in range(n)
    ]
    records = [InRecord(b"flooder", e.to_json(), "clickstream", 0, i, NOW_MS) for i, e in enumerate(events)]
    scored = 0
    for i in range(0, n, 256):
        result = eng.process(records[i : i + 256], lambda user_id, rec: table.get(user_id))
        scored += result.scored
        table.update({u: blob for u, (blob, _) in result.states.items()})
    state = UserState.from_bytes(table["flooder"])
    assert scored == n and state.count == n
    assert len(state.records) == eng.settings.window_size
    limit = HEADER.size + 4 * 256 + eng.settings.window_size * RECORD_DTYPE.itemsize
    assert len(table["flooder"]) <= limit


@settings(max_examples=60, deadline=None)
@given(st.none() | st.binary(max_size=2_000), st.integers(0, 1_100_000), st.binary(min_size=1, max_size=1))
def test_a_dead_letter_record_always_fits_the_producers_request_size(key, size, byte):
    """Any rejected record, up to the broker's 1 MB, gives a DLQ record under 1 MB: cut past 256 KiB, with the
    original's length and sha256 (base64 of a 1 MB value alone would be 1.33 MB, never deliverable)."""
    value = byte * size
    out = dlq_record("record: too large", key, value, "clickstream", 1, 2, 3)
    assert len(out) < 1_000_000
    d = orjson.loads(out)
    kept = base64.b64decode(d["value_b64"])
    assert value.startswith(kept)
    if size > DLQ_MAX_ORIGINAL_BYTES:
        assert d["truncated"]["value"] == {"bytes": size, "sha256": hashlib.sha256(value).hexdigest()}
        assert len(kept) == DLQ_MAX_ORIGINAL_BYTES
    else:
        assert kept == value and "truncated" not in d


def _same_floats(got: list[float], want: list[float]) -> bool:
    """Bit for bit (NaN equals NaN, -0.0 is not 0.0): what orjson would write for each."""
    return [orjson.dumps(g) for g in got] == [orjson.dumps(w) for w in want]


@settings(max_examples=300, deadline=None)
@given(
    st.data(),
    st.sampled_from([SCORE_DIGITS, VALUE_DIGITS, 0, 23]),
)
def test_batch_rounding_gives_the_floats_round_gives(data, ndigits):
    bound = 1e9 / 10 ** min(ndigits, 22)  # where the array path answers; any float beyond, NaN and inf take round
    values = data.draw(
        st.lists(st.one_of(st.floats(-bound, bound), st.floats(allow_nan=True, allow_infinity=True)), max_size=50)
    )
    assert _same_floats(round_floats(np.array(values, dtype=np.float64), ndigits), [round(v, ndigits) for v in values])


def test_batch_rounding_agrees_with_round_on_halves_and_their_neighbours():
    """Values whose scaled double sits on or next to a half, where rint(v * 10**n) alone would differ from round (2.675
    is 2.67499999... exactly: round gives 2.67), and the scores and order values the engine emits."""
    rng = np.random.default_rng(7)
    for ndigits in (SCORE_DIGITS, VALUE_DIGITS):
        halves = (rng.integers(0, 10**ndigits * 1000, 20_000) + 0.5) / 10**ndigits
        halves = np.concatenate([halves, -halves])
        near = np.concatenate([halves, np.nextafter(halves, 0), np.nextafter(halves, 10**9), [2.675, 1.005, 0.125]])
        # and values on the array path: well away from a half, up to where it stops (1e9 / 10**n)
        plain = np.concatenate([rng.uniform(-1, 1, 20_000), rng.uniform(-1e9, 1e9, 20_000) / 10**ndigits])
        for values in (near, plain):
            assert _same_floats(round_floats(values, ndigits), [round(float(v), ndigits) for v in values])
    probs = np.column_stack([rng.random(20_000), rng.random(20_000), rng.random(20_000) * 500]).astype(np.float32)
    want = [
        (round(p[0], SCORE_DIGITS), round(p[0] * p[2], VALUE_DIGITS), round(p[2], VALUE_DIGITS)) for p in probs.tolist()
    ]
    got = intent_numbers(probs)
    assert _same_floats([x for row in got for x in row], [x for row in want for x in row])


def _keys_name_the_texts(ms: list[int]) -> None:
    """Two ages have the same key exactly when ``_ago`` writes the same text for them: the engine makes each key's
    text once, from any of its ages."""
    text_of_key: dict[int, str] = {}
    key_of_text: dict[str, int] = {}
    for key, m in zip(ago_keys(np.array(ms, dtype=np.int64)).tolist(), ms, strict=True):
        text = _ago(m)
        assert text_of_key.setdefault(key, text) == text, (m, key)
        assert key_of_text.setdefault(text, key) == key, (m, text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2**53 - 1) | st.integers(0, 400 * 86_400_000), max_size=40))
def test_batch_age_keys_name_the_texts_ago_writes(ms):
    _keys_name_the_texts(ms)


def test_batch_age_keys_agree_with_ago_on_every_rounding_edge():
    """Each unit's bounds and halves (1.5 min rounds to 2, 2.5 to 2: half to even), a millisecond either side."""
    edges = [0, 29_999, 30_000, 90_000, 150_000, 5_399_999, 5_400_000, 9_000_000, 172_799_999, 172_800_000]
    edges += [k * 30_000 for k in range(1, 400)] + [k * 1_800_000 for k in range(1, 200)]
    edges += [k * 43_200_000 for k in range(1, 400)]
    _keys_name_the_texts(sorted({max(0, e + d) for e in edges for d in (-1, 0, 1)}))


_window_record = st.tuples(
    st.integers(0, 900_000) | st.integers(0, 40 * 86_400_000),  # time since the record before: minutes or days
    st.integers(0, len(EVENT_TYPES) - 1),  # type: any
    st.integers(0, 7),  # flags: first, new session, same item in any combination
    st.floats(0, 60 * 86_400, width=32),  # gap_s, up to two months
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(_window_record, min_size=1, max_size=12), min_size=1, max_size=6),
    st.data(),
    st.integers(0, 4),
)
def test_batch_reasons_are_what_intent_reasons_says(windows_spec, data, limit):
    """The engine's reasons for a batch (each distinct set made once, by its key) are ``intent_reasons`` of each
    event's window, as lists and as JSON, for any windows, ends (0: the event left its window) and limit."""
    windows = []
    for spec in windows_spec:
        w = np.zeros(len(spec), dtype=RECORD_DTYPE)
        w["ts"] = 1_700_000_000_000 + np.cumsum([r[0] for r in spec])
        w["type"] = [r[1] for r in spec]
        w["flags"] = [r[2] for r in spec]
        w["gap_s"] = [r[3] for r in spec]
        windows.append(w)
    ends = [
        data.draw(st.lists(st.integers(0, len(w)), min_size=1, max_size=4).map(sorted), label=f"ends{i}")
        for i, w in enumerate(windows)
    ]
    want = [intent_reasons(w[:e], limit) for w, es in zip(windows, ends, strict=True) for e in es]
    assert intent_reasons_at(windows, ends, limit) == want
    assert intent_reasons_json_at(windows, [np.array(e) for e in ends], limit) == [orjson.dumps(r) for r in want]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 1, width=32), max_size=30),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_batch_bands_are_band_of(scores, medium, high):
    """The engine's bands of a batch (float32 scores against float64 thresholds, in any order) are ``band_of``'s."""
    thresholds = {"medium": medium, "high": high}
    values = np.array([*scores, medium, high], dtype=np.float32)  # and the thresholds themselves, rounded to float32
    assert bands_of(values, thresholds).tolist() == [band_of(v, thresholds) for v in values.tolist()]
