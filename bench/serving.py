"""Waiting for a `cxr-drift serve` subprocess of a bench to answer ``GET /readyz`` 200."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


def wait_ready(
    server: subprocess.Popen[bytes], base: str, *, log: Path | None = None, timeout_s: float = 300
) -> None:
    """Poll ``{base}/readyz`` until it answers 200; raise if the server exits (with the end of ``log``) or
    is not ready after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None else ""
            raise RuntimeError(f"server exited with {server.returncode}\n{tail}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server not ready in time")
        time.sleep(0.3)
