"""The REES46 adapter on the real excerpt (../shared/data) and on hand-made rows for the edge cases."""

from __future__ import annotations

import gzip
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from stream.contract import Event, validate
from stream.traffic import rees46

EXCERPT = "rees46-2019-10-01-part1.csv.gz"
HEADER = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
OCT_1_2019_MS = 1_569_888_000_000


def write_csv(path: Path, rows: list[str], header: str | None = HEADER) -> Path:
    text = "\n".join(([header] if header else []) + rows) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def row(
    time: str = "2019-10-01 00:00:00 UTC",
    etype: str = "view",
    product: str = "44600062",
    category_id: str = "2103807459595387724",
    category_code: str = "",
    brand: str = "shiseido",
    price: str = "35.79",
    user: str = "541312140",
    session: str = "72d76fde-8bb3-4e00-8c23-a032dfed738c",
) -> str:
    return ",".join((time, etype, product, category_id, category_code, brand, price, user, session))


# ---- the real excerpt ------------------------------------------------------------------------------------


def test_real_excerpt_maps_every_row_with_the_documented_counts(shared_data):
    result = rees46.read(shared_data / EXCERPT)
    assert result.rejected == []
    assert result.rows == len(result.events) == 3517
    assert result.source_types == Counter({"view": 3449, "cart": 30, "purchase": 38})
    assert Counter(e.type for e in result.events) == Counter({"product_view": 3449, "add_to_cart": 30, "purchase": 38})


def test_real_excerpt_first_row_maps_field_by_field(shared_data):
    # 2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,72d76fde-...
    first = rees46.read(shared_data / EXCERPT).events[0]
    assert first == Event(
        event_id="rees46:rees46-2019-10-01-part1:1",
        user_id="541312140",
        type="product_view",
        ts=OCT_1_2019_MS,
        session_id="72d76fde-8bb3-4e00-8c23-a032dfed738c",
        item_id="44600062",
        category="2103807459595387724",  # category_code is empty: category_id stands in
        price=35.79,
    )


def test_real_excerpt_events_are_valid_contract_events_with_unique_stable_ids(shared_data):
    events = rees46.read_events(shared_data / EXCERPT)
    for event in events:
        assert validate(event.to_json(), event.user_id.encode()) == event
    assert len({e.event_id for e in events}) == len(events)
    assert [e.event_id for e in rees46.read_events(shared_data / EXCERPT)] == [e.event_id for e in events]


def test_real_excerpt_times_and_categories(shared_data):
    events = rees46.read_events(shared_data / EXCERPT)
    start = int(datetime(2019, 10, 1, tzinfo=UTC).timestamp() * 1000)
    end = int(datetime(2019, 10, 1, 2, 26, tzinfo=UTC).timestamp() * 1000)  # the README: 00:00 to 02:25 UTC
    assert all(start <= e.ts < end for e in events)
    assert any(e.category == "appliances.environment.water_heater" for e in events)  # a category_code
    assert all(e.category and e.item_id and e.session_id and e.price is not None for e in events)


def test_real_excerpt_prints_nothing_when_every_row_maps(shared_data, capsys):
    rees46.read_events(shared_data / EXCERPT)
    assert capsys.readouterr().err == ""


# ---- hand-made rows --------------------------------------------------------------------------------------


def test_each_rees46_type_maps_to_its_contract_type(tmp_path):
    path = write_csv(tmp_path / "t.csv", [row(etype=t) for t in ("view", "cart", "remove_from_cart", "purchase")])
    assert [e.type for e in rees46.read_events(path)] == ["product_view", "add_to_cart", "remove_from_cart", "purchase"]


def test_fields_map_and_empty_optional_columns_become_absent(tmp_path):
    path = write_csv(
        tmp_path / "f.csv",
        [
            row(time="2019-10-01 00:00:07 UTC", category_code="electronics.smartphone", price="189.99"),
            row(category_id="", category_code="", price="", session="", product=""),
        ],
    )
    full, bare = rees46.read_events(path)
    assert (full.ts, full.category, full.price, full.item_id) == (
        OCT_1_2019_MS + 7000,
        "electronics.smartphone",
        189.99,
        "44600062",
    )
    assert (bare.category, bare.price, bare.session_id, bare.item_id) == (None, None, None, None)
    assert full.quantity is None and full.device is None  # REES46 has neither


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        (row(etype="click"), "event_type: unknown REES46 event type 'click'"),
        (row(etype=""), "event_type: unknown REES46 event type ''"),
        (row(time="2019-10-01 25:00:00 UTC"), "event_time: not a time: '2019-10-01 25:00:00 UTC'"),
        (row(time="yesterday"), "event_time: not a time: 'yesterday'"),
        (row(time="2019-10-01 00:00:00"), "event_time: no time zone: '2019-10-01 00:00:00'"),
        (
            row(time="1990-10-01 00:00:00 UTC"),
            "event_time: out of range (2000..2100 expected): '1990-10-01 00:00:00 UTC'",
        ),
        (row(price="abc"), "price: not a number: 'abc'"),
        (row(price="-1.00"), "price: must be between 0 and 10000000"),
        (row(price="nan"), "price: must be between 0 and 10000000"),
        (row(price="inf"), "price: must be between 0 and 10000000"),
        (row(price="20000000"), "price: must be between 0 and 10000000"),
        (row(user=""), "user_id: empty"),
        (row(user="u" * 129), "user_id: longer than 128 characters"),
        (row(session="s" * 257), "session_id: longer than 256 characters"),
        (row(category_code="c" * 257), "category: longer than 256 characters"),
        (row()[: row().rindex(",")], "row: expected 9 columns, got 8"),
        (row() + ",extra", "row: expected 9 columns, got 10"),
    ],
)
def test_rows_that_cannot_be_mapped_are_reported_with_row_and_reason(tmp_path, bad_row, reason):
    path = write_csv(tmp_path / "bad.csv", [row(), bad_row, row(etype="purchase")])
    result = rees46.read(path)
    assert result.rejected == [(2, reason)]
    assert [e.event_id for e in result.events] == ["rees46:bad:1", "rees46:bad:3"]  # ids keep their row numbers


def test_read_events_reports_unmappable_rows_on_stderr(tmp_path, capsys):
    path = write_csv(tmp_path / "some-bad.csv", [row(), row(etype="click"), row(price="x"), row(user="")])
    events = rees46.read_events(path)
    assert len(events) == 1
    err = capsys.readouterr().err
    assert "3 rows could not be mapped" in err and "row 2: event_type: unknown REES46 event type 'click'" in err


def test_quoted_fields_with_commas(tmp_path):
    path = write_csv(tmp_path / "q.csv", [row(category_code='"kids,toys"', brand='"acme, inc."')])
    (event,) = rees46.read_events(path)
    assert event.category == "kids,toys"


def test_gzip_and_plain_files_give_the_same_events(tmp_path):
    rows = [row(), row(etype="cart", user="1"), row(etype="purchase", time="2019-10-01 01:00:00 UTC")]
    plain = rees46.read_events(write_csv(tmp_path / "same.csv", rows))
    (tmp_path / "gz").mkdir()
    zipped = rees46.read_events(write_csv(tmp_path / "gz" / "same.csv.gz", rows))
    assert plain == zipped and len(plain) == 3


def test_header_in_another_column_order(tmp_path):
    names = HEADER.split(",")
    order = [names.index(n) for n in reversed(names)]
    rows = [",".join(row().split(",")[i] for i in order)]
    (event,) = rees46.read_events(write_csv(tmp_path / "rev.csv", rows, header=",".join(reversed(names))))
    assert (event.user_id, event.item_id, event.price, event.type) == ("541312140", "44600062", 35.79, "product_view")


def test_headerless_file_in_the_canonical_order(tmp_path):
    events = rees46.read_events(write_csv(tmp_path / "nohead.csv", [row(), row(etype="cart")], header=None))
    assert [e.type for e in events] == ["product_view", "add_to_cart"]
    assert events[0].event_id == "rees46:nohead:1"


def test_a_file_that_is_not_rees46_is_refused_as_a_whole(tmp_path):
    with pytest.raises(rees46.Rees46Error, match="not a REES46 CSV"):
        rees46.read(write_csv(tmp_path / "other.csv", ["1,2,3"], header="a,b,c"))
    with pytest.raises(rees46.Rees46Error, match="header lacks price, user_id"):
        rees46.read(
            write_csv(
                tmp_path / "short.csv", ["x"], header="event_time,event_type,product_id,category_id,category_code,brand"
            )
        )


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        rees46.read(tmp_path / "absent.csv")


def test_empty_file_has_no_events(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    assert rees46.read(tmp_path / "empty.csv").events == []
    assert rees46.read(write_csv(tmp_path / "header-only.csv", [])).events == []


def test_event_time_parser():
    assert rees46.parse_event_time("2019-10-01 00:00:00 UTC") == OCT_1_2019_MS
    assert rees46.parse_event_time("2019-10-01T02:00:00+02:00") == OCT_1_2019_MS
    assert rees46.parse_event_time("2019-10-01 00:00:00.250 UTC") == OCT_1_2019_MS + 250
