"""Schemathesis against a live server, bounded: bench/hostile.py with few examples, fuzzing phase only.

The fuller run (every phase, both databases, the image corpus) is ``python bench/hostile.py``; its figures
are in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api_fixtures import pg_available

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_schemathesis_finds_no_server_error(db: str) -> None:
    if db == "postgres" and not pg_available():
        pytest.skip("PostgreSQL not reachable (set CXR_DRIFT_TEST_PG_URL)")
    cmd = [
        sys.executable,
        "bench/hostile.py",
        "--max-examples",
        "3",
        "--phases",
        "fuzzing",
        "--db",
        db,
        "--no-corpus",
        "--roles",
        "predict",
        "audit",
        "admin",
        "none",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex('{"ok"')])
    run = summary[db]
    assert run["server_errors_5xx"] == 0 and run["identifiers_in_log"] == []
    for role, figures in run["schemathesis"].items():
        assert figures["requests"] > 0, role
