"""REES46 e-commerce CSV (``event_time,event_type,product_id,...``; ``.csv`` or ``.csv.gz``) -> contract events.

Mapping (docs/events.md has the table): view -> product_view, cart -> add_to_cart, remove_from_cart ->
remove_from_cart, purchase -> purchase; user_session -> session_id; event_time ("2019-10-01 00:00:00 UTC")
-> ts in epoch ms; product_id -> item_id; category_code, or category_id where the code is empty ->
category; price -> price. brand has no contract field and is dropped. event_id is
``rees46:<file stem>:<row>`` (row 1 = the first data row), unique and the same on every read.

Rows that cannot be mapped are never dropped silently: they come back as ``(row, reason)`` pairs and
``read_events`` prints how many there were.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from stream.contract import (
    MAX_ID_CHARS,
    MAX_PRICE,
    MAX_TEXT_CHARS,
    MAX_TS_MS,
    MIN_TS_MS,
    Event,
)

COLUMNS: tuple[str, ...] = (
    "event_time",
    "event_type",
    "product_id",
    "category_id",
    "category_code",
    "brand",
    "price",
    "user_id",
    "user_session",
)
TYPE_MAP: dict[str, str] = {
    "view": "product_view",
    "cart": "add_to_cart",
    "remove_from_cart": "remove_from_cart",
    "purchase": "purchase",
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
# Leaves room for ":<row>" within the contract's 128 characters.
_MAX_STEM_CHARS = MAX_ID_CHARS - len("rees46::") - 12


class Rees46Error(ValueError):
    """The file as a whole is not REES46 CSV (rows that are merely bad are reported, not raised)."""


@dataclass
class Rees46Read:
    events: list[Event]
    rejected: list[tuple[int, str]]  # (row, reason), row 1 = first data row
    source_types: Counter[str] = field(default_factory=Counter)  # REES46 event_type of the mapped rows

    @property
    def rows(self) -> int:
        return len(self.events) + len(self.rejected)


def is_rees46_path(path: Path | str) -> bool:
    return str(path).endswith((".csv", ".csv.gz"))


def file_stem(path: Path | str) -> str:
    name = Path(path).name
    for suffix in (".gz", ".csv"):
        name = name.removesuffix(suffix)
    return name[:_MAX_STEM_CHARS]


def parse_event_time(text: str) -> int:
    """REES46 ``2019-10-01 00:00:00 UTC`` (or ISO-8601 with a zone) -> epoch ms; ValueError with a reason."""
    iso = text[:-4] + "+00:00" if text.endswith(" UTC") else text
    try:
        parsed = datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(f"event_time: not a time: {text[:40]!r}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"event_time: no time zone: {text[:40]!r}")
    ms = (parsed - _EPOCH) // _ONE_MS  # integer arithmetic: exact to the millisecond
    if not MIN_TS_MS <= ms < MAX_TS_MS:
        raise ValueError(f"event_time: out of range (2000..2100 expected): {text[:40]!r}")
    return ms


def row_to_event(
    values: Sequence[str], event_id: str, index: dict[str, int] | None = None, width: int = len(COLUMNS)
) -> Event | str:
    """One CSV row -> an Event, or the reason it cannot be one. ``index``: column name -> position in a
    file of ``width`` columns (a row of another width is misaligned: an unquoted comma, a cut line)."""
    if index is None:
        index = _CANONICAL_INDEX
    if len(values) != width:
        return f"row: expected {width} columns, got {len(values)}"

    def col(name: str) -> str:
        return values[index[name]].strip()

    source_type = col("event_type")
    etype = TYPE_MAP.get(source_type)
    if etype is None:
        return f"event_type: unknown REES46 event type {source_type[:40]!r}"
    try:
        ts = parse_event_time(col("event_time"))
    except ValueError as exc:
        return str(exc)
    user_id = col("user_id")
    if not user_id:
        return "user_id: empty"
    if len(user_id) > MAX_ID_CHARS:
        return f"user_id: longer than {MAX_ID_CHARS} characters"
    price_text = col("price")
    price: float | None = None
    if price_text:
        try:
            price = float(price_text)
        except ValueError:
            return f"price: not a number: {price_text[:40]!r}"
        if not math.isfinite(price) or not 0.0 <= price <= MAX_PRICE:
            return f"price: must be between 0 and {MAX_PRICE:.0f}"
    texts = {
        "session_id": col("user_session"),
        "item_id": col("product_id"),
        "category": col("category_code") or col("category_id"),
    }
    for name, text in texts.items():
        if len(text) > MAX_TEXT_CHARS:
            return f"{name}: longer than {MAX_TEXT_CHARS} characters"
    return Event(
        event_id=event_id,
        user_id=user_id,
        type=etype,
        ts=ts,
        session_id=texts["session_id"] or None,
        item_id=texts["item_id"] or None,
        category=texts["category"] or None,
        price=price,
    )


_CANONICAL_INDEX = {name: i for i, name in enumerate(COLUMNS)}


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def _column_index(first_row: list[str], path: Path) -> tuple[dict[str, int], bool]:
    """(column name -> position, whether the first row is a header). Files without a header must use the
    canonical column order, recognised by a REES46 time in the first column."""
    names = [c.strip().lower() for c in first_row]
    if "event_type" in names or "event_time" in names:
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise Rees46Error(f"{path}: not a REES46 CSV: header lacks {', '.join(missing)}")
        return {name: names.index(name) for name in COLUMNS}, True
    if len(first_row) == len(COLUMNS):
        try:
            parse_event_time(first_row[0].strip())
            return dict(_CANONICAL_INDEX), False
        except ValueError:
            pass
    raise Rees46Error(f"{path}: not a REES46 CSV: no header naming {', '.join(COLUMNS)}")


def iter_events(
    path: Path | str, rejected: list[tuple[int, str]] | None = None, source_types: Counter[str] | None = None
) -> Iterator[Event]:
    """Stream the events of a REES46 file in file order. Rows that cannot be mapped are appended to
    ``rejected`` as (row, reason); ``source_types`` counts the REES46 event types of the mapped rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such REES46 file")
    stem = file_stem(path)
    with _open_text(path) as text:
        reader = csv.reader(text)
        first = next(reader, None)
        if first is None:
            return
        index, has_header = _column_index(first, path)
        rows = reader if has_header else _chain_first(first, reader)
        type_position, width = index["event_type"], len(first)
        for row_number, values in enumerate(rows, start=1):
            if not values:  # blank line
                continue
            result = row_to_event(values, f"rees46:{stem}:{row_number}", index, width)
            if isinstance(result, Event):
                if source_types is not None:
                    source_types[values[type_position].strip()] += 1
                yield result
            elif rejected is not None:
                rejected.append((row_number, result))


def _chain_first(first: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rest


def read(path: Path | str) -> Rees46Read:
    rejected: list[tuple[int, str]] = []
    source_types: Counter[str] = Counter()
    events = list(iter_events(path, rejected, source_types))
    return Rees46Read(events, rejected, source_types)


def rejected_summary(path: Path | str, rejected: Sequence[tuple[int, str]], limit: int = 3) -> str:
    """One line: how many rows were rejected, and the first few with their reasons."""
    first = "; ".join(f"row {row}: {reason}" for row, reason in rejected[:limit])
    return f"{path}: {len(rejected)} rows could not be mapped to events ({first}{'; ...' if len(rejected) > limit else ''})"


def read_events(path: Path | str) -> list[Event]:
    """The events of a REES46 file; rows that cannot be mapped are counted on stderr, never dropped silently."""
    result = read(path)
    if result.rejected:
        print(rejected_summary(path, result.rejected), file=sys.stderr)
    return result.events
