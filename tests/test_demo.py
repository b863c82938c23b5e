"""`intentstream demo` end to end on the real broker (with a ready model, so no training here)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from load_tests.procs import free_port
from stream.settings import Settings
from tests.helpers import encode, make_events, produce, write_model

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


SUMMARY = re.compile(
    r"summary: events=(\d+) scored=(\d+) duplicates=(\d+) late=(\d+) dlq=(\d+) intents=(\d+) churn_alerts=(\d+) "
    r"alerts_per_1k_users_day=([\d.]+) p50_ms=([\d.]+) p99_ms=([\d.]+) score_p50_ms=([\d.]+) "
    r"score_p99_ms=([\d.]+) alert_budget=(\S+) expected_alerts_per_1k_users_day=(\S+)"
)


def run_demo(env: dict[str, str], out: Path) -> tuple[str, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "stream.cli", "demo", "--events", "3000", "--rate", "1500", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert SUMMARY.fullmatch(last), last
    summary = json.loads(out.read_text())
    assert last == "summary: " + " ".join(f"{k}={v}" for k, v in summary.items())  # the line and the JSON agree
    return proc.stdout, summary


def test_the_demo_gives_the_same_result_every_time_it_is_run(fresh: Settings, tmp_path: Path):
    """Run twice in one state folder, on a broker whose configured input topic already holds someone else's
    backlog: each run scores its own records only, every one of them (scored, a duplicate, or dead-lettered), and
    the second run finds what the first found. (The demo used to replay the same seeded events into the same
    state the second time: everything was a duplicate, 0 scored, and a backlog in the topic was counted as its own.)"""
    from stream.topics import ensure_topics

    write_model(fresh.model_dir, churn_alert=0.3)
    ensure_topics(fresh)
    produce(fresh, encode(make_events(n_users=50, seed=9)))  # a backlog that is not the demo's
    env = fresh.child_env(web_port=free_port())
    stdout, first = run_demo(env, tmp_path / "first.json")
    _, second = run_demo(env, tmp_path / "second.json")
    for summary in (first, second):
        assert summary["dlq"] > 0 and summary["scored"] > 0 and summary["intents"] > 0
        # nothing lost, nothing foreign: every record the run sent is scored, a duplicate or dead-lettered
        assert summary["scored"] + summary["duplicates"] + summary["dlq"] == summary["events"]
        assert summary["late"] <= summary["dlq"]
        assert summary["score_p50_ms"] <= summary["score_p99_ms"]
    counts = ("events", "scored", "duplicates", "late", "dlq")
    assert {k: second[k] for k in counts} == {k: first[k] for k in counts}
    assert "intent  " in stdout  # a few intent events were printed as they arrived
    assert not list((fresh.state_dir / "demo").glob("demo-*"))  # each run's worker state removed at its end


def test_quantiles_of_a_prometheus_histogram():
    from stream.traffic.demo import _quantile

    buckets = [(0.01, 10.0), (0.1, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert _quantile(buckets, 0.5) == pytest.approx(0.01 + 0.09 * (40 / 80))
    assert _quantile(buckets, 0.05) == pytest.approx(0.005)
    assert _quantile(buckets, 0.99) == pytest.approx(0.1 + 0.9 * (9 / 10))
    assert math.isnan(_quantile([(0.01, 0.0), (float("inf"), 0.0)], 0.5))  # no events
    assert _quantile([(0.01, 0.0), (float("inf"), 5.0)], 0.5) == 0.01  # all above the last bound
