"""Fixtures and helpers for the API tests: model-pair artifacts, keys, databases, images, an ASGI client.

The model pairs are small random-init DenseNet201 and ResNet50V2 at 64 px (the fine-tuned copy perturbed),
exported with ``training.export.export_pair`` through ``tests.pairs``. Exporting takes about a minute on two
cores, so the folders are kept in pytest's cache directory, keyed by a hash of the code that produces them
(a change to export, models, registry or tests/pairs.py rebuilds them).
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
import tempfile
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

REPO = Path(__file__).resolve().parents[1]
PAIR_ARCHS = ("densenet201", "resnet50v2")
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


def _source_fingerprint() -> str:
    digest = hashlib.sha256()
    for rel in ("training/export.py", "training/models.py", "training/registry.py", "tests/pairs.py"):
        path = REPO / rel
        digest.update(path.read_bytes() if path.is_file() else b"-")
    import torch

    digest.update(torch.__version__.encode())
    return digest.hexdigest()[:16]


_BUILT: dict[str, Path] = {}


def build_artifacts(cache_root: Path) -> Path:
    """A folder holding one exported pair per architecture in ``PAIR_ARCHS`` (built once, then reused)."""
    key = _source_fingerprint()
    if key in _BUILT:
        return _BUILT[key]
    final = cache_root / f"pairs-{key}"
    if not (final / "done").is_file():
        from tests.pairs import export_small_pair

        cache_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="pairs-", dir=cache_root))
        for seed, arch in enumerate(PAIR_ARCHS):
            export_small_pair(arch, staging / arch, seed=seed)
        (staging / "done").write_text(key)
        try:
            staging.rename(final)  # atomic: a parallel worker either wins or finds it done
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    _BUILT[key] = final
    return final


def artifacts_for(config: pytest.Config) -> Path:
    """The test model pairs, cached in pytest's cache directory (use from a session-scoped fixture)."""
    cache = getattr(config, "cache", None)
    root = Path(cache.mkdir("cxr-drift-api-pairs")) if cache is not None else Path(tempfile.mkdtemp())
    return build_artifacts(root)


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


def dicom_bytes(gray: np.ndarray | None) -> bytes:
    """A minimal Part-10 DICOM (MONOCHROME2, 16-bit); ``None`` writes one without pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "ANON"
    if gray is not None:
        arr = (gray * 4095).round().astype(np.uint16)
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
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
