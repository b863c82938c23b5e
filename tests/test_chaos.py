"""The chaos scenario, shortened (load_tests/chaos.py): crashes, a rebalance, a broker restart, a paused worker and
a model swap on a broker of its own, under both processing guarantees. Nothing may be lost; under exactly-once
nothing may be repeated either; every user's state must equal a run without faults.

The full run and its figures: `python -m load_tests chaos --out DIR [--guarantee ...]`, docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from load_tests.chaos import SHORT, run_scenario

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_chaos_loses_nothing(guarantee: str, tmp_path: Path):
    result = run_scenario(tmp_path, guarantee, SHORT, seed=7)
    assert result["lost"] == 0, result["lost_examples"]
    assert result["inputs"] == result["scored"] + result["dlq"]
    assert result["scored"] > 0 and result["dlq"] > 0  # malformed records were in the trace
    assert result["state_mismatches"] == 0, result["mismatch_details"]
    assert len(result["recovery_s"]) == 4  # kill + restart, rebalance, broker restart, pause
    assert set(result["model_versions"]) == {"v0001", "v0002"}  # the swap happened during traffic
    if guarantee == "exactly_once":
        assert result["duplicate_intents"] == 0 and result["duplicate_alerts"] == 0 and result["duplicate_dlq"] == 0
