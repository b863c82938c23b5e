"""Malformed clickstream records, made deterministically, for tests, replay (``--bad-fraction``) and fuzzing.

Each record is a ``BadRecord(key, value, expected, kind)``: the Kafka key and value bytes, the prefix the
rejection reason of ``stream.contract.validate`` starts with (``"ts:"``, ``"json:"``, ...), and the name
of the kind that made it. Every kind starts from a valid event and breaks exactly one thing, so the
validator's reason names that one thing whatever order it checks fields in.

    for key, value, expected, kind in one_of_each(seed=1): ...
    records = generate(1000, seed=7)          # kinds drawn at random, same list for the same seed
    stream = iter_bad_records(seed=7)         # endless, for replay
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import orjson

from stream.contract import (
    DEFAULT_MAX_RECORD_BYTES,
    EVENT_TYPES,
    MAX_ID_CHARS,
    MAX_PRICE,
    MAX_QUANTITY,
    MAX_TEXT_CHARS,
    MAX_TS_MS,
    MIN_TS_MS,
)


class BadRecord(NamedTuple):
    key: bytes | None
    value: bytes
    expected: str  # prefix of the rejection reason, e.g. "ts:"
    kind: str


_DROP = object()  # a field value that means "leave the field out"
_OCT_2019_MS = 1_569_888_000_000
_TEXT_FIELDS = ("session_id", "item_id", "category", "device")


def valid_fields(rng: random.Random) -> dict[str, Any]:
    """A valid event with every optional field set (so any field can be broken)."""
    user_id = f"u{rng.randrange(1_000_000)}"
    return {
        "event_id": f"bad-{rng.getrandbits(64):016x}",
        "user_id": user_id,
        "type": rng.choice(EVENT_TYPES),
        "ts": _OCT_2019_MS + rng.randrange(30 * 86_400_000),
        "session_id": f"s-{rng.getrandbits(32):08x}",
        "item_id": f"i{rng.randrange(100_000)}",
        "category": rng.choice(("electronics.smartphone", "apparel.shoes", "kids.toys")),
        "price": round(rng.uniform(1, 2000), 2),
        "quantity": rng.randint(1, 5),
        "device": rng.choice(("mobile", "desktop", "tablet")),
        "schema": 1,
    }


def _mutated(rng: random.Random, **changes: Any) -> tuple[bytes, bytes]:
    """(key, value) of a valid event with ``changes`` applied; the key stays the original user_id."""
    fields = valid_fields(rng)
    key = fields["user_id"].encode()
    for name, value in changes.items():
        if value is _DROP:
            del fields[name]
        else:
            fields[name] = value
    return key, orjson.dumps(fields)


def _json_with_raw(rng: random.Random, field: str, raw: bytes) -> tuple[bytes, bytes]:
    """A valid event whose ``field`` holds ``raw`` JSON text verbatim (for text orjson would not write)."""
    fields = valid_fields(rng)
    marker = "@@RAW@@"
    fields[field] = marker
    return fields["user_id"].encode(), orjson.dumps(fields).replace(f'"{marker}"'.encode(), raw)


# ---- the kinds: name -> (expected reason prefix, maker(rng) -> (key, value)) ----------------------------

Maker = Callable[[random.Random], tuple[bytes | None, bytes]]
KINDS: dict[str, tuple[str, Maker]] = {}


def _kind(name: str, expected: str) -> Callable[[Maker], Maker]:
    def register(maker: Maker) -> Maker:
        KINDS[name] = (expected, maker)
        return maker

    return register


def _valid_record(rng: random.Random) -> tuple[bytes, bytes]:
    return _mutated(rng)


# -- not JSON, or not a JSON object
@_kind("broken_json", "json:")
def _broken_json(rng: random.Random) -> tuple[bytes, bytes]:
    key, value = _valid_record(rng)
    return key, value[: rng.randrange(1, len(value) - 1)]  # any strict prefix of an object is invalid


@_kind("trailing_garbage", "json:")
def _trailing_garbage(rng: random.Random) -> tuple[bytes, bytes]:
    key, value = _valid_record(rng)
    return key, value + rng.choice((b"}", b" x", b",{}", b"\n{}"))


@_kind("empty_value", "json:")
def _empty_value(rng: random.Random) -> tuple[bytes, bytes]:
    return _valid_record(rng)[0], b""


@_kind("not_json_text", "json:")
def _not_json_text(rng: random.Random) -> tuple[bytes, bytes]:
    key = _valid_record(rng)[0]
    return key, rng.choice((b"hello", b"user=1&type=view", b"<event/>", b"{'user_id': 'u1'}", b"{user_id: 1}"))


@_kind("non_object_json", "json:")
def _non_object_json(rng: random.Random) -> tuple[bytes, bytes]:
    key, value = _valid_record(rng)
    return key, rng.choice((b"[" + value + b"]", b'"u1"', b"42", b"1.5", b"null", b"true", b"[]"))


@_kind("nan_literal", "json:")
def _nan_literal(rng: random.Random) -> tuple[bytes, bytes]:
    return _json_with_raw(rng, rng.choice(("price", "ts", "quantity")), b"NaN")


@_kind("infinity_literal", "json:")
def _infinity_literal(rng: random.Random) -> tuple[bytes, bytes]:
    return _json_with_raw(rng, rng.choice(("price", "ts")), rng.choice((b"Infinity", b"-Infinity")))


@_kind("number_overflows_double", "json:")
def _number_overflows_double(rng: random.Random) -> tuple[bytes, bytes]:
    return _json_with_raw(rng, rng.choice(("price", "ts", "quantity")), rng.choice((b"1e400", b"-1e999")))


@_kind("deeply_nested_json", "json:")
def _deeply_nested_json(rng: random.Random) -> tuple[bytes, bytes]:
    depth = rng.randint(1100, 5000)  # past the parser's depth limit (1024)
    return _json_with_raw(rng, rng.choice(("category", "extra")), b"[" * depth + b"]" * depth)


@_kind("invalid_utf8_value", "json:")
def _invalid_utf8_value(rng: random.Random) -> tuple[bytes, bytes]:
    key, value = _valid_record(rng)
    junk = rng.choice((b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"))  # bad bytes, lone surrogate
    opening_quote = value.index(b'"category":') + len(b'"category":')
    at = value.index(b'"', opening_quote + 1)  # inside the category string, just before its closing quote
    return key, value[:at] + junk + value[at:]


@_kind("oversized_record", "record:")
def _oversized_record(rng: random.Random) -> tuple[bytes, bytes]:
    return _mutated(rng, padding="x" * (DEFAULT_MAX_RECORD_BYTES + rng.randrange(1, 4096)))


# -- the record key
@_kind("key_mismatch", "key:")
def _key_mismatch(rng: random.Random) -> tuple[bytes, bytes]:
    key, value = _valid_record(rng)
    return key + b"x", value


@_kind("key_missing", "key:")
def _key_missing(rng: random.Random) -> tuple[None, bytes]:
    return None, _valid_record(rng)[1]


@_kind("key_not_utf8", "key:")
def _key_not_utf8(rng: random.Random) -> tuple[bytes, bytes]:
    key, value = _valid_record(rng)
    return key + rng.choice((b"\xff", b"\xc3", b"\xed\xa0\x80")), value


# -- required fields
for _field in ("event_id", "user_id", "type", "ts"):

    @_kind(f"missing_{_field}", f"{_field}:")
    def _missing(rng: random.Random, _field: str = _field) -> tuple[bytes, bytes]:
        return _mutated(rng, **{_field: _DROP})

    @_kind(f"null_{_field}", f"{_field}:")
    def _null(rng: random.Random, _field: str = _field) -> tuple[bytes, bytes]:
        return _mutated(rng, **{_field: None})


for _field in ("event_id", "user_id"):

    @_kind(f"empty_{_field}", f"{_field}:")
    def _empty(rng: random.Random, _field: str = _field) -> tuple[bytes, bytes]:
        return _mutated(rng, **{_field: ""})

    @_kind(f"oversized_{_field}", f"{_field}:")
    def _long_id(rng: random.Random, _field: str = _field) -> tuple[bytes, bytes]:
        return _mutated(rng, **{_field: "i" * rng.randint(MAX_ID_CHARS + 1, 4 * MAX_ID_CHARS)})


for _field in _TEXT_FIELDS:

    @_kind(f"oversized_{_field}", f"{_field}:")
    def _long_text(rng: random.Random, _field: str = _field) -> tuple[bytes, bytes]:
        return _mutated(rng, **{_field: "t" * rng.randint(MAX_TEXT_CHARS + 1, 8 * MAX_TEXT_CHARS)})


# -- wrong JSON types, one field at a time (None only where null is not the same as absent)
_WRONG_TYPES: dict[str, tuple[Any, ...]] = {
    "event_id": (12345, 1.5, True, [], {}, ["e1"]),
    "user_id": (541312140, 2.0, False, [], {"id": "u1"}),
    "type": (3, 1.0, True, [], {}, ["purchase"]),
    "ts": (True, [], {}, [1569888000000], {"ms": 1569888000000}),
    "session_id": (7, 1.5, True, [], {}),
    "item_id": (44600062, 2.5, False, ["i1"], {}),
    "category": (2103807459595387724, 0.5, True, [], {"code": "a.b"}),
    "device": (1, 1.0, True, [], {}),
    "price": ("12.50", True, [], {}, [9.99]),
    "quantity": (1.5, 2.0, "2", True, [], {}),
    "schema": ("1", 1.0, True, None, [], {}),
}
for _field, _values in _WRONG_TYPES.items():

    @_kind(f"wrong_type_{_field}", f"{_field}:")
    def _wrong_type(
        rng: random.Random, _field: str = _field, _values: tuple[Any, ...] = _values
    ) -> tuple[bytes, bytes]:
        return _mutated(rng, **{_field: rng.choice(_values)})


# -- values of the right type that break a rule
@_kind("unknown_type", "type:")
def _unknown_type(rng: random.Random) -> tuple[bytes, bytes]:
    return _mutated(rng, type=rng.choice(("click", "view", "cart", "PURCHASE", "add-to-cart", "", "checkout ")))


@_kind("ts_in_seconds", "ts:")
def _ts_in_seconds(rng: random.Random) -> tuple[bytes, bytes]:
    return _mutated(rng, ts=(_OCT_2019_MS + rng.randrange(86_400_000)) // 1000)


@_kind("ts_far_future", "ts:")
def _ts_far_future(rng: random.Random) -> tuple[bytes, bytes]:
    return _mutated(rng, ts=MAX_TS_MS + rng.randrange(1000 * 365 * 86_400_000))


@_kind("ts_far_past", "ts:")
def _ts_far_past(rng: random.Random) -> tuple[bytes, bytes]:
    return _mutated(rng, ts=rng.randrange(-MIN_TS_MS, MIN_TS_MS))


@_kind("ts_huge_integer", "ts:")
def _ts_huge_integer(rng: random.Random) -> tuple[bytes, bytes]:
    return _json_with_raw(rng, "ts", str(rng.choice((2**63, 2**64 - 1, 10**30, -(10**25)))).encode())


@_kind("ts_fractional_ms", "ts:")
def _ts_fractional_ms(rng: random.Random) -> tuple[bytes, bytes]:
    return _mutated(rng, ts=_OCT_2019_MS + rng.randrange(86_400_000) + 0.5)


@_kind("ts_iso_without_zone", "ts:")
def _ts_iso_without_zone(rng: random.Random) -> tuple[bytes, bytes]:
    return _mutated(rng, ts=rng.choice(("2019-10-01T00:00:00", "2019-10-01 12:30:05.123", "2019-10-01")))


@_kind("ts_not_a_time", "ts:")
def _ts_not_a_time(rng: random.Random) -> tuple[bytes, bytes]:
    return _mutated(rng, ts=rng.choice(("yesterday", "", "1569888000000", "2019-13-01T00:00:00Z", "2019-10-01 UTC")))


@_kind("negative_price", "price:")
def _negative_price(rng: random.Random) -> tuple[bytes, bytes]:
    return _mutated(rng, price=-round(rng.uniform(0.01, 1000), 2))


@_kind("price_too_high", "price:")
def _price_too_high(rng: random.Random) -> tuple[bytes, bytes]:
    return _mutated(rng, price=rng.choice((MAX_PRICE + 0.01, 1e12, 1e300, 2**64 - 1)))


@_kind("quantity_zero", "quantity:")
def _quantity_zero(rng: random.Random) -> tuple[bytes, bytes]:
    return _mutated(rng, quantity=0)


@_kind("quantity_out_of_range", "quantity:")
def _quantity_out_of_range(rng: random.Random) -> tuple[bytes, bytes]:
    return _mutated(rng, quantity=rng.choice((-1, -(2**63), MAX_QUANTITY + 1, 2**64 - 1)))


@_kind("unsupported_schema", "schema:")
def _unsupported_schema(rng: random.Random) -> tuple[bytes, bytes]:
    return _mutated(rng, schema=rng.choice((0, 2, 99, -1)))


del _field, _values  # loop variables, not part of the module


# ---- public API ------------------------------------------------------------------------------------------


def make(kind: str, rng: random.Random) -> BadRecord:
    expected, maker = KINDS[kind]
    key, value = maker(rng)
    return BadRecord(key, value, expected, kind)


def one_of_each(seed: int = 0) -> list[BadRecord]:
    """One record of every kind, in a stable order."""
    rng = random.Random(seed)
    return [make(kind, rng) for kind in KINDS]


def iter_bad_records(seed: int = 0) -> Iterator[BadRecord]:
    """An endless, deterministic stream of bad records of kinds drawn at random."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    while True:
        yield make(rng.choice(kinds), rng)


def generate(n: int, seed: int = 0) -> list[BadRecord]:
    stream = iter_bad_records(seed)
    return [next(stream) for _ in range(n)]
