"""Fixtures and helpers for the API tests: model-pair artifacts, keys, databases, images, an ASGI client.

The model pairs come from the session fixture ``api_artifacts`` (tests/conftest.py), which holds the cached
pairs of ``tests.pairs.cached_pairs``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import io
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from PIL import Image

from service.app.main import create_app
from service.app.settings import Settings
from tests.pairs import PAIR_ARCHS

REPO = Path(__file__).resolve().parents[1]
PG_DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

# plaintext keys for the tests; the settings hold only their SHA-256
KEYS = {
    "predict": "test-predict-key-" + "p" * 24,
    "audit": "test-audit-key-" + "a" * 24,
    "admin": "test-admin-key-" + "x" * 24,
}


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def settings_keys() -> list[str]:
    return [f"{role}-user:{role}:{sha256_hex(key)}" for role, key in KEYS.items()]


def headers(role: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[role]}


# ---------------------------------------------------------------------------------------------- artifacts


def copy_pairs(source: Path, dest: Path, names: tuple[str, ...] = PAIR_ARCHS) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(source / name, dest / name)
    return dest


# ---------------------------------------------------------------------------------------------- databases


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'audit.db'}"


def pg_admin_url() -> str:
    return os.environ.get("CXR_DRIFT_TEST_PG_URL", PG_DEFAULT_URL)


def pg_available() -> bool:
    import sqlalchemy as sa

    engine = sa.create_engine(pg_admin_url(), connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return True
    except Exception:
        return False
    finally:
        engine.dispose()


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (dropped afterwards); skips the test if there is no server."""
    import sqlalchemy as sa

    if not pg_available():
        pytest.skip(f"PostgreSQL not reachable at {pg_admin_url()} (set CXR_DRIFT_TEST_PG_URL)")
    name = f"cxr_api_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_admin_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(pg_admin_url()).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def make_settings(artifacts_dir: Path, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "artifacts_dir": artifacts_dir,
        "database_url": database_url,
        "api_keys": settings_keys(),
        "auth_enabled": True,
        "migrate_on_start": True,
        "ort_threads": 1,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


# ---------------------------------------------------------------------------------------------- images


def chest_like(size: int = 96, *, seed: int = 0) -> np.ndarray:
    """A smooth grayscale image in [0, 1] with two dark "lungs" and noise (not a real radiograph)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.8 - 0.5 * np.exp(-(((xx - 0.3) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    img -= 0.5 * np.exp(-(((xx - 0.7) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    img += 0.05 * rng.standard_normal((size, size))
    return np.clip(img, 0, 1).astype(np.float32)


def png_bytes(gray: np.ndarray, *, bits: int = 8) -> bytes:
    buf = io.BytesIO()
    if bits == 16:
        Image.fromarray((gray * 65535).round().astype(np.uint16)).save(buf, format="PNG")
    else:
        Image.fromarray((gray * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((gray * 255).round().astype(np.uint8), mode="L").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def upload(
    data: bytes, name: str = "image.png", content_type: str = "application/octet-stream"
) -> dict[str, Any]:
    return {"file": (name, data, content_type)}


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error object of a 4xx/5xx answer, checking it has the one documented shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


# ---------------------------------------------------------------------------------------------- clients


class ApiClient:
    """httpx ``AsyncClient(transport=ASGITransport(app))`` inside ``LifespanManager``, driven synchronously.

    The event loop runs in a background thread for the client's lifetime, so one started app (models loaded
    once) serves many tests; ``run`` submits any coroutine (e.g. an ``asyncio.gather`` of requests).
    """

    def __init__(
        self, app: FastAPI, *, raise_app_exceptions: bool = True, startup_timeout: float = 300
    ) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="api-client-loop", daemon=True)
        self.thread.start()
        self._ready: concurrent.futures.Future[httpx.AsyncClient] = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        self._main = asyncio.run_coroutine_threadsafe(
            self._serve(raise_app_exceptions, startup_timeout), self.loop
        )
        waiting: list[concurrent.futures.Future[Any]] = [self._ready, self._main]
        done, _ = concurrent.futures.wait(
            waiting, timeout=startup_timeout + 10, return_when="FIRST_COMPLETED"
        )
        if self._main in done:
            self._main.result()  # startup failed: raise its error
        self.client = self._ready.result(timeout=1)

    async def _serve(self, raise_app_exceptions: bool, startup_timeout: float) -> None:
        self._stop = asyncio.Event()
        async with LifespanManager(self.app, startup_timeout=startup_timeout, shutdown_timeout=60):
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=raise_app_exceptions)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://testserver", timeout=300
            ) as client:
                self._ready.set_result(client)
                await self._stop.wait()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 600) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response: httpx.Response = self.run(self.client.request(method, url, **kwargs))
        return response

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def close(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        try:
            self._main.result(timeout=120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def started(settings: Settings, **kwargs: Any) -> ApiClient:
    return ApiClient(create_app(settings), **kwargs)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
