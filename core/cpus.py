"""The CPU cores this process may use: its affinity mask where the OS has one (a container's CPU set), else
the machine's count."""

from __future__ import annotations

import os

__all__ = ["usable_cores"]


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
