"""Smoke run of the load test (`python -m load_tests run`) on the real broker: tiny traffic, every phase.

Asserts the report's structure and that the engine scored every event it was sent; never speeds (the
machine running the tests may be busy).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from load_tests import procs
from stream.settings import Settings
from tests.helpers import SMALL_BATCHES, read_to_end

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
STEP_KEYS = {
    "requested", "offered_eps", "achieved_eps", "sent", "sustained", "lag_end", "lag_max", "latency_ms",
    "cpu_pct_mean", "rss_mb_max", "engine",
}  # fmt: skip


def test_load_run_smoke(kafka: Settings, tmp_path: Path):
    out = tmp_path / "load"
    cmd = [
        sys.executable, "-m", "load_tests", "run", "--out", str(out),
        "--users", "300", "--backlog", "3000", "--capacity-s", "3", "--warmup", "1",
        "--duration", "4", "--rates", "100,50%", "--runtime", "torch,onnx",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=SMALL_BATCHES)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("summary: engine_eps=")

    report = json.loads((out / "report.json").read_text())
    for key in ("ceiling_eps", "naive_eps", "engine_eps", "engine_vs_ceiling", "engine_vs_naive"):
        assert isinstance(report[key], int | float) and report[key] > 0, key
    assert report["engine_vs_ceiling"] == pytest.approx(report["engine_eps"] / report["ceiling_eps"], rel=1e-2)
    assert report["engine_vs_naive"] == pytest.approx(report["engine_eps"] / report["naive_eps"], rel=1e-2)
    assert set(report["capacity"]) == {"ceiling", "naive", "engine", "engine-onnx"}
    assert report["capacity"]["engine"]["engine"]["batches"] > 0  # batch sizes and model time from /metrics

    half = report["latency_at_50pct"]
    assert half["requested"] == "50%" and half["n"] > 0
    assert 0 <= half["p50"] <= half["p95"] <= half["p99"] <= half["max"]
    steps = report["steps"]
    assert sorted(s["requested"] for s in steps) == ["100", "50%"]
    for step in steps:
        assert set(step) >= STEP_KEYS
        assert step["sent"] > 0 and step["latency_ms"]["n"] > 0
    samples = report["samples"]
    assert samples and all({"t", "phase", "lag", "cpu_pct", "rss_mb"} <= set(s) for s in samples)
    assert any(s["phase"].startswith("step:") and s["rss_mb"] and s["rss_mb"][0] > 0 for s in samples)

    # the engine scored every event it was sent, and no record went to the dead-letter topic
    acc = report["accounting"]
    assert acc["sent"] == sum(s["sent"] for s in steps) > 0
    assert acc["consumed"] == acc["scored"] == acc["sent"] and acc["dlq"] == 0 and acc["complete"]

    # the engine again with INTENTSTREAM_RUNTIME=onnx (the load test exported the model): it too scored everything
    assert set(report["runtimes"]) == {"torch", "onnx"}
    for figures in report["runtimes"].values():
        assert figures["capacity_eps"] > 0 and figures["p99_ms_at_50pct"] >= 0 and figures["complete"]
    manifest = json.loads((Path(report["model"]["path"]) / "manifest.json").read_text())
    assert "onnx" in manifest["exports"]

    assert set(report["targets"]) >= {"engine_vs_ceiling", "engine_vs_naive", "p99_ms_at_50pct"}
    for name in ("summary.md", "throughput_lag.png", "latency.png", "resources.png", "capacity.png"):
        assert (out / name).stat().st_size > 0, name
    assert "## Rate steps" in (out / "summary.md").read_text()


def test_load_run_measures_suggestions_side_by_side(kafka: Settings, tmp_path: Path):
    """--suggestions on,off: the engine's capacity with and without, in turns, and the ratio; the events of the
    one with suggestions carry them (from an item model trained on the traffic), the other's carry null."""
    out = tmp_path / "load"
    cmd = [
        sys.executable, "-m", "load_tests", "run", "--out", str(out), "--no-baselines", "--keep-topics",
        "--users", "300", "--backlog", "3000", "--capacity-s", "3", "--warmup", "1", "--repeat", "2",
        "--duration", "2", "--rates", "100", "--suggestions", "on,off",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=SMALL_BATCHES)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    tag = report["tag"]
    try:
        assert "suggestions_on_vs_off=" in proc.stdout
        assert set(report["capacity"]) == {"engine", "engine-suggestions-off"}
        cost = report["suggestions"]
        assert len(cost["on_eps_runs"]) == len(cost["off_eps_runs"]) == 2 and cost["on_eps"] > 0 < cost["off_eps"]
        assert cost["on_vs_off"] == pytest.approx(cost["on_eps"] / cost["off_eps"], rel=1e-2)
        assert report["targets"]["suggestions_cost_pct"]["reached"] == cost["cost_pct"]
        assert report["items"]["items"] > 0
        got = read_to_end(kafka, [f"{tag}-engine-r0-intent", f"{tag}-engine-suggestions-off-r0-intent"])
        on, off = ([orjson.loads(m.value)["suggestions"] for m in msgs] for msgs in got.values())
        assert on and off and all(s is None for s in off)
        assert all(s for s in on) and any(x["reason"].startswith("viewed together") for s in on for x in s)
    finally:
        asyncio.run(procs.delete_topics(kafka, tag))
