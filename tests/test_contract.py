"""The clickstream contract (docs/events.md): every rule with its exact reason, the validator's totality on
arbitrary input, round trips, the output records, and the malformed-record generator."""

from __future__ import annotations

import base64
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream import contract
from stream.contract import (
    EVENT_TYPES,
    MAX_TS_MS,
    MIN_TS_MS,
    Event,
    churn_record,
    dlq_record,
    intent_record,
    reason_field,
    validate,
)
from stream.traffic import badrecords

DROP = object()
OCT_1_2019_MS = 1_569_888_000_000
BASE: dict[str, Any] = {
    "event_id": "e-1",
    "user_id": "u-42",
    "type": "add_to_cart",
    "ts": OCT_1_2019_MS,
    "session_id": "s-9",
    "item_id": "i-77",
    "category": "electronics.smartphone",
    "price": 189.99,
    "quantity": 2,
    "device": "mobile",
    "schema": 1,
}
# Every field a reason can name (the bounded label set of reason_field).
REASON_FIELDS = {
    "record",
    "json",
    "schema",
    "event_id",
    "user_id",
    "key",
    "type",
    "ts",
    "price",
    "quantity",
    "session_id",
    "item_id",
    "category",
    "device",
}
OUT_OF_RANGE = "ts: out of range (epoch milliseconds between 2000 and 2100 expected)"
NOT_A_TIMESTAMP = "ts: not a timestamp (epoch milliseconds or ISO-8601 with a zone)"


def record(**changes: Any) -> tuple[bytes, bytes]:
    """(value, key) of BASE with ``changes`` (DROP removes a field); the key is the resulting user_id."""
    fields = dict(BASE)
    for name, value in changes.items():
        if value is DROP:
            fields.pop(name, None)
        else:
            fields[name] = value
    user_id = fields.get("user_id")
    key = user_id.encode() if isinstance(user_id, str) else b"u-42"
    return orjson.dumps(fields), key


def check(changes: dict[str, Any]) -> Event | str:
    value, key = record(**changes)
    return validate(value, key)


# ---- valid events -----------------------------------------------------------------------------------------

VALID_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # (id, changes to BASE, expected Event attributes)
    ("all fields", {}, {"price": 189.99, "quantity": 2, "device": "mobile"}),
    (
        "required only",
        {k: DROP for k in ("session_id", "item_id", "category", "price", "quantity", "device", "schema")},
        {"session_id": None, "item_id": None, "category": None, "price": None, "quantity": None, "device": None},
    ),
    ("null optional fields mean absent", {"session_id": None, "price": None, "quantity": None}, {"price": None}),
    ("schema defaults to 1", {"schema": DROP}, {"schema": 1}),
    ("unknown fields ignored", {"truth": {"will_buy": True}, "brand": "acme", "x": [1, 2]}, {}),
    ("integer price becomes float", {"price": 20}, {"price": 20.0}),
    ("price 0", {"price": 0}, {"price": 0.0}),
    ("price at the maximum", {"price": 10_000_000}, {"price": 1e7}),
    ("quantity 1", {"quantity": 1}, {"quantity": 1}),
    ("quantity at the maximum", {"quantity": 10_000}, {"quantity": 10_000}),
    ("event_id of 128 characters", {"event_id": "e" * 128}, {"event_id": "e" * 128}),
    ("user_id of 128 characters", {"user_id": "u" * 128}, {"user_id": "u" * 128}),
    ("session_id of 256 characters", {"session_id": "s" * 256}, {"session_id": "s" * 256}),
    ("category of 256 characters", {"category": "c" * 256}, {"category": "c" * 256}),
    ("empty optional text", {"device": ""}, {"device": ""}),
    ("non-ASCII user id", {"user_id": "Zoë-東京"}, {"user_id": "Zoë-東京"}),
    ("ts at the lower bound (2000-01-01)", {"ts": MIN_TS_MS}, {"ts": MIN_TS_MS}),
    ("ts just below the upper bound (2100-01-01)", {"ts": MAX_TS_MS - 1}, {"ts": MAX_TS_MS - 1}),
    ("ts as an integral float", {"ts": 1569888000123.0}, {"ts": 1569888000123}),
    ("ts ISO with Z", {"ts": "2019-10-01T00:00:00Z"}, {"ts": OCT_1_2019_MS}),
    ("ts ISO with offset", {"ts": "2019-10-01T02:00:00+02:00"}, {"ts": OCT_1_2019_MS}),
    ("ts ISO with milliseconds", {"ts": "2019-10-01T00:00:00.123+00:00"}, {"ts": OCT_1_2019_MS + 123}),
    ("ts ISO with a space", {"ts": "2019-10-01 00:00:05Z"}, {"ts": OCT_1_2019_MS + 5000}),
    ("ts ISO microseconds floor to ms", {"ts": "2019-10-01T00:00:00.000999Z"}, {"ts": OCT_1_2019_MS}),
] + [(f"type {t}", {"type": t}, {"type": t}) for t in EVENT_TYPES]


@pytest.mark.parametrize(("changes", "expected"), [c[1:] for c in VALID_CASES], ids=[c[0] for c in VALID_CASES])
def test_valid_event_is_accepted(changes, expected):
    event = check(changes)
    assert isinstance(event, Event), event
    for name, value in expected.items():
        assert getattr(event, name) == value, name
        assert type(getattr(event, name)) is type(value), name


def test_valid_event_has_the_values_of_the_record():
    event = check({})
    assert event == Event(
        "e-1", "u-42", "add_to_cart", OCT_1_2019_MS, "s-9", "i-77", "electronics.smartphone", 189.99, 2, "mobile", 1
    )
    assert event.type_code == EVENT_TYPES.index("add_to_cart")


def test_event_type_codes_are_append_only():
    # The index is the type's code in state and model inputs: reordering would silently corrupt both.
    assert EVENT_TYPES == (
        "page_view",
        "search",
        "product_view",
        "add_to_cart",
        "remove_from_cart",
        "wishlist_add",
        "checkout_start",
        "purchase",
    )


# ---- every rule, with its exact reason ---------------------------------------------------------------------

TEXT_FIELDS = ("session_id", "item_id", "category", "device")
INVALID_CASES: list[tuple[str, dict[str, Any], str]] = [
    # schema (checked first: another version may mean other fields)
    ("schema 2", {"schema": 2}, "schema: unsupported version 2 (supported: [1])"),
    ("schema 0", {"schema": 0}, "schema: unsupported version 0 (supported: [1])"),
    ("schema string", {"schema": "1"}, "schema: expected an integer, got a string"),
    ("schema float", {"schema": 1.0}, "schema: expected an integer, got a number"),
    ("schema boolean", {"schema": True}, "schema: expected an integer, got a boolean"),
    ("schema null", {"schema": None}, "schema: expected an integer, got null"),
    # event_id
    ("event_id missing", {"event_id": DROP}, "event_id: missing"),
    ("event_id null", {"event_id": None}, "event_id: null"),
    ("event_id number", {"event_id": 7}, "event_id: expected a string, got a number"),
    ("event_id array", {"event_id": ["e"]}, "event_id: expected a string, got an array"),
    ("event_id object", {"event_id": {}}, "event_id: expected a string, got an object"),
    ("event_id boolean", {"event_id": False}, "event_id: expected a string, got a boolean"),
    ("event_id empty", {"event_id": ""}, "event_id: empty"),
    ("event_id 129 characters", {"event_id": "e" * 129}, "event_id: longer than 128 characters"),
    # user_id
    ("user_id missing", {"user_id": DROP}, "user_id: missing"),
    ("user_id null", {"user_id": None}, "user_id: null"),
    ("user_id number", {"user_id": 541312140}, "user_id: expected a string, got a number"),
    ("user_id empty", {"user_id": ""}, "user_id: empty"),
    ("user_id 129 characters", {"user_id": "u" * 129}, "user_id: longer than 128 characters"),
    # type
    ("type missing", {"type": DROP}, "type: missing"),
    ("type null", {"type": None}, "type: missing"),
    ("type number", {"type": 3}, "type: expected a string, got a number"),
    ("type unknown", {"type": "click"}, "type: unknown event type 'click'"),
    ("type wrong case", {"type": "Purchase"}, "type: unknown event type 'Purchase'"),
    ("type REES46 name", {"type": "view"}, "type: unknown event type 'view'"),
    ("type unknown, long", {"type": "x" * 100}, f"type: unknown event type {'x' * 40!r}"),
    # ts
    ("ts missing", {"ts": DROP}, "ts: missing"),
    ("ts null", {"ts": None}, "ts: missing"),
    ("ts boolean", {"ts": True}, "ts: not a timestamp, got a boolean"),
    ("ts array", {"ts": [OCT_1_2019_MS]}, "ts: not a timestamp, got an array"),
    ("ts object", {"ts": {"ms": OCT_1_2019_MS}}, "ts: not a timestamp, got an object"),
    ("ts in seconds", {"ts": OCT_1_2019_MS // 1000}, OUT_OF_RANGE),
    ("ts in microseconds", {"ts": OCT_1_2019_MS * 1000}, OUT_OF_RANGE),
    ("ts before 2000", {"ts": MIN_TS_MS - 1}, OUT_OF_RANGE),
    ("ts at 2100", {"ts": MAX_TS_MS}, OUT_OF_RANGE),
    ("ts negative", {"ts": -1}, OUT_OF_RANGE),
    ("ts fractional milliseconds", {"ts": OCT_1_2019_MS + 0.5}, "ts: not a whole number of epoch milliseconds"),
    ("ts huge float", {"ts": 1e300}, OUT_OF_RANGE),
    ("ts ISO without zone", {"ts": "2019-10-01T00:00:00"}, "ts: ISO-8601 timestamp without a time zone"),
    ("ts ISO date only", {"ts": "2019-10-01"}, "ts: ISO-8601 timestamp without a time zone"),
    ("ts ISO before 2000", {"ts": "1999-12-31T23:59:59.999Z"}, OUT_OF_RANGE),
    ("ts ISO at 2100", {"ts": "2100-01-01T00:00:00Z"}, OUT_OF_RANGE),
    ("ts ISO year 1", {"ts": "0001-01-01T00:00:00+01:00"}, OUT_OF_RANGE),
    ("ts REES46 text", {"ts": "2019-10-01 00:00:00 UTC"}, NOT_A_TIMESTAMP),
    ("ts garbage text", {"ts": "yesterday"}, NOT_A_TIMESTAMP),
    ("ts empty text", {"ts": ""}, NOT_A_TIMESTAMP),
    ("ts digits as text", {"ts": "1569888000000"}, NOT_A_TIMESTAMP),
    # price
    ("price string", {"price": "9.99"}, "price: expected a number, got a string"),
    ("price boolean", {"price": True}, "price: expected a number, got a boolean"),
    ("price array", {"price": [1]}, "price: expected a number, got an array"),
    ("price negative", {"price": -0.01}, "price: must be between 0 and 10000000"),
    ("price above the maximum", {"price": 10_000_000.01}, "price: must be between 0 and 10000000"),
    ("price huge", {"price": 1e300}, "price: must be between 0 and 10000000"),
    ("price huge integer", {"price": 2**64 - 1}, "price: must be between 0 and 10000000"),
    # quantity
    ("quantity float", {"quantity": 1.0}, "quantity: expected an integer, got a number"),
    ("quantity string", {"quantity": "2"}, "quantity: expected an integer, got a string"),
    ("quantity boolean", {"quantity": True}, "quantity: expected an integer, got a boolean"),
    ("quantity 0", {"quantity": 0}, "quantity: must be between 1 and 10000"),
    ("quantity negative", {"quantity": -3}, "quantity: must be between 1 and 10000"),
    ("quantity above the maximum", {"quantity": 10_001}, "quantity: must be between 1 and 10000"),
    ("quantity huge", {"quantity": 2**64 - 1}, "quantity: must be between 1 and 10000"),
]
for _name in TEXT_FIELDS:
    INVALID_CASES += [
        (f"{_name} number", {_name: 5}, f"{_name}: expected a string, got a number"),
        (f"{_name} boolean", {_name: True}, f"{_name}: expected a string, got a boolean"),
        (f"{_name} object", {_name: {"a": 1}}, f"{_name}: expected a string, got an object"),
        (f"{_name} 257 characters", {_name: "t" * 257}, f"{_name}: longer than 256 characters"),
    ]


@pytest.mark.parametrize(("changes", "reason"), [c[1:] for c in INVALID_CASES], ids=[c[0] for c in INVALID_CASES])
def test_invalid_event_is_rejected_with_its_exact_reason(changes, reason):
    assert check(changes) == reason


def test_first_broken_rule_in_check_order_is_reported():
    # schema, event_id, user_id, key, type, ts, price, quantity, then the optional texts
    everything_wrong = {"event_id": "", "user_id": "", "type": "x", "ts": 1, "price": -1, "quantity": 0, "device": 1}
    assert check({**everything_wrong, "schema": 2}).startswith("schema:")
    assert check(everything_wrong) == "event_id: empty"
    assert check({**everything_wrong, "event_id": "e"}) == "user_id: empty"
    value, _ = record(**{**everything_wrong, "event_id": "e", "user_id": "u"})
    assert validate(value, b"other") == "key: does not match user_id"
    assert validate(value, b"u") == "type: unknown event type 'x'"
    assert check({"ts": 1, "price": -1, "quantity": 0, "device": 1}) == OUT_OF_RANGE
    assert check({"price": -1, "quantity": 0, "device": 1}).startswith("price:")
    assert check({"quantity": 0, "device": 1}).startswith("quantity:")


# ---- the record: value, size, JSON, key -------------------------------------------------------------------


def test_tombstone_is_rejected():
    assert validate(None, b"u-42") == "record: no value (tombstone)"


def test_record_over_the_size_limit_is_rejected_before_parsing():
    value, key = record(padding="x" * 70_000)
    assert validate(value, key) == f"record: {len(value)} bytes exceeds the 65536-byte limit"
    assert validate(b"{" * 70_000, key) == "record: 70000 bytes exceeds the 65536-byte limit"


def test_size_limit_is_a_parameter_and_inclusive():
    value, key = record()
    assert isinstance(validate(value, key, max_bytes=len(value)), Event)
    assert (
        validate(value, key, max_bytes=len(value) - 1)
        == f"record: {len(value)} bytes exceeds the {len(value) - 1}-byte limit"
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"[]", "json: expected an object, got an array"),
        (b'"event"', "json: expected an object, got a string"),
        (b"42", "json: expected an object, got a number"),
        (b"4.2", "json: expected an object, got a number"),
        (b"true", "json: expected an object, got a boolean"),
        (b"null", "json: expected an object, got null"),
    ],
)
def test_json_that_is_not_an_object_is_rejected(value, reason):
    assert validate(value, b"u-42") == reason


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"{",
        b'{"event_id": "e-1",',
        b"{'event_id': 'e-1'}",
        b'{"price": NaN}',
        b'{"price": Infinity}',
        b'{"price": -Infinity}',
        b'{"price": 1e400}',
        b'{"a": 1} trailing',
        b'{"category": "\xff\xfe"}',
        b'{"category": "\xed\xa0\x80"}',  # a lone surrogate
        b'{"x": ' + b"[" * 2000 + b"]" * 2000 + b"}",
        b"\x00\x01\x02",
    ],
)
def test_broken_json_is_rejected_as_json(value):
    reason = validate(value, b"u-42")
    assert isinstance(reason, str) and reason.startswith("json: "), reason


def test_nesting_below_the_parser_limit_is_a_field_type_error():
    value, key = record(category="@")
    nested = value.replace(b'"@"', b"[" * 1000 + b"]" * 1000)
    assert validate(nested, key) == "category: expected a string, got an array"


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (None, "key: missing (must be the user_id, UTF-8)"),
        (b"", "key: does not match user_id"),
        (b"u-43", "key: does not match user_id"),
        (b"U-42", "key: does not match user_id"),
        (b"u-42 ", "key: does not match user_id"),
        (b"u-42\xff", "key: not valid UTF-8"),
    ],
)
def test_key_must_be_the_user_id(key, reason):
    value, _ = record()
    assert validate(value, key) == reason


def test_key_check_can_be_turned_off():
    value, _ = record()
    assert isinstance(validate(value, None, check_key=False), Event)
    assert isinstance(validate(value, b"someone else", check_key=False), Event)


def test_key_is_the_utf8_of_a_non_ascii_user_id():
    value, _ = record(user_id="Zoë")
    assert isinstance(validate(value, "Zoë".encode()), Event)
    assert validate(value, "Zoë".encode("latin-1")) == "key: not valid UTF-8"


def test_max_ts_rejects_event_times_in_the_future():
    value, key = record(ts=OCT_1_2019_MS + 1)
    assert isinstance(validate(value, key, max_ts_ms=OCT_1_2019_MS + 1), Event)
    assert validate(value, key, max_ts_ms=OCT_1_2019_MS) == "ts: too far in the future"
    iso, _ = record(ts="2019-10-01T00:00:00.001Z")
    assert validate(iso, key, max_ts_ms=OCT_1_2019_MS) == "ts: too far in the future"


@pytest.mark.parametrize(
    ("reason", "field"),
    [("ts: not a timestamp", "ts"), ("json: bad: very bad", "json"), ("record: no value (tombstone)", "record")],
)
def test_reason_field_names_the_field(reason, field):
    assert reason_field(reason) == field


# ---- the validator is total: any input gives an Event or a reason -----------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=300)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
# Per field: values around its rules (valid, borderline, wrong type), so generated objects often get deep.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "event_id": st.text(max_size=130) | JSON_SCALARS,
    "user_id": st.text(max_size=130) | JSON_SCALARS,
    "type": st.sampled_from((*EVENT_TYPES, "view", "")) | JSON_SCALARS,
    "ts": st.integers(MIN_TS_MS - 10, MAX_TS_MS + 10)
    | st.floats(MIN_TS_MS - 10, MAX_TS_MS + 10)
    | st.datetimes(timezones=st.just(UTC) | st.none()).map(datetime.isoformat)
    | JSON_SCALARS,
    "price": st.floats(-1, 1e7 + 1, allow_nan=False) | st.integers(-1, 10**7 + 1) | JSON_SCALARS,
    "quantity": st.integers(-1, 10_001) | JSON_SCALARS,
    "schema": st.sampled_from((1, 2, 1.0, True)) | JSON_SCALARS,
    **{name: st.text(max_size=260) | JSON_SCALARS for name in TEXT_FIELDS},
}


def assert_event_or_reason(result: Event | str) -> None:
    assert isinstance(result, Event | str)
    if isinstance(result, str):
        assert reason_field(result) in REASON_FIELDS, result
        assert "unexpected validation error" not in result, result


EVENTS = st.builds(
    Event,
    event_id=st.text(min_size=1, max_size=128),
    user_id=st.text(min_size=1, max_size=128),
    type=st.sampled_from(EVENT_TYPES),
    ts=st.integers(MIN_TS_MS, MAX_TS_MS - 1),
    session_id=st.none() | st.text(max_size=256),
    item_id=st.none() | st.text(max_size=256),
    category=st.none() | st.text(max_size=256),
    price=st.none() | st.floats(0, 1e7),
    quantity=st.none() | st.integers(1, 10_000),
    device=st.none() | st.text(max_size=256),
)


@st.composite
def contract_like_records(draw: st.DrawFn) -> tuple[dict[str, Any], bytes | None]:
    """A valid event with a few fields replaced by values around their rules, or dropped (so that both the
    fast path and every precise check are reached often), and a key that mostly matches."""
    obj = draw(EVENTS).to_dict()
    for name in draw(st.sets(st.sampled_from(sorted(FIELD_VALUES)), max_size=3)):
        if draw(st.integers(0, 4)) == 0:
            del obj[name]
        else:
            obj[name] = draw(FIELD_VALUES[name])
    obj = {k: v for k, v in obj.items() if v is not None or draw(st.booleans())}
    user_id = obj.get("user_id")
    matching = user_id.encode() if isinstance(user_id, str) else None
    return obj, draw(st.sampled_from((matching, matching, None)) | st.binary(max_size=8))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000), st.none() | st.binary(max_size=20))
def test_any_bytes_give_an_event_or_a_reason(value, key):
    assert_event_or_reason(validate(value, key))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(JSON_VALUES)
def test_any_json_value_gives_an_event_or_a_reason(value):
    assert_event_or_reason(validate(orjson.dumps(value), b"u-42"))


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(contract_like_records(), st.booleans(), st.none() | st.integers(MIN_TS_MS, MAX_TS_MS))
def test_contract_like_objects_give_an_event_or_a_reason_and_events_round_trip(record_and_key, check_key, max_ts):
    obj, key = record_and_key
    result = validate(orjson.dumps(obj), key, check_key=check_key, max_ts_ms=max_ts)
    assert_event_or_reason(result)
    if isinstance(result, Event):
        assert validate(result.to_json(), result.user_id.encode(), max_ts_ms=max_ts) == result


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(contract_like_records(), st.booleans(), st.none() | st.integers(MIN_TS_MS, MAX_TS_MS))
def test_fast_path_agrees_with_the_full_checks(record_and_key, check_key, max_ts):
    # The fast path exists for speed only: whatever it accepts, the precise checks must accept identically.
    obj, key = record_and_key
    fast = contract._fast_path(obj, key, check_key, max_ts)
    if fast is not None:
        assert contract._validate_obj(obj, key, check_key, max_ts) == fast


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.none() | st.binary(max_size=300), st.none() | st.binary(max_size=20))
        | contract_like_records().map(lambda record_and_key: (orjson.dumps(record_and_key[0]), record_and_key[1])),
        max_size=12,
    ),
    st.integers(0, 400),
    st.none() | st.integers(MIN_TS_MS, MAX_TS_MS),
)
def test_a_batch_validates_as_each_record_alone(records, max_bytes, max_ts):
    """The engine validates a batch at once (``validate_many``): the same Event or reason as ``validate`` of each
    record, whatever the bytes, keys, size limit and time limit."""
    alone = [validate(value, key, max_bytes=max_bytes, max_ts_ms=max_ts) for value, key in records]
    assert contract.validate_many(records, max_bytes=max_bytes, max_ts_ms=max_ts) == alone


def test_a_batch_of_every_kind_of_bad_record_validates_as_each_alone():
    records = [(bad.value, bad.key) for bad in badrecords.one_of_each()] + [(None, None), (b"x" * 70_000, b"u")]
    alone = [validate(value, key) for value, key in records]
    assert contract.validate_many(records) == alone
    assert all(isinstance(r, str) for r in alone)


def test_fast_path_rejects_boolean_and_float_schema():
    # True == 1 and 1.0 == 1 in Python; the fast path once let both through.
    for schema in (True, 1.0):
        value, key = record(schema=schema)
        assert isinstance(validate(value, key), str)


def test_iso_timestamps_with_milliseconds_are_exact():
    # A float conversion (timestamp() * 1000) once lost a millisecond for about 1 value in 160.
    rng = random.Random(0)
    for ms in [MIN_TS_MS, MAX_TS_MS - 1, 2173901119535] + [rng.randrange(MIN_TS_MS, MAX_TS_MS) for _ in range(5000)]:
        iso = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).isoformat()
        value, key = record(ts=iso)
        assert validate(value, key).ts == ms, iso


# ---- round trip ------------------------------------------------------------------------------------------


@settings(max_examples=300)
@given(EVENTS)
def test_event_to_json_validates_back_to_the_same_event(event):
    assert validate(event.to_json(), event.user_id.encode()) == event


def test_to_json_omits_absent_optional_fields():
    event = Event("e", "u", "purchase", OCT_1_2019_MS)
    assert orjson.loads(event.to_json()) == {
        "event_id": "e",
        "user_id": "u",
        "type": "purchase",
        "ts": OCT_1_2019_MS,
        "schema": 1,
    }


# ---- output records --------------------------------------------------------------------------------------


def test_dead_letter_record_keeps_the_original_bytes_and_where_they_came_from():
    raw = dlq_record("ts: missing", b"u-42", b'{"bad": \xff}', "clickstream", 3, 1234, 1_700_000_000_000)
    out = orjson.loads(raw)
    assert out == {
        "schema": 1,
        "reason": "ts: missing",
        "key_b64": base64.b64encode(b"u-42").decode(),
        "value_b64": base64.b64encode(b'{"bad": \xff}').decode(),
        "source": {"topic": "clickstream", "partition": 3, "offset": 1234},
        "rejected_at": 1_700_000_000_000,
    }
    assert base64.b64decode(out["value_b64"]) == b'{"bad": \xff}'


def test_dead_letter_record_of_a_keyless_tombstone():
    out = orjson.loads(dlq_record("record: no value (tombstone)", None, None, "clickstream", 0, 7, 1))
    assert out["key_b64"] is None and out["value_b64"] is None and out["schema"] == 1


def test_intent_record_fields_rounding_and_latency():
    out = orjson.loads(
        intent_record(
            user_id="u-42",
            score=0.8123456789,
            band="high",
            order_value_if_purchase=123.456,
            model_name="gru",
            model_version="2024-05-01T12-00-00-abc123",
            event_id="e-1",
            event_ts=OCT_1_2019_MS,
            produced_at_ms=1_700_000_000_000,
            scored_at_ms=1_700_000_000_042,
            reasons=["added to cart", "3 product views in 5 min"],
        )
    )
    assert out == {
        "schema": 1,
        "user_id": "u-42",
        "score": 0.81235,
        "band": "high",
        "expected_order_value": 100.29,  # 0.8123456789 x 123.456: the expectation
        "order_value_if_purchase": 123.46,
        "model": {"name": "gru", "version": "2024-05-01T12-00-00-abc123"},
        "event_id": "e-1",
        "event_ts": OCT_1_2019_MS,
        "input_ts": 1_700_000_000_000,
        "scored_at": 1_700_000_000_042,
        "latency_ms": 42,
        "reasons": ["added to cart", "3 product views in 5 min"],
        "suggestions": None,
    }


INTENT_BASE: dict[str, Any] = {
    "user_id": "u",
    "score": 0.1,
    "band": "low",
    "order_value_if_purchase": None,
    "model_name": "cnn",
    "model_version": "v1",
    "event_id": "e",
    "event_ts": OCT_1_2019_MS,
    "produced_at_ms": None,
    "scored_at_ms": 5,
    "reasons": [],
}


def minimal_intent(**fields: Any) -> dict[str, Any]:
    """An intent event without produce time, order value or reasons, ``fields`` added, as a consumer reads it."""
    out: dict[str, Any] = orjson.loads(intent_record(**(INTENT_BASE | fields)))
    return out


def test_intent_record_without_produce_time_or_order_value():
    out = minimal_intent()
    assert out["latency_ms"] is None and out["input_ts"] is None and out["expected_order_value"] is None
    assert out["order_value_if_purchase"] is None
    assert out["schema"] == 1


def test_intent_record_suggestions_are_objects_in_order():
    out = minimal_intent(suggestions=[("sku-2", 0.75, "viewed together with sku-1"), ("sku-9", 0.0, "popular")])
    assert out["suggestions"] == [
        {"item_id": "sku-2", "score": 0.75, "reason": "viewed together with sku-1"},
        {"item_id": "sku-9", "score": 0.0, "reason": "popular"},
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(max_size=12),  # quotes, backslashes, control characters, any unicode
            st.floats(min_value=0, max_value=1e6) | st.sampled_from([0.0, 1e-7, 1.5e-5, 0.1 + 0.2, 123456.123456]),
            st.text(max_size=30),
        ),
        max_size=6,
    )
)
def test_pasted_suggestions_are_what_intent_record_writes_for_the_triples(triples: list[tuple[str, float, str]]):
    """The engine pastes each suggestion's JSON from pieces (models.items.suggest_json): byte for byte the record
    that intent_record writes from (item_id, score, reason) triples."""
    scores = contract.float_texts([sc for _, sc, _ in triples])
    text = b"".join(
        contract.suggestion_head(i, at == 0) + score + contract.suggestion_tail(r, at == len(triples) - 1)
        for at, ((i, _, r), score) in enumerate(zip(triples, scores, strict=True))
    )
    pasted = intent_record(**(INTENT_BASE | {"suggestions": orjson.Fragment(text or b"[]")}))
    assert pasted == intent_record(**(INTENT_BASE | {"suggestions": triples}))


_text = st.text(max_size=12)  # quotes, backslashes, control characters, any unicode
_number = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1e-7, 0.1 + 0.2, 123456.123456])
_suggestions = st.none() | st.lists(st.tuples(_text, st.floats(min_value=0, max_value=1e6), _text), max_size=3)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            _text,  # user_id
            _text,  # event_id
            st.integers(min_value=0, max_value=2**62),  # event_ts
            st.none() | st.integers(min_value=0, max_value=2**62),  # produced_at_ms
            st.sampled_from(["low", "medium", "high"]),
            st.tuples(_number, st.none() | _number, st.none() | _number),  # rounded
            st.lists(_text, max_size=3),  # reasons
            _suggestions,
            st.booleans(),  # suggestions as a pasted Fragment
        ),
        max_size=8,
    ),
    _text,
    st.integers(min_value=0, max_value=2**62),
)
def test_batch_intent_records_are_what_intent_record_writes(rows: list[tuple], model_version: str, scored_at: int):
    """The engine writes a batch's intent events with ``intent_records`` (a template): byte for byte the records of
    ``intent_record``, for any ids, missing times and values, non-finite numbers, reasons and suggestions."""

    def suggestions(row: tuple) -> Any:
        triples, pasted = row[7], row[8]
        if triples is None or not pasted:
            return triples
        return orjson.Fragment(orjson.dumps([{"item_id": i, "score": sc, "reason": r} for i, sc, r in triples]))

    batch = contract.intent_records(
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        [r[4] for r in rows],
        [r[5] for r in rows],
        [orjson.dumps(r[6]) for r in rows],
        [suggestions(r) for r in rows],
        model_name="gru",
        model_version=model_version,
        scored_at_ms=scored_at,
    )
    one_by_one = [
        intent_record(
            user_id=r[0],
            score=0.5,  # unread: ``rounded`` is given
            band=r[4],
            order_value_if_purchase=None,
            model_name="gru",
            model_version=model_version,
            event_id=r[1],
            event_ts=r[2],
            produced_at_ms=r[3],
            scored_at_ms=scored_at,
            reasons=r[6],
            suggestions=suggestions(r),
            rounded=r[5],
        )
        for r in rows
    ]
    assert batch == one_by_one


def test_churn_record_fields():
    out = orjson.loads(
        churn_record(
            user_id="u-42",
            risk=0.912345678,
            last_seen_ts=OCT_1_2019_MS,
            session_id="s-9",
            model_name="hybrid",
            model_version="v3",
            alerted_at_ms=1_700_000_000_000,
            watermark_ts=OCT_1_2019_MS + 1_800_000,
            reasons=["session closed after 2 views"],
        )
    )
    assert out == {
        "schema": 1,
        "user_id": "u-42",
        "risk": 0.91235,
        "last_seen": OCT_1_2019_MS,
        "session_id": "s-9",
        "model": {"name": "hybrid", "version": "v3"},
        "watermark": OCT_1_2019_MS + 1_800_000,
        "alerted_at": 1_700_000_000_000,
        "reasons": ["session closed after 2 views"],
    }


# ---- malformed records (stream/traffic/badrecords.py) ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_every_kind_of_bad_record_is_rejected_for_the_expected_field(seed):
    for key, value, expected, kind in badrecords.one_of_each(seed):
        reason = validate(value, key)
        assert isinstance(reason, str), (kind, value[:200])
        assert reason.startswith(expected), (kind, reason)


def test_bad_records_cover_the_required_kinds():
    kinds = set(badrecords.KINDS)
    required = {
        "broken_json",
        "non_object_json",
        "nan_literal",
        "infinity_literal",
        "number_overflows_double",
        "deeply_nested_json",
        "invalid_utf8_value",
        "oversized_record",
        "key_mismatch",
        "key_missing",
        "key_not_utf8",
        "unknown_type",
        "ts_in_seconds",
        "ts_far_future",
        "ts_far_past",
        "ts_iso_without_zone",
        "negative_price",
        "quantity_zero",
        "unsupported_schema",
        *(f"missing_{f}" for f in ("event_id", "user_id", "type", "ts")),
        *(f"wrong_type_{f}" for f in BASE),
        *(f"oversized_{f}" for f in ("event_id", "user_id", *TEXT_FIELDS)),
    }
    assert required <= kinds, required - kinds
    expected_fields = {reason_field(expected) for expected, _ in badrecords.KINDS.values()}
    assert expected_fields == REASON_FIELDS


def test_bad_records_are_deterministic():
    assert badrecords.generate(300, seed=5) == badrecords.generate(300, seed=5)
    assert badrecords.generate(300, seed=5) != badrecords.generate(300, seed=6)
    assert badrecords.one_of_each(3) == badrecords.one_of_each(3)


def test_bad_record_stream_draws_many_kinds_and_all_are_rejected():
    records = badrecords.generate(2000, seed=11)
    assert len({r.kind for r in records}) == len(badrecords.KINDS)
    for r in records:
        reason = validate(r.value, r.key)
        assert isinstance(reason, str) and reason.startswith(r.expected), (r.kind, reason)


def test_bad_records_start_from_a_valid_event():
    rng = random.Random(0)
    for _ in range(100):
        fields = badrecords.valid_fields(rng)
        assert isinstance(validate(orjson.dumps(fields), fields["user_id"].encode()), Event)
