"""A user's state and its binary codec (the value of the engine's table, keyed by user_id).

Layout: a fixed header (struct ``HEADER``), the model hidden state (float32 x n_hidden), then the window
records (models.features.RECORD_DTYPE, oldest first). No JSON, no pickle: decoding is a few slices.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum
from itertools import starmap

import numpy as np

from models.features import (
    FLAG_FIRST,
    FLAG_NEW_SESSION,
    FLAG_SAME_ITEM,
    RECORD_DTYPE,
    RECORD_STRUCT,
    FeaturizerConfig,
    encode_event,
    event_hash,
)
from stream.contract import Event

CODEC_VERSION = 1
# version, count, session_start, score, last_score, last_band, last_emit_ts, churn_risk, closed_ts,
# churn_alert_ts, model tag, n_hidden
HEADER = struct.Struct("<BQqffbqfqq16sH")
BANDS = ("low", "medium", "high")
NO_BAND = -1


class Accept(Enum):
    APPENDED = "appended"  # newest event of the user: appended to the window
    INSERTED = "inserted"  # late but within the window and the allowed lateness: inserted in time order
    DUPLICATE = "duplicate"  # same event_id already in the window (a producer retry): ignored
    TOO_LATE = "too_late"  # older than the allowed lateness or than the whole window: to the DLQ


@dataclass(slots=True)
class UserState:
    records: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=RECORD_DTYPE))
    count: int = 0  # events accepted from this user, ever
    session_start: int = 0  # event time of the first event of the current session
    score: float = -1.0  # purchase score at the user's last event (-1: not scored yet)
    last_score: float = -1.0  # last emitted purchase score (-1: none yet)
    last_band: int = NO_BAND  # index into BANDS of the last emitted band
    last_emit_ts: int = 0  # event time of the last emitted intent event
    churn_risk: float = 0.0  # churn probability scored at the user's last event
    closed_ts: int = 0  # last_ts of the last session judged closed (and checked for churn)
    churn_alert_ts: int = 0  # last_ts of the last session that raised a churn alert (0: never)
    model_tag: str = ""  # the model that produced ``hidden`` (LoadedModel.state_tag: its sha256, abridged)
    hidden: np.ndarray | None = None  # float32 [n_hidden], None when the model keeps no state

    @property
    def last_ts(self) -> int:
        return int(self.records["ts"][-1]) if len(self.records) else 0

    def accept(self, event: Event, config: FeaturizerConfig, allowed_lateness_ms: int) -> Accept:
        """Add ``event`` to the window (documented rule in docs/engine.md: append, insert late, or refuse)."""
        records = self.records
        h = event_hash(event.event_id)
        # The 8 hash bytes anywhere in the window's bytes is a cheap pre-check; numpy confirms the field.
        if len(records) and h.to_bytes(8, "little") in records.tobytes() and (records["event_hash"] == h).any():
            return Accept.DUPLICATE
        if not len(records) or event.ts >= records["ts"][-1]:
            prev = records[-1] if len(records) else None
            rec = encode_event(event, prev, self.count, config)
            if prev is None or int(rec[-1]) & FLAG_NEW_SESSION:
                self.session_start = event.ts
            keep = min(len(records), config.window - 1)
            # Bytes and struct.pack rather than numpy structured copies: ~6x cheaper (hot path, per event).
            tail = records[len(records) - keep :].tobytes() if keep else b""
            self.records = np.frombuffer(tail + RECORD_STRUCT.pack(*rec), dtype=RECORD_DTYPE)
            self.count += 1
            return Accept.APPENDED
        # Late: it must fit inside the window (its predecessor must still be there) and the lateness bound.
        if event.ts < records["ts"][-1] - allowed_lateness_ms or event.ts < records["ts"][0]:
            return Accept.TOO_LATE
        pos = int(np.searchsorted(records["ts"], event.ts, side="right"))
        late = np.array([encode_event(event, records[pos - 1], 0, config)], dtype=RECORD_DTYPE)
        merged = np.concatenate([records[:pos], late, records[pos:]])
        relink(merged, pos, config)
        self.records = merged[-config.window :]
        self.count += 1
        return Accept.INSERTED

    # ---- codec -----------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        hidden = b"" if self.hidden is None else self.hidden.astype("<f4", copy=False).tobytes()
        header = HEADER.pack(
            CODEC_VERSION,
            self.count,
            self.session_start,
            self.score,
            self.last_score,
            self.last_band,
            self.last_emit_ts,
            self.churn_risk,
            self.closed_ts,
            self.churn_alert_ts,
            self.model_tag.encode()[:16],
            0 if self.hidden is None else len(self.hidden),
        )
        return header + hidden + self.records.tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes) -> UserState:
        fields = HEADER.unpack_from(blob)
        version, count, session_start, score, last_score, last_band, last_emit, risk, closed, alert, model, n_hidden = (
            fields
        )
        if version != CODEC_VERSION:
            raise ValueError(f"user state codec version {version} is not {CODEC_VERSION}")
        offset = HEADER.size
        hidden = None
        if n_hidden:
            hidden = np.frombuffer(blob, dtype="<f4", count=n_hidden, offset=offset)
            offset += 4 * n_hidden
        # Read-only views of the blob: state changes build new arrays, never write into these.
        records = np.frombuffer(blob, dtype=RECORD_DTYPE, offset=offset)
        return cls(
            records, count, session_start, score, last_score, last_band, last_emit, risk, closed, alert,
            model.rstrip(b"\0").decode(), hidden,
        )  # fmt: skip


@dataclass(slots=True)
class PendingWindow:
    """A user's state while one batch adds events to it: the same window, byte for byte, as ``UserState.accept``
    one event at a time, at a fraction of the cost. Appended records stay tuples and the window array is built
    once (``finish``); duplicates are looked up among the hashes appended by the batch, then searched in the bytes
    of the window's hash column, never in a structure built per user. A late event (older than the user's last)
    takes ``UserState.accept``'s own path."""

    state: UserState
    config: FeaturizerConfig
    appended: list[tuple] = field(default_factory=list)  # records appended by this batch, in order
    last: tuple | None = None  # the window's newest record (``encode_event``'s ``prev``)
    last_ts: int = 0
    _unpacked: list[tuple] = field(default_factory=list)  # appended, not yet in ``state.records``
    # Duplicates: the window is the base (``state.records`` when first needed, or after a late insertion) followed
    # by the records appended since. The base's event hashes stay bytes, searched in C; a user's state is read
    # once per batch, often for one event, and a set of its 64 hashes cost more than the searches it saved.
    _base_hashes: bytes | None = None  # the base's event_hash column, little-endian (None: not taken yet)
    _since: dict[int, int] = field(default_factory=dict)  # event hash -> its index among the records appended since
    _n_since: int = 0  # records appended since the base

    @classmethod
    def of(cls, state: UserState, config: FeaturizerConfig) -> PendingWindow:
        records = state.records
        # A tuple of Python numbers, not a numpy record: encode_event reads three of its fields, ~3x cheaper so.
        last = records[-1].item() if len(records) else None
        return cls(state, config, last=last, last_ts=last[0] if last is not None else 0)

    def accept(self, event: Event, allowed_lateness_ms: int) -> Accept:
        h = event_hash(event.event_id)
        if self._in_window(h):
            return Accept.DUPLICATE
        if self.last is not None and event.ts < self.last_ts:
            return self._accept_late(event, allowed_lateness_ms)
        st = self.state
        rec = encode_event(event, self.last, st.count, self.config, h)
        if self.last is None or int(rec[-1]) & FLAG_NEW_SESSION:
            st.session_start = event.ts
        st.count += 1
        self.appended.append(rec)
        self._unpacked.append(rec)
        self.last, self.last_ts = rec, event.ts
        self._since[h] = self._n_since
        self._n_since += 1
        return Accept.APPENDED

    def finish(self) -> UserState:
        """The state with every accepted event in its window."""
        if self._unpacked:
            st = self.state
            blob = st.records.tobytes() + b"".join(starmap(RECORD_STRUCT.pack, self._unpacked))
            records = np.frombuffer(blob, dtype=RECORD_DTYPE)
            window = self.config.window
            st.records = records[len(records) - window :] if len(records) > window else records
            self._unpacked = []
        return self.state

    def _in_window(self, h: int) -> bool:
        """Whether an event of hash ``h`` is in the window (the base, less what the appends pushed out, then the
        appended records, less those pushed out by later ones)."""
        gone = self._n_since - self.config.window  # the window's first record, counted from the base's end
        j = self._since.get(h)
        if j is not None and j >= gone:
            return True
        base = self._base_hashes
        if base is None:
            base = self._base_hashes = self.state.records["event_hash"].tobytes()
        n_base = len(base) >> 3
        needle = h.to_bytes(8, "little")
        pos = base.find(needle)
        while pos != -1:  # the 8 bytes may straddle two hashes: only a match on a hash's own bytes counts
            if not pos & 7 and (pos >> 3) - n_base >= gone:
                return True
            pos = base.find(needle, pos + 1)
        return False

    def _accept_late(self, event: Event, allowed_lateness_ms: int) -> Accept:
        st = self.finish()
        outcome = st.accept(event, self.config, allowed_lateness_ms)
        if outcome is Accept.INSERTED:
            self.last = st.records[-1].item()
            self.last_ts = self.last[0]
            self._base_hashes, self._since, self._n_since = None, {}, 0  # the new window is the base
        return outcome


def relink(records: np.ndarray, start: int, config: FeaturizerConfig) -> None:
    """Recompute, in place, what records[start:] derive from their predecessor (after an insertion)."""
    base = int(records["count"][0])
    first = int(records["flags"][0]) & FLAG_FIRST
    records["count"] = base + np.arange(len(records))
    if first:  # the window still starts at the user's first event
        records["count"] = np.arange(len(records))
    for i in range(max(start, 1), len(records)):
        prev, cur = records[i - 1], records[i]
        gap = max(0.0, (int(cur["ts"]) - int(prev["ts"])) / 1000.0)
        flags = 0
        if gap > config.session_gap_s or cur["session"] != prev["session"]:
            flags |= FLAG_NEW_SESSION
        if cur["item"] and cur["item"] == prev["item"]:
            flags |= FLAG_SAME_ITEM
        records["gap_s"][i] = gap
        records["flags"][i] = flags
