"""Taobao UserBehavior CSV (``user_id,item_id,category_id,behavior_type,timestamp``, no header; ``.csv`` or
``.csv.gz``) -> contract events.

Mapping (docs/events.md has the table): pv -> product_view, cart -> add_to_cart, fav -> wishlist_add, buy ->
purchase; item_id -> item_id, category_id -> category, timestamp (epoch seconds) x 1000 -> ts. The data has no
session id, price or device: those fields stay empty (the featurizer starts a session after a 30-minute gap).
event_id is ``taobao:<file stem>:<row>`` (row 1 = the first line), unique and the same on every read.

Rows that cannot be mapped are never dropped silently: they come back as ``(row, reason)`` pairs and
``read_events`` prints how many there were.
"""

from __future__ import annotations

import csv
import gzip
import io
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from stream.contract import MAX_ID_CHARS, MAX_TEXT_CHARS, MAX_TS_MS, MIN_TS_MS, Event
from stream.traffic.rees46 import Rees46Read, file_stem, rejected_summary

COLUMNS: tuple[str, ...] = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
TYPE_MAP: dict[str, str] = {"pv": "product_view", "cart": "add_to_cart", "fav": "wishlist_add", "buy": "purchase"}

TaobaoRead = Rees46Read  # the same shape: events, rejected rows, source type counts


def row_to_event(values: Sequence[str], event_id: str) -> Event | str:
    """One CSV row -> an Event, or the reason it cannot be one."""
    if len(values) != len(COLUMNS):
        return f"row: expected {len(COLUMNS)} columns, got {len(values)}"
    user_id, item_id, category, behaviour, stamp = (v.strip() for v in values)
    etype = TYPE_MAP.get(behaviour)
    if etype is None:
        return f"behavior_type: unknown Taobao behaviour {behaviour[:40]!r}"
    try:
        ts = int(stamp) * 1000
    except ValueError:
        return f"timestamp: not whole epoch seconds: {stamp[:40]!r}"
    if not MIN_TS_MS <= ts < MAX_TS_MS:
        return f"timestamp: out of range (2000..2100 expected): {stamp[:40]!r}"
    if not user_id:
        return "user_id: empty"
    if len(user_id) > MAX_ID_CHARS:
        return f"user_id: longer than {MAX_ID_CHARS} characters"
    if not item_id:
        return "item_id: empty"
    for name, text in (("item_id", item_id), ("category_id", category)):
        if len(text) > MAX_TEXT_CHARS:
            return f"{name}: longer than {MAX_TEXT_CHARS} characters"
    return Event(event_id=event_id, user_id=user_id, type=etype, ts=ts, item_id=item_id, category=category or None)


def looks_like_taobao(path: Path | str) -> bool:
    """Whether the file's first line is a Taobao row (five columns, a known behaviour, epoch seconds)."""
    with _open_text(Path(path)) as text:
        first = next(csv.reader(text), None)
    return first is not None and len(first) == len(COLUMNS) and isinstance(row_to_event(first, "probe"), Event)


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def iter_events(
    path: Path | str, rejected: list[tuple[int, str]] | None = None, source_types: Counter[str] | None = None
) -> Iterator[Event]:
    """Stream the events of a Taobao file in file order; unmappable rows go to ``rejected`` as (row, reason)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Taobao file")
    stem = file_stem(path)
    with _open_text(path) as text:
        for row_number, values in enumerate(csv.reader(text), start=1):
            if not values:
                continue
            result = row_to_event(values, f"taobao:{stem}:{row_number}")
            if isinstance(result, Event):
                if source_types is not None:
                    source_types[values[3].strip()] += 1
                yield result
            elif rejected is not None:
                rejected.append((row_number, result))


def read(path: Path | str) -> TaobaoRead:
    rejected: list[tuple[int, str]] = []
    source_types: Counter[str] = Counter()
    events = list(iter_events(path, rejected, source_types))
    return TaobaoRead(events, rejected, source_types)


def read_events(path: Path | str) -> list[Event]:
    """The events of a Taobao file; rows that cannot be mapped are counted on stderr, never dropped silently."""
    result = read(path)
    if result.rejected:
        print(rejected_summary(path, result.rejected), file=sys.stderr)
    return result.events
