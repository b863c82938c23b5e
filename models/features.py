"""The featurizer shared by the trainer (offline, vectorised) and the engine (online, one event at a time).

An event is turned into a fixed-size *record* once, when it arrives: its own fields plus what depends on
the user's previous event (time gap, new session, same item) and on the user's history length. Model
inputs are then a pure function of records, so the engine's window (records packed as bytes in the
RocksDB table) and the trainer's arrays give identical tensors (tests/test_features.py proves it).
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np
import torch

from stream.contract import EVENT_TYPES, TYPE_CODE, Event

FEATURIZER_VERSION = 1

# One record per event, little-endian, packed: 43 bytes (a 64-event window is 2.7 KB).
RECORD_DTYPE = np.dtype(
    [
        ("ts", "<i8"),  # event time, epoch ms
        ("event_hash", "<u8"),  # 64-bit hash of event_id: duplicate detection within the window
        ("gap_s", "<f4"),  # event time since the user's previous event, seconds (0 for the first)
        ("price", "<f4"),  # NaN when the event has no price
        ("item", "<u4"),  # crc32 of item_id, 0 when absent
        ("category", "<u4"),  # crc32 of category, 0 when absent
        ("session", "<u4"),  # crc32 of session_id, 0 when absent
        ("count", "<u4"),  # events the user had before this one
        ("type", "u1"),  # index into stream.contract.EVENT_TYPES
        ("quantity", "u1"),  # clipped to 255, 0 when absent
        ("flags", "u1"),  # FLAG_* bits
    ]
)
# The same layout for one record as a struct: packing a tuple is ~5x cheaper than numpy's structured
# assignment, and the engine appends one record per event (stream/state/user.py).
RECORD_STRUCT = struct.Struct("<qQffIIIIBBB")
assert RECORD_STRUCT.size == RECORD_DTYPE.itemsize
FLAG_NEW_SESSION = 1
FLAG_SAME_ITEM = 2
FLAG_FIRST = 4

N_NUMERIC = 10
IntOrArray = TypeVar("IntOrArray", int, np.ndarray)


@dataclass(frozen=True)
class FeaturizerConfig:
    window: int = 64  # records kept per user (the engine's window; the CNN's receptive field fits in it)
    category_buckets: int = 64  # category hash buckets (embedding rows = buckets + 1; 0 = no category)
    session_gap_s: float = 1800.0  # a gap longer than this starts a new session even with the same session_id
    version: int = FEATURIZER_VERSION

    @property
    def session_gap_ms(self) -> int:
        return round(self.session_gap_s * 1000)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, float | int]) -> FeaturizerConfig:
        return cls(
            window=int(d["window"]),
            category_buckets=int(d["category_buckets"]),
            session_gap_s=float(d["session_gap_s"]),
            version=int(d["version"]),
        )


def session_deadline(last_ts_ms: IntOrArray, gap_ms: int) -> IntOrArray:
    """The event time from which the session whose last event is at ``last_ts_ms`` is over: it closes when the
    user's next event, or the partition's watermark, is at or past it. The one definition of where a session ends,
    so that churn is judged at the same positions in training (``training.data.Dataset.session_end``) as in serving
    (``stream.churn.PartitionSessions``). A change of session_id alone ends no session here: the engine could not
    see it until the user's next event, and judges churn only when time has passed."""
    return last_ts_ms + gap_ms


def _crc(text: str | None) -> int:
    return 0 if text is None else zlib.crc32(text.encode()) or 1


def event_hash(event_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")


# ---- online: one event at a time -------------------------------------------------------------------


def encode_event(
    event: Event, prev: np.void | tuple | None, count: int, config: FeaturizerConfig, hashed: int | None = None
) -> tuple[int | float, ...]:
    """The record of ``event`` given the user's previous record (``None`` for a first event); ``hashed``: its
    ``event_hash`` when the caller has it already."""
    item, session = _crc(event.item_id), _crc(event.session_id)
    flags = 0
    if prev is None:
        gap_s = 0.0
        flags |= FLAG_FIRST | FLAG_NEW_SESSION
    else:
        gap_s = max(0.0, (event.ts - int(prev[0])) / 1000.0)
        if gap_s > config.session_gap_s or session != int(prev[6]):
            flags |= FLAG_NEW_SESSION
        if item and item == int(prev[4]):
            flags |= FLAG_SAME_ITEM
    return (
        event.ts,
        event_hash(event.event_id) if hashed is None else hashed,
        gap_s,
        math.nan if event.price is None else event.price,
        item,
        _crc(event.category),
        session,
        count,
        TYPE_CODE[event.type],
        0 if event.quantity is None else min(event.quantity, 255),
        flags,
    )


def concat_records(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Record arrays end to end, read-only. Their bytes joined rather than np.concatenate, which promotes a
    structured dtype once per array joined (~3 us each: the engine joins a batch's windows)."""
    return np.frombuffer(b"".join([a.tobytes() for a in arrays]), dtype=RECORD_DTYPE)


def records_from_bytes(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=RECORD_DTYPE)


def records_to_bytes(records: np.ndarray) -> bytes:
    return records.astype(RECORD_DTYPE, copy=False).tobytes()


# ---- offline: whole files, vectorised --------------------------------------------------------------


def encode_events(events: Sequence[Event], config: FeaturizerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Records for many users at once. Returns (records, order): records[k] belongs to events[order[k]],
    grouped by user (users in first-seen order), each user's events in event-time order (stable)."""
    n = len(events)
    user_index: dict[str, int] = {}
    users = np.fromiter((user_index.setdefault(e.user_id, len(user_index)) for e in events), np.int64, n)
    ts = np.fromiter((e.ts for e in events), np.int64, n)
    order = np.lexsort((np.arange(n), ts, users))  # by user, then time, then arrival
    ev = [events[i] for i in order]
    rec = np.zeros(n, dtype=RECORD_DTYPE)
    rec["ts"] = ts[order]
    rec["event_hash"] = np.fromiter((event_hash(e.event_id) for e in ev), np.uint64, n)
    rec["price"] = np.fromiter((math.nan if e.price is None else e.price for e in ev), np.float32, n)
    rec["item"] = np.fromiter((_crc(e.item_id) for e in ev), np.uint32, n)
    rec["category"] = np.fromiter((_crc(e.category) for e in ev), np.uint32, n)
    rec["session"] = np.fromiter((_crc(e.session_id) for e in ev), np.uint32, n)
    rec["type"] = np.fromiter((TYPE_CODE[e.type] for e in ev), np.uint8, n)
    rec["quantity"] = np.fromiter((0 if e.quantity is None else min(e.quantity, 255) for e in ev), np.uint8, n)
    u = users[order]
    first = np.ones(n, dtype=bool)
    first[1:] = u[1:] != u[:-1]
    starts = np.flatnonzero(first)
    rec["count"] = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    gap = np.zeros(n, dtype=np.float64)
    gap[1:] = (rec["ts"][1:] - rec["ts"][:-1]) / 1000.0
    gap[first] = 0.0
    rec["gap_s"] = np.maximum(gap, 0.0)
    new_session = first.copy()
    new_session[1:] |= (gap[1:] > config.session_gap_s) | (rec["session"][1:] != rec["session"][:-1])
    same_item = np.zeros(n, dtype=bool)
    same_item[1:] = (rec["item"][1:] == rec["item"][:-1]) & (rec["item"][1:] != 0)
    same_item &= ~first
    rec["flags"] = new_session * FLAG_NEW_SESSION + same_item * FLAG_SAME_ITEM + first * FLAG_FIRST
    return rec, order


# ---- records -> model inputs -----------------------------------------------------------------------


def model_inputs(records: np.ndarray, config: FeaturizerConfig) -> dict[str, torch.Tensor]:
    """Model inputs for records of any shape (..., T): categorical indices and numeric features."""
    gap = records["gap_s"].astype(np.float32)
    price = records["price"].astype(np.float32)
    has_price = ~np.isnan(price)
    hour = (records["ts"] % 86_400_000).astype(np.float32) * np.float32(2 * math.pi / 86_400_000)
    flags = records["flags"]
    numeric = np.stack(
        [
            np.log1p(gap) / np.float32(10.0),
            (flags & FLAG_NEW_SESSION) > 0,
            (flags & FLAG_FIRST) > 0,
            (flags & FLAG_SAME_ITEM) > 0,
            has_price,
            np.where(has_price, np.log1p(np.where(has_price, price, 0)), 0) / np.float32(8.0),
            np.log1p(records["quantity"].astype(np.float32)) / np.float32(3.0),
            np.sin(hour),
            np.cos(hour),
            np.log1p(records["count"].astype(np.float32)) / np.float32(8.0),
        ],
        axis=-1,
    ).astype(np.float32)
    category = np.where(records["category"] == 0, 0, records["category"].astype(np.int64) % config.category_buckets + 1)
    return {
        "type": torch.from_numpy(records["type"].astype(np.int64)),
        "category": torch.from_numpy(category.astype(np.int64)),
        "numeric": torch.from_numpy(numeric),
    }


N_TYPES = len(EVENT_TYPES)
