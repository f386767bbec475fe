"""What the browser tests and the screenshot script share: a real uvicorn server on a free loopback port
(in a thread, lifespan and all), a seeded audit database, and Debian's Chromium driven by Playwright.

Nothing is downloaded: Playwright's own browsers are never installed (``playwright install`` is not run);
it launches the system browser at ``CHROMIUM`` (``apt-get install chromium``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from service.app.main import create_app
from service.app.settings import Settings
from service.audit.db import make_engine, upgrade
from tests.api_fixtures import free_port, make_settings, sqlite_url
from tests.dashboard_data import seed_audit

__all__ = ["CHROMIUM", "chromium_missing", "launch", "seeded_database", "serve"]

CHROMIUM = os.environ.get("CXR_DRIFT_CHROMIUM", "/usr/bin/chromium")


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python Playwright is not installed (pip install -e '.[dev]')"
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CXR_DRIFT_CHROMIUM)"
    return None


def launch(playwright: Any) -> Any:
    """The system Chromium, headless (``--no-sandbox``: CI containers run as root)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)


def seeded_database(folder: Path, *, days: int = 14, per_day: int = 4) -> tuple[str, list[dict[str, Any]]]:
    """A migrated SQLite audit database in ``folder`` with :func:`tests.dashboard_data.seed_audit`."""
    url = sqlite_url(folder)
    upgrade(url)
    engine = make_engine(url)
    try:
        return url, seed_audit(engine, days=days, per_day=per_day)
    finally:
        engine.dispose()


def settings_for(folder: Path, url: str, artifacts: Path | None = None, **overrides: Any) -> Settings:
    if artifacts is None:
        artifacts = folder / "artifacts"
        artifacts.mkdir(exist_ok=True)
    return make_settings(artifacts, url, **overrides)


# The strictest policy the service may send (a security-headers middleware does in production): the pages
# must work under it, so the browser tests serve them with it whether or not the app adds its own.
STRICT_CSP = "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'"


class StrictCsp:
    """ASGI wrapper adding :data:`STRICT_CSP` to every answer that has no Content-Security-Policy."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_with_csp(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"content-security-policy" for name, _ in headers):
                    headers.append((b"content-security-policy", STRICT_CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_csp if scope["type"] == "http" else send)


@contextlib.contextmanager
def serve(settings: Settings, *, timeout: float = 120) -> Iterator[str]:
    """Serve ``create_app(settings)`` (under :data:`STRICT_CSP`) with uvicorn on a free loopback port; yields
    the base URL."""
    port = free_port()
    config = uvicorn.Config(StrictCsp(create_app(settings)), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server stopped during startup (see the log above)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not start within {timeout} s")
        time.sleep(0.05)
    assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
