"""load_tests/variants.py: a ``head-*`` variant compares the committed files with uncommitted edits of them, and
refuses to run without such edits (it used to compare the engine with itself and report the noise)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from load_tests.variants import _require_uncommitted

ROOT = Path(__file__).resolve().parents[1]


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_a_head_variant_needs_an_uncommitted_change(tmp_path: Path):
    git(tmp_path, "init", "-q")
    (tmp_path / "app.py").write_text("x = 1\n")
    git(tmp_path, "add", "app.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    with pytest.raises(SystemExit, match="compared with itself"):
        _require_uncommitted("head-app", "app.py", root=tmp_path)
    (tmp_path / "app.py").write_text("x = 2\n")
    _require_uncommitted("head-app", "app.py", root=tmp_path)  # an edit to compare: runs


def test_a_combined_variant_gives_legal_kafka_names():
    import re

    from load_tests.run import kafka_name

    assert re.fullmatch(r"[A-Za-z0-9._-]+", kafka_name("steps-batch-512+wait-times"))


@pytest.mark.parametrize("variant", ["before-batch-records", "before-emission-keys"])
def test_an_engine_of_an_earlier_revision_runs_in_todays_worker(variant: str):
    """``before-batch-records`` loads stream/engine.py and stream/emit.py of c3a8712 in a fresh interpreter: today's
    app and ingest import beside it, and it processes records as the ingest hands them over (as fetched,
    stream.compat.InputRecord: ``timestamp``, not the ``timestamp_ms`` it reads), given as InRecords. ``before-emission-keys``
    loads f4793c3's engine with the contract it wrote its records with."""
    script = """
import itertools, sys, tempfile, time, torch
from pathlib import Path
from types import SimpleNamespace
from load_tests import variants
variants.VARIANTS[sys.argv[1]]()
import stream.app  # imports the engine's names
from stream import engine, emit
from load_tests.traffic import Traffic
from load_tests.untrained import untrained_artifact
from stream.settings import Settings
assert not hasattr(emit, "intent_reasons_json_at")  # an old engine
model = untrained_artifact(Path(tempfile.mkdtemp()), data_hash="t")
eng = engine.Engine(Settings.from_env(emit_policy="every_event"), model, torch.device("cpu"))
now = int(time.time() * 1000)
pairs = itertools.islice(Traffic(users=50).records(), 300)
records = [SimpleNamespace(key=k, value=v, topic="clickstream", partition=0, offset=i, timestamp=now)
           for i, (k, v) in enumerate(pairs)]
result = eng.process(records, lambda user, rec: None)
assert result.scored == 300 and result.intents == 300, (result.scored, result.intents)
print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, variant], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_the_before_fetch_min_variant_is_the_worker_before_the_broker_held_its_fetches(monkeypatch: pytest.MonkeyPatch):
    from load_tests.variants import VARIANTS
    from stream.settings import Settings

    for name in ("FETCH_MIN_BYTES", "FETCH_MAX_WAIT_MS", "BATCH_MAX_MS"):
        monkeypatch.delenv(f"INTENTSTREAM_{name}", raising=False)
    now = Settings.from_env()
    assert (now.fetch_min_bytes, now.fetch_max_wait_ms, now.batch_max_ms) == (65_536, 20, 5.0)
    for name in ("FETCH_MIN_BYTES", "FETCH_MAX_WAIT_MS", "BATCH_MAX_MS"):
        monkeypatch.setenv(f"INTENTSTREAM_{name}", "")  # restored by monkeypatch after the variant sets it
    VARIANTS["before-fetch-min"]()
    before = Settings.from_env()
    assert (before.fetch_min_bytes, before.fetch_max_wait_ms, before.batch_max_ms) == (1, 100, 20.0)


def test_an_ab_summary_says_when_a_system_lacks_latencies():
    """A slice without latencies (its records in the DLQ, as when the traffic's event time once passed the wall
    clock) is named under the table, not left to a shorter list of slice p99s."""
    from load_tests.ab import markdown

    def system(p99s: list[float], dlq: int) -> dict:
        return {
            "pooled_latency_ms": {"p50": 30.0, "p95": 80.0, "p99": 120.0, "max": 200},
            "median_slice_p99_ms": 120.0,
            "slice_p99_ms": p99s,
            "cpu_pct_mean": 90.0,
            "dlq_records": dlq,
        }

    report = {
        "rate": 30000.0,
        "slices": 3,
        "slice_s": 15.0,
        "load_avg_start": [0.5],
        "load_avg_end": [0.6],
        "code": {"engine_sha256": {}},
        "systems": {"engine": system([100.0, 120.0, 130.0], 0), "v": system([100.0], 450_000)},
    }
    text = markdown(report)
    assert "**v: 1 of 3 slices have latencies, 450,000 records went to the DLQ**" in text
    assert "**engine:" not in text
