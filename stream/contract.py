"""The clickstream event contract: the one place that both documents and enforces it.

Input: topic ``clickstream``, key = user_id (UTF-8), value = one JSON object (docs/events.md has the
prose version; tests/test_contract.py checks every rule). ``validate`` turns raw record bytes into an
``Event`` or a one-line reason (``"ts: not a timestamp"``) and never raises. Output records (intent
events, churn alerts, dead-letter records) are built here too so that their shape lives in one file.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = frozenset({1})
# A DLQ record carries at most this much of a rejected key or value (base64 of 256 KiB: 342 KiB, well under the
# producer's 1 MB request size; inputs are refused over max_record_bytes, 64 KiB by default, anyway).
DLQ_MAX_ORIGINAL_BYTES = 262_144

# Order matters: the index is the event type's code in state and model inputs (append only).
EVENT_TYPES: tuple[str, ...] = (
    "page_view",
    "search",
    "product_view",
    "add_to_cart",
    "remove_from_cart",
    "wishlist_add",
    "checkout_start",
    "purchase",
)
TYPE_CODE: dict[str, int] = {name: i for i, name in enumerate(EVENT_TYPES)}

# The dead-letter reason of a valid event that comes too late for its user's window (stream/state/user.py Accept).
TOO_LATE_REASON = "ts: later than the allowed lateness or older than the user's window"

MAX_ID_CHARS = 128  # event_id, user_id
MAX_TEXT_CHARS = 256  # session_id, item_id, category, device
MAX_PRICE = 1e7
MAX_QUANTITY = 10_000
# Epoch milliseconds in [2000-01-01, 2100-01-01): catches seconds-instead-of-milliseconds and garbage.
MIN_TS_MS = 946_684_800_000
MAX_TS_MS = 4_102_444_800_000
DEFAULT_MAX_RECORD_BYTES = 65_536
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


@dataclass(slots=True)
class Event:
    """A valid clickstream event. ``ts`` is event time in epoch milliseconds."""

    event_id: str
    user_id: str
    type: str
    ts: int
    session_id: str | None = None
    item_id: str | None = None
    category: str | None = None
    price: float | None = None
    quantity: int | None = None
    device: str | None = None
    schema: int = SCHEMA_VERSION

    @property
    def type_code(self) -> int:
        return TYPE_CODE[self.type]

    def to_json(self) -> bytes:
        """Contract JSON (optional fields omitted when absent)."""
        return orjson.dumps({k: v for k, v in self.to_dict().items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "type": self.type,
            "ts": self.ts,
            "session_id": self.session_id,
            "item_id": self.item_id,
            "category": self.category,
            "price": self.price,
            "quantity": self.quantity,
            "device": self.device,
            "schema": self.schema,
        }


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _required_id(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if value is None:
        raise _Bad(f"{name}: missing" if name not in obj else f"{name}: null")
    if type(value) is not str:
        raise _Bad(f"{name}: expected a string, got {_kind(value)}")
    if not value:
        raise _Bad(f"{name}: empty")
    if len(value) > MAX_ID_CHARS:
        raise _Bad(f"{name}: longer than {MAX_ID_CHARS} characters")
    return value


def _optional_text(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if type(value) is not str:
        raise _Bad(f"{name}: expected a string, got {_kind(value)}")
    if len(value) > MAX_TEXT_CHARS:
        raise _Bad(f"{name}: longer than {MAX_TEXT_CHARS} characters")
    return value


def parse_ts(value: Any) -> int:
    """Event time as epoch milliseconds: an integer (or integral number) of ms, or ISO-8601 with a zone."""
    if type(value) is int:
        ms = value
    elif type(value) is float:
        if not math.isfinite(value) or value != int(value):
            raise _Bad("ts: not a whole number of epoch milliseconds")
        ms = int(value)
    elif type(value) is str:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise _Bad("ts: not a timestamp (epoch milliseconds or ISO-8601 with a zone)") from None
        if parsed.tzinfo is None:
            raise _Bad("ts: ISO-8601 timestamp without a time zone")
        # Integer arithmetic: timestamp() * 1000 is a float and loses a millisecond now and then.
        ms = (parsed - _EPOCH) // _ONE_MS
    elif value is None:
        raise _Bad("ts: missing")
    else:
        raise _Bad(f"ts: not a timestamp, got {_kind(value)}")
    if not MIN_TS_MS <= ms < MAX_TS_MS:
        raise _Bad("ts: out of range (epoch milliseconds between 2000 and 2100 expected)")
    return ms


class _Bad(Exception):
    """Internal: carries the reason out of nested checks; never escapes ``validate``."""


def validate(
    value: bytes | None,
    key: bytes | None = None,
    *,
    check_key: bool = True,
    max_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_ts_ms: int | None = None,
) -> Event | str:
    """Return the ``Event`` encoded by a record, or the reason it is rejected. Never raises.

    ``check_key``: the record key must equal the user_id (it decides the partition, so the user's
    state lives on one worker). ``max_ts_ms``: reject event times beyond this (e.g. wall clock + 1 day).
    """
    try:
        if value is None:
            return "record: no value (tombstone)"
        if len(value) > max_bytes:
            return f"record: {len(value)} bytes exceeds the {max_bytes}-byte limit"
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            return f"json: {exc.args[0] if exc.args else 'invalid JSON'}"
        if type(obj) is not dict:
            return f"json: expected an object, got {_kind(obj)}"
        return _fast_path(obj, key, check_key, max_ts_ms) or _validate_obj(obj, key, check_key, max_ts_ms)
    except _Bad as bad:
        return str(bad)
    except Exception as exc:  # defensive: a validator bug must not kill the agent
        return f"record: unexpected validation error ({type(exc).__name__})"


def validate_many(
    records: Iterable[tuple[bytes | None, bytes | None]],
    *,
    max_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_ts_ms: int | None = None,
) -> list[Event | str]:
    """``validate`` of every (value, key), keys checked: the same Events and reasons, in order. A batch's valid
    records take the fast path without a call of ``validate`` each (its guards, its keyword arguments: about a
    seventh of what validating an event cost, 2.15 against 1.84 us ad hoc); any other record goes through ``validate``, which finds its precise reason."""
    loads, fast_path = orjson.loads, _fast_path
    out: list[Event | str] = []
    append = out.append
    for value, key in records:
        if value is not None and len(value) <= max_bytes:
            try:
                obj = loads(value)
            except orjson.JSONDecodeError:
                obj = None
            if type(obj) is dict:
                try:
                    event = fast_path(obj, key, True, max_ts_ms)
                except Exception:  # defensive, as in validate: the slow path finds the reason
                    event = None
                if event is not None:
                    append(event)
                    continue
        append(validate(value, key, max_bytes=max_bytes, max_ts_ms=max_ts_ms))
    return out


def _fast_path(obj: dict[str, Any], key: bytes | None, check_key: bool, max_ts_ms: int | None) -> Event | None:
    """The common case in few operations: a fully valid event with an integer ts. Anything unusual
    returns None and goes through ``_validate_obj``, which finds the precise reason."""
    get = obj.get
    event_id, user_id, etype, ts = get("event_id"), get("user_id"), get("type"), get("ts")
    schema = get("schema", SCHEMA_VERSION)
    if not (
        type(event_id) is str
        and type(user_id) is str
        and type(etype) is str
        and type(ts) is int
        and 0 < len(event_id) <= MAX_ID_CHARS
        and 0 < len(user_id) <= MAX_ID_CHARS
        and etype in TYPE_CODE
        and MIN_TS_MS <= ts < MAX_TS_MS
        and (max_ts_ms is None or ts <= max_ts_ms)
        and type(schema) is int  # True == 1 and 1.0 == 1, yet both are rejected by _validate_obj
        and schema == SCHEMA_VERSION
    ):
        return None
    if check_key and (key is None or key != user_id.encode()):
        return None
    session_id, item_id, category, device = get("session_id"), get("item_id"), get("category"), get("device")
    for text in (session_id, item_id, category, device):
        if text is not None and (type(text) is not str or len(text) > MAX_TEXT_CHARS):
            return None
    price, quantity = get("price"), get("quantity")
    if price is not None:
        if type(price) is int:
            price = float(price)
        if type(price) is not float or not 0.0 <= price <= MAX_PRICE:  # NaN fails the comparison
            return None
    if quantity is not None and (type(quantity) is not int or not 1 <= quantity <= MAX_QUANTITY):
        return None
    return Event(event_id, user_id, etype, ts, session_id, item_id, category, price, quantity, device)


def _validate_obj(obj: dict[str, Any], key: bytes | None, check_key: bool, max_ts_ms: int | None) -> Event:
    schema = obj.get("schema", SCHEMA_VERSION)
    if type(schema) is not int:
        raise _Bad(f"schema: expected an integer, got {_kind(schema)}")
    if schema not in SUPPORTED_SCHEMAS:
        raise _Bad(f"schema: unsupported version {schema} (supported: {sorted(SUPPORTED_SCHEMAS)})")
    event_id = _required_id(obj, "event_id")
    user_id = _required_id(obj, "user_id")
    if check_key:
        if key is None:
            raise _Bad("key: missing (must be the user_id, UTF-8)")
        try:
            key_text = key.decode()
        except UnicodeDecodeError:
            raise _Bad("key: not valid UTF-8") from None
        if key_text != user_id:
            raise _Bad("key: does not match user_id")
    etype = obj.get("type")
    if etype is None:
        raise _Bad("type: missing")
    if type(etype) is not str:
        raise _Bad(f"type: expected a string, got {_kind(etype)}")
    if etype not in TYPE_CODE:
        raise _Bad(f"type: unknown event type {etype[:40]!r}")
    ts = parse_ts(obj.get("ts"))
    if max_ts_ms is not None and ts > max_ts_ms:
        raise _Bad("ts: too far in the future")
    price = obj.get("price")
    if price is not None:
        if type(price) not in (int, float):
            raise _Bad(f"price: expected a number, got {_kind(price)}")
        if not math.isfinite(price) or price < 0 or price > MAX_PRICE:
            raise _Bad(f"price: must be between 0 and {MAX_PRICE:.0f}")
        price = float(price)
    quantity = obj.get("quantity")
    if quantity is not None:
        if type(quantity) is not int:
            raise _Bad(f"quantity: expected an integer, got {_kind(quantity)}")
        if not 1 <= quantity <= MAX_QUANTITY:
            raise _Bad(f"quantity: must be between 1 and {MAX_QUANTITY}")
    return Event(
        event_id,
        user_id,
        etype,
        ts,
        _optional_text(obj, "session_id"),
        _optional_text(obj, "item_id"),
        _optional_text(obj, "category"),
        price,
        quantity,
        _optional_text(obj, "device"),
        schema,
    )


def reason_field(reason: str) -> str:
    """The field a reason is about (bounded set, for metrics labels): 'ts: not a timestamp' -> 'ts'."""
    return reason.split(":", 1)[0]


# ---- output records ---------------------------------------------------------------------------------


def dlq_record(
    reason: str,
    key: bytes | None,
    value: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    rejected_at_ms: int,
) -> bytes:
    """Dead-letter record: the original bytes (base64), why, and where it came from.

    A key or value longer than DLQ_MAX_ORIGINAL_BYTES is cut to that length and described under "truncated"
    (its length and sha256; the whole record stays in the input topic at its source offset): base64 makes
    bytes a third longer, and a DLQ record over the producer's request size could never be delivered."""
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "reason": reason,
        "key_b64": None if key is None else base64.b64encode(key[:DLQ_MAX_ORIGINAL_BYTES]).decode(),
        "value_b64": None if value is None else base64.b64encode(value[:DLQ_MAX_ORIGINAL_BYTES]).decode(),
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "rejected_at": rejected_at_ms,
    }
    truncated = {
        name: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
        for name, b in (("key", key), ("value", value))
        if b is not None and len(b) > DLQ_MAX_ORIGINAL_BYTES
    }
    if truncated:
        record["truncated"] = truncated
    return orjson.dumps(record)


SCORE_DIGITS, VALUE_DIGITS = 5, 2  # decimals of the scores and the order values of output records


def intent_record(
    *,
    user_id: str,
    score: float,
    band: str,
    order_value_if_purchase: float | None,
    model_name: str,
    model_version: str,
    event_id: str,
    event_ts: int,
    produced_at_ms: int | None,
    scored_at_ms: int,
    reasons: list[str],
    suggestions: Sequence[tuple[str, float, str]] | orjson.Fragment | None = None,
    rounded: tuple[float, float | None, float | None] | None = None,
) -> bytes:
    """Purchase-intent event. ``latency_ms``: from the input record's broker timestamp to scoring.
    ``order_value_if_purchase``: the model's predicted value of the purchase, should one come; the event carries it
    and ``expected_order_value``, the expectation: purchase probability x that value. ``suggestions``: (item_id,
    score, reason) triples (models.items.Suggestion; not imported: that module imports this one), or their JSON
    list pasted from ``suggestion_head``, ``float_texts`` and ``suggestion_tail`` (what the engine passes), None for
    null. ``rounded``: the score, the expectation and the value rounded already, the same floats as ``round`` gives
    here (the engine rounds a batch's at once: ``stream.emit.intent_numbers``); when given, the record carries these
    and reads nothing else of ``score`` and ``order_value_if_purchase``."""
    if rounded is None:
        value = order_value_if_purchase
        rounded = (
            round(score, SCORE_DIGITS),
            None if value is None else round(score * value, VALUE_DIGITS),
            None if value is None else round(value, VALUE_DIGITS),
        )
    return orjson.dumps(
        {
            "schema": SCHEMA_VERSION,
            "user_id": user_id,
            "score": rounded[0],
            "band": band,
            "expected_order_value": rounded[1],
            "order_value_if_purchase": rounded[2],
            "model": {"name": model_name, "version": model_version},
            "event_id": event_id,
            "event_ts": event_ts,
            "input_ts": produced_at_ms,
            "scored_at": scored_at_ms,
            "latency_ms": None if produced_at_ms is None else scored_at_ms - produced_at_ms,
            "reasons": reasons,
            "suggestions": None
            if suggestions is None
            else suggestions
            if isinstance(suggestions, orjson.Fragment)
            else [{"item_id": i, "score": sc, "reason": r} for i, sc, r in suggestions],
        }
    )


# ``intent_record``'s bytes with its fields pasted in: the keys in the same order, each value as orjson writes it.
_INTENT_TEMPLATE = (
    b'{"schema":%d,"user_id":"%b","score":%b,"band":%b,"expected_order_value":%b,"order_value_if_purchase":%b,'
    b'"model":%b,"event_id":"%b","event_ts":%d,"input_ts":%b,"scored_at":%d,"latency_ms":%b,"reasons":%b,'
    b'"suggestions":%b}'
)


def intent_records(
    user_ids: Sequence[str],
    event_ids: Sequence[str],
    event_ts: Sequence[int],
    produced_at_ms: Sequence[int | None],
    bands: Sequence[str],
    rounded: Sequence[tuple[float, float | None, float | None]],
    reasons_json: Sequence[bytes],
    suggestions: Sequence[orjson.Fragment | Sequence[tuple[str, float, str]] | None],
    *,
    model_name: str,
    model_version: str,
    scored_at_ms: int,
) -> list[bytes]:
    """``intent_record`` for many events of one batch (the same model and scoring time), one record per position of
    the columns, byte for byte what it writes (``rounded`` given; each event's reasons as their JSON). The engine's
    path: the constant parts are written once, the floats and the ids in one call each (``float_texts``,
    ``string_texts``), the rest pasted into a template, under half the cost of a dict per event encoded by orjson
    (docs/performance.md, twelfth pass)."""
    dumps = orjson.dumps
    floats = float_texts([x for numbers in rounded for x in numbers])
    n = len(user_ids)
    ids = string_texts([*user_ids, *event_ids])
    model = dumps({"name": model_name, "version": model_version})
    band_json = {band: dumps(band) for band in set(bands)}
    out = []
    for i, (user_id, event_id, ts, produced, band, why, offer) in enumerate(
        zip(ids[:n], ids[n:], event_ts, produced_at_ms, bands, reasons_json, suggestions, strict=True)
    ):
        at = 3 * i
        out.append(
            _INTENT_TEMPLATE
            % (
                SCHEMA_VERSION,
                user_id,
                floats[at],
                band_json[band],
                floats[at + 1],
                floats[at + 2],
                model,
                event_id,
                ts,
                b"null" if produced is None else b"%d" % produced,
                scored_at_ms,
                b"null" if produced is None else b"%d" % (scored_at_ms - produced),
                why,
                b"null"
                if offer is None
                else dumps(offer)  # a Fragment's bytes as they are
                if isinstance(offer, orjson.Fragment)
                else dumps([{"item_id": item, "score": sc, "reason": r} for item, sc, r in offer]),
            )
        )
    return out


# An intent event's suggestions pasted together from pieces (models.items.suggest_json: the engine's path), byte for
# byte what intent_record writes for (item_id, score, reason) triples: {"item_id":…,"score":…,"reason":…}.


def suggestion_head(item_id: str, first: bool) -> bytes:
    """A suggestion's JSON up to its score; the first of a list opens the list."""
    return (b'[{"item_id":' if first else b'{"item_id":') + orjson.dumps(item_id) + b',"score":'


def suggestion_tail(reason: str, last: bool) -> bytes:
    """A suggestion's JSON after its score; the last of a list closes the list, the others are followed by a comma."""
    return b',"reason":' + orjson.dumps(reason) + (b"}]" if last else b"},")


def string_texts(texts: Sequence[str]) -> list[bytes]:
    """Each string as orjson writes it, less its quotes, in one call when none needs an escape (no backslash in the
    whole: every quote is then a string's own, so '","' is where one string ends and the next begins)."""
    if not texts:
        return []
    joined = orjson.dumps(texts)
    if b"\\" in joined:
        return [orjson.dumps(text)[1:-1] for text in texts]
    return joined[2:-2].split(b'","')


def float_texts(values: Sequence[float | None]) -> list[bytes]:
    """Each float as orjson writes it (None as null), in one call (neither text holds a comma)."""
    return orjson.dumps(values)[1:-1].split(b",") if values else []


def churn_record(
    *,
    user_id: str,
    risk: float,
    last_seen_ts: int,
    session_id: str | None,
    model_name: str,
    model_version: str,
    alerted_at_ms: int,
    watermark_ts: int,
    reasons: list[str],
) -> bytes:
    """Churn alert, emitted once when a session closes with risk above the model's threshold."""
    return orjson.dumps(
        {
            "schema": SCHEMA_VERSION,
            "user_id": user_id,
            "risk": round(risk, 5),
            "last_seen": last_seen_ts,
            "session_id": session_id,
            "model": {"name": model_name, "version": model_version},
            "watermark": watermark_ts,
            "alerted_at": alerted_at_ms,
            "reasons": reasons,
        }
    )
