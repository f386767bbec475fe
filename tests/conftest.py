"""Shared fixtures: every test module sees these without importing them.

- the database fixtures of ``tests/db_fixtures.py`` (``db_engine``, ``db_url``, ``empty_db_url``,
  ``pg_database_url``, ``pg_url``, ``sqlite_url``), registered as a plugin;
- ``api_artifacts``: the small exported test model pairs (``tests.pairs.cached_pairs``), built once per
  version of the code that produces them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.pairs import cached_pairs

pytest_plugins = ["tests.db_fixtures"]

# Two cores: let pytest-xdist's workers share them instead of oversubscribing.
torch.set_num_threads(max(1, int(os.environ.get("CXR_DRIFT_TEST_THREADS", "1"))))


@pytest.fixture(scope="session")
def api_artifacts(pytestconfig: pytest.Config) -> Path:
    """One exported pair per architecture of ``tests.pairs.PAIR_ARCHS`` (read-only: copy before changing)."""
    return cached_pairs(pytestconfig)
