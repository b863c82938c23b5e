"""`intentstream demo` end to end on the real broker (with a ready model, so no training here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stream.settings import Settings
from tests.helpers import free_port, settings_env, write_model

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_demo_prints_outputs_and_a_summary_line(fresh: Settings, tmp_path: Path):
    write_model(fresh.model_dir, churn_alert=0.3)
    env = settings_env(fresh, web_port=free_port())
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "stream.cli", "demo", "--events", "3000", "--rate", "1500", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(
        r"summary: events=(\d+) scored=(\d+) intents=(\d+) churn_alerts=(\d+) dlq=(\d+) p50_ms=([\d.]+) p99_ms=([\d.]+)",
        last,
    )
    assert m, last
    events, scored, intents, alerts, dlq = map(int, m.groups()[:5])
    summary = json.loads(out.read_text())
    assert summary["events"] == events and summary["dlq"] == dlq and summary["churn_alerts"] == alerts
    assert dlq > 0 and scored > 0 and intents > 0
    assert scored + dlq == events  # nothing lost: every record is scored or dead-lettered
    assert "intent  " in proc.stdout  # a few intent events were printed as they arrived
