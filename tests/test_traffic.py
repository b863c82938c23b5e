"""load_tests/traffic.py: the load tests' records, joined from pre-encoded pieces, are the bytes of the plain
encoding (``record_value``: a dict through orjson), tile after tile, users renamed, the last tile partial."""

from __future__ import annotations

import dataclasses
import itertools

import orjson

from load_tests.traffic import Traffic, _pieces, record_value
from stream.contract import Event, validate


def reference_records(traffic: Traffic, tiles: int):
    """What ``Traffic.records`` yields, built the plain way."""
    tpl = traffic.template
    for tile in range(tiles):
        for e in tpl.events:
            user = traffic._user(e.user_id, tile)
            if user is not None:
                yield (
                    user.encode(),
                    record_value(
                        e, user, f"{e.event_id}-{tile}", f"{e.session_id}-{tile}", e.ts + tile * tpl.period_ms
                    ),
                )


def test_joined_records_are_the_plain_encodings_bytes_for_bytes():
    traffic = Traffic(users=130, template_users=100)  # the last tile is partial, the one after wraps around
    tiles = traffic.tiles + 1
    assert traffic.tiles >= 2 and 130 % len(traffic.template.users)
    n = sum(1 for _ in reference_records(traffic, tiles))
    joined = list(itertools.islice(traffic.records(), n))
    assert joined == list(reference_records(traffic, tiles))
    assert len(traffic.sent_users) == 130
    for key, value in joined[:: max(1, n // 200)]:
        event = validate(value, key)
        assert type(event) is Event, event


def test_ids_that_need_escaping_are_escaped_as_orjson_does():
    traffic = Traffic(users=20, template_users=50)
    e = traffic.template.events[0]
    odd = dataclasses.replace(e, event_id='ev"\\é-1', session_id="s\u2028")  # quote, backslash, non-ASCII
    traffic.template.events[0], traffic._pieces[0] = odd, _pieces(odd)
    traffic._user = lambda template_user, tile: f'q"u\\{template_user}-{tile}'  # type: ignore[method-assign]
    key, value = next(iter(traffic.records(first_tile=3)))
    user = f'q"u\\{odd.user_id}-3'
    assert key == user.encode()
    assert value == record_value(odd, user, 'ev"\\é-1-3', "s\u2028-3", odd.ts + 3 * traffic.template.period_ms)
    assert orjson.loads(value)["event_id"] == 'ev"\\é-1-3'


def test_an_event_holding_the_marker_is_encoded_whole():
    traffic = Traffic(users=20, template_users=50)
    e = traffic.template.events[0]
    odd = dataclasses.replace(e, category="a\x00b")
    assert _pieces(odd) is None
    traffic.template.events[0], traffic._pieces[0] = odd, None
    key, value = next(iter(traffic.records(first_tile=2)))
    user = key.decode()
    assert value == record_value(
        odd, user, f"{odd.event_id}-2", f"{odd.session_id}-2", odd.ts + 2 * traffic.template.period_ms
    )


def test_a_long_run_of_few_users_stays_behind_the_wall_clock():
    """The template is laid a day a tile from PAST_DAYS back: with 1,000 users a tile is about 3,000 events, and the
    three years it started from ran out after about 3,270,000 events, whose later records the worker sent to the DLQ
    as too far in the future (a 10 x 15 s A/B at 30,000/s passed it). 9,000 tiles in (27 million events), event time is
    still in the past."""
    import time

    from stream.contract import MAX_TS_MS, MIN_TS_MS

    traffic = Traffic(users=1000)
    first = orjson.loads(next(iter(traffic.records(track=False)))[1])
    later = orjson.loads(next(iter(traffic.records(first_tile=9_000, track=False)))[1])
    assert MIN_TS_MS <= first["ts"] < later["ts"] < time.time() * 1000 < MAX_TS_MS
    assert later["ts"] - first["ts"] >= 9_000 * 86_400_000 - 86_400_000
