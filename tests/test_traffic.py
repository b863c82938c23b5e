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
