"""Load-test traffic: simulator users, tiled out to a large population of distinct users.

Simulating a million users directly takes minutes and produces tens of millions of events, far more than
a load test sends. Instead one *template* is simulated (``template_users`` users over ``template_days``
of event time: realistic sessions, gaps and funnels) and played as consecutive *tiles*. Tile r renames
every template user (``u0001234`` -> ``u0001234-t0042``) and shifts event time by r template periods, so
each tile brings new users with the same per-user behaviour, and event time keeps moving forward (the
engine's watermark advances and sessions close). After ``users`` distinct users the tiles wrap around
and the same users return, days of event time later (returning users whose state is in the table).

A user contributes about six events per simulated day, so the number of distinct users a run reaches is
about its events / 6, capped at ``users``. ``preload_records`` gives one event to every user of the
population (earlier in event time than all tiles): the way to put the whole population into the engine's
state before a measurement.

Event times end well before the wall clock: the engine rejects events more than a day in the future.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

from stream.contract import Event

DAY_MS = 86_400_000
# Event time of the first tile, a day a tile after it: 25 years back (after 1 January 2000, the contract's earliest),
# about 27,000,000 events of 1,000 users. Three years, as before, ran out after about 3,270,000, whose records the
# worker sent to the DLQ as too far in the future (docs/performance.md, twentieth pass).
PAST_DAYS = 25 * 365


@dataclass(frozen=True)
class _Template:
    events: list[Event]
    users: list[str]  # active template users (with at least one event), in first-event order
    period_ms: int


class Traffic:
    """Pre-encoded (key, value) records of simulator traffic over a population of ``users`` users."""

    def __init__(
        self,
        users: int = 1_000_000,
        seed: int = 11,
        template_users: int = 20_000,
        template_days: float = 1.0,
        start_ms: int | None = None,
    ):
        from stream.traffic.simulator import simulate

        if users < 1:
            raise ValueError("users: at least 1")
        # The template never needs more users than the population (a small smoke run stays small).
        sim_users = max(50, min(template_users, int(users * 2.7)))  # ~37% of simulated users are active per day
        period_ms = round(template_days * DAY_MS)
        if start_ms is None:
            start_ms = (int(time.time() * 1000) // DAY_MS - PAST_DAYS) * DAY_MS
        sim = simulate(sim_users, template_days, seed, start_ms=start_ms)
        active = list(dict.fromkeys(e.user_id for e in sim.events))
        self.template = _Template(sim.events, active, period_ms)
        self._index = {u: i for i, u in enumerate(active)}
        self.population = users
        self.start_ms = start_ms
        # Tiles before the population is exhausted; the last one may be partial.
        self.tiles = max(1, math.ceil(users / len(active)))
        self.sent_users: set[str] = set()  # distinct users handed out so far (for the report)
        self._track = users <= 5_000_000  # a set of 5M short strings is ~400 MB: stop counting beyond
        self._pieces = [_pieces(e) for e in sim.events]  # each template event's value, cut where a tile's parts go

    @property
    def events_per_tile(self) -> int:
        return len(self.template.events)

    def _user(self, template_user: str, tile: int) -> str | None:
        """Population id of a template user in a tile; None when it lies beyond the population."""
        slot = tile % self.tiles
        # The last tile may be partial: only the users that fit in the population.
        if slot == self.tiles - 1 and slot * len(self.template.users) + self._index[template_user] >= self.population:
            return None
        return f"{template_user}-t{slot:04d}"

    def records(self, first_tile: int = 0, track: bool = True) -> Iterator[tuple[bytes, bytes]]:
        """Endless (key, value) records in event-time order, tile after tile. ``track``: count the users
        handed out in ``sent_users``. A value is the bytes of ``record_value``, joined from its template event's
        pre-encoded pieces: the load tests replay tens of thousands of records a second on the machine whose worker
        they measure (0.69 against 1.13 us a record through a dict and orjson)."""
        track = track and self._track
        tpl = self.template
        pieces = self._pieces
        tile = first_tile
        join = b"".join
        while True:
            shift = tile * tpl.period_ms
            tile_text = b"%d" % tile
            renamed: dict[str, tuple[bytes, bytes] | None] = {}  # template user -> (key, its id as JSON text)
            for e, cut in zip(tpl.events, pieces, strict=True):
                if e.user_id in renamed:
                    user = renamed[e.user_id]
                else:
                    name = self._user(e.user_id, tile)
                    user = renamed[e.user_id] = None if name is None else (name.encode(), orjson.dumps(name)[1:-1])
                    if name is not None and track:
                        self.sent_users.add(name)
                if user is None:
                    continue
                if cut is None:  # a template event holding the marker: encoded whole
                    name = user[0].decode()
                    yield user[0], record_value(e, name, f"{e.event_id}-{tile}", f"{e.session_id}-{tile}", e.ts + shift)
                    continue
                head, to_user, to_ts, to_session, tail = cut
                ts = b"%d" % (e.ts + shift)
                parts = (head, tile_text, to_user, user[1], to_ts, ts, to_session, tile_text, tail)
                yield user[0], join(parts)
            tile += 1

    def preload_records(self, days: float = 7.0) -> Iterator[tuple[bytes, bytes]]:
        """One event per population user (its template user's first event), spread in event time over the
        ``days`` before the first tile, so their sessions close progressively while they are consumed."""
        tpl = self.template
        first: dict[str, Event] = {}
        for e in tpl.events:
            first.setdefault(e.user_id, e)
        n = self.population
        span = round(days * DAY_MS)
        t0 = self.start_ms - span - DAY_MS
        i = 0
        for tile in range(self.tiles):
            for template_user in tpl.users:
                if i >= n:
                    return
                e = first[template_user]
                user = f"{template_user}-t{tile:04d}"
                if self._track:
                    self.sent_users.add(user)
                ts = t0 + i * span // n
                yield user.encode(), record_value(e, user, f"pre-{e.event_id}-{tile}", f"pre-{e.session_id}-{tile}", ts)
                i += 1


def record_value(e: Event, user: str, event_id: str, session_id: str, ts: int) -> bytes:
    """The value of template event ``e`` renamed and moved in time (``Traffic.records`` joins the same bytes from
    pieces; tests/test_traffic.py compares the two)."""
    obj: dict[str, object] = {
        "event_id": event_id,
        "user_id": user,
        "type": e.type,
        "ts": ts,
        "session_id": session_id,
        "device": e.device,
        "schema": 1,
    }
    if e.item_id is not None:
        obj["item_id"] = e.item_id
    if e.category is not None:
        obj["category"] = e.category
    if e.price is not None:
        obj["price"] = e.price
    if e.quantity is not None:
        obj["quantity"] = e.quantity
    return orjson.dumps(obj)


_MARK = "\x00"  # orjson writes it \u0000; an event whose fields hold it is encoded whole (``_pieces`` gives None)


def _pieces(e: Event) -> tuple[bytes, bytes, bytes, bytes, bytes] | None:
    """``record_value(e, ...)`` cut where the tile (twice), the user and the time go; None when its own fields
    hold the marker (the simulator's never do)."""
    cut = record_value(e, _MARK, f"{e.event_id}-{_MARK}", f"{e.session_id}-{_MARK}", -1).split(b"\\u0000")
    if len(cut) != 4:
        return None
    before_tile, before_user, around_ts, rest = cut
    before_ts, before_session_tile = around_ts.split(b'"ts":-1', 1)  # "ts" is a key once; texts escape quotes
    return before_tile, before_user, before_ts + b'"ts":', before_session_tile, rest
