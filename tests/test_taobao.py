"""The Taobao UserBehavior adapter on the real excerpt (../shared/data) and on hand-made rows."""

from __future__ import annotations

import gzip
from pathlib import Path

from stream.contract import Event
from stream.traffic import taobao
from training.data import read_events

EXCERPT = "taobao-2017-11-26-part1.csv.gz"


def test_taobao_excerpt_maps_every_row(shared_data: Path):
    result = taobao.read(shared_data / EXCERPT)
    assert result.rejected == [] and len(result.events) == 46_895
    assert dict(result.source_types) == {"pv": 41_890, "cart": 2_539, "fav": 1_474, "buy": 992}
    first = result.events[0]
    assert first == Event("taobao:taobao-2017-11-26-part1:1", "543462", "product_view", 1_511_658_000_000,
                          item_id="1715", category="1464116")  # fmt: skip
    assert read_events([shared_data / EXCERPT])[:1] == [first]
    assert not taobao.looks_like_taobao(shared_data / "rees46-2019-10-01-part1.csv.gz")


def test_taobao_bad_rows_are_reported(tmp_path: Path):
    path = tmp_path / "t.csv.gz"
    rows = ["1,2,3,pv,1511658000", "1,2,3,teleport,1511658000", "1,2,3,buy,soon", "1,2,3", "1,,3,cart,1511658001"]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(rows) + "\n")
    result = taobao.read(path)
    assert [e.type for e in result.events] == ["product_view"]
    assert [row for row, _ in result.rejected] == [2, 3, 4, 5]
    assert "unknown Taobao behaviour" in result.rejected[0][1] and "item_id: empty" in result.rejected[3][1]
