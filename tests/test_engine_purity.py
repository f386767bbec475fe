"""The science package stays free of the web stack, and of torch at import time (checked in a fresh process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = [
    "service.engine",
    "service.engine.cams",
    "service.engine.metrics",
    "service.engine.runtime",
    "service.engine.report",
    "service.engine.reference",
    "service.engine.overlay",
    "service.engine.calibrate",
]


@pytest.mark.parametrize("module", MODULES)
def test_engine_module_imports_no_web_stack_and_no_torch(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = sorted(m for m in ('fastapi', 'sqlalchemy', 'torch', 'starlette') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "", f"importing {module} pulled in: {out.stdout.strip()}"
