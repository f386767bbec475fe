"""Shared fixtures."""

from __future__ import annotations

import os

import torch

# Two cores: let pytest-xdist's workers share them instead of oversubscribing.
torch.set_num_threads(max(1, int(os.environ.get("CXR_DRIFT_TEST_THREADS", "1"))))
