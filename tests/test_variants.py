"""load_tests/variants.py: a ``head-*`` variant compares the committed files with uncommitted edits of them, and
refuses to run without such edits (it used to compare the engine with itself and report the noise)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from load_tests.variants import _require_uncommitted


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
