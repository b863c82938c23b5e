"""The Quix Streams peer benchmark (`python -m load_tests peer`, load_tests/peer.py) on a tiny backlog.

Asserts the report's structure, that each system turned every input into an output or a dead-letter record,
and that each ratio is the quotient of the rates beside it; never speeds (the machine may be busy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from load_tests.peer import SYSTEMS, busy_window, turn_order
from stream.settings import Settings
from tests.helpers import SMALL_BATCHES

ROOT = Path(__file__).resolve().parents[1]
RUN_KEYS = {
    "system", "turn", "position", "outputs", "dlq", "processed", "complete", "eps", "span_s", "startup_s",
    "cpu_us_per_event", "cpu_s_total", "rss_mb_max",
}  # fmt: skip


def test_turns_alternate_order():
    assert [turn_order(SYSTEMS, t) for t in range(3)] == [list(SYSTEMS), list(reversed(SYSTEMS)), list(SYSTEMS)]


def test_busy_window_spans_the_drain():
    samples = [{"t": float(i), "outputs": o, "cpu_s": float(i)} for i, o in enumerate([0, 0, 10, 60, 100, 100])]
    assert busy_window(samples, 100) == (samples[2], samples[4])
    # all output within one sample: the window reaches back to the last sample without output
    samples = [{"t": float(i), "outputs": o, "cpu_s": float(i)} for i, o in enumerate([0, 0, 100])]
    assert busy_window(samples, 100) == (samples[1], samples[2])
    assert busy_window(samples[:2], 100) is None


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The httpx module is deprecated")  # authlib, imported by quixstreams
def test_peer_smoke(kafka: Settings, tmp_path: Path):
    pytest.importorskip("quixstreams", reason="Quix Streams is a benchmark extra: pip install -e '.[bench]'")
    out = tmp_path / "peer"
    cmd = [
        sys.executable, "-m", "load_tests", "peer", "--out", str(out), "--json", str(tmp_path / "copy.json"),
        "--events", "2000", "--users", "200", "--turns", "1", "--bad-fraction", "0.02", "--timeout", "240",
    ]  # fmt: skip
    # 2,040 records are half of one default backlog batch (4,096): the worker's outputs could land within one CPU
    # sample, leaving no CPU per event; batches of at most 256, as a real backlog makes hundreds of.
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=SMALL_BATCHES)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("summary: worker_eps=") and "worker_vs_quix_model=" in last

    report = json.loads((out / "peer_report.json").read_text())
    assert json.loads((tmp_path / "copy.json").read_text()) == report
    backlog = report["backlog"]
    inputs = backlog["events"]
    assert inputs == 2000 + backlog["bad"] and backlog["bad"] > 0
    assert report["complete"] is True
    assert set(report["systems"]) == set(SYSTEMS) and set(report["runs"]) == set(SYSTEMS)
    assert report["turn_order"] == [list(SYSTEMS)]
    for name in SYSTEMS:
        (run,) = report["runs"][name]
        assert set(run) >= RUN_KEYS, name
        assert run["outputs"] + run["dlq"] == run["processed"] == inputs, name  # every input, once
        assert run["dlq"] == backlog["bad"], name  # the malformed records, and only they
        assert run["complete"] and run["eps"] > 0 and run["cpu_us_per_event"] > 0, name
        assert report[f"{name}_eps"] == report["systems"][name]["eps"] == run["eps"]
    for quix in ("quix_passthrough", "quix_model"):
        ratio = report[f"worker_vs_{quix}"]
        assert ratio == pytest.approx(report["worker_eps"] / report[f"{quix}_eps"], rel=1e-3), quix
    assert {"cpus", "cpu_model", "load_avg_start", "load_avg_end"} <= set(report["machine"])
    assert report["config"]["quix"]["version"] == "3.28.1"
    for name in ("peer_summary.md", "peer.png"):
        assert (out / name).stat().st_size > 0, name
    assert "## Every turn" in (out / "peer_summary.md").read_text()
