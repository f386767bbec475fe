"""A real uvicorn process (``cxr-drift serve``) on a free loopback port: /healthz and one audited /predict."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.api_fixtures import (
    KEYS,
    chest_like,
    free_port,
    headers,
    png_bytes,
    settings_keys,
    sqlite_url,
    upload,
)


@pytest.mark.slow
def test_live_server_serves_health_and_an_audited_prediction(api_artifacts: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "CXR_DRIFT_ARTIFACTS_DIR": str(api_artifacts),
        "CXR_DRIFT_DATABASE_URL": sqlite_url(tmp_path),
        "CXR_DRIFT_API_KEYS": ",".join(settings_keys()),
        "CXR_DRIFT_ORT_THREADS": "1",
    }
    log = (tmp_path / "server.log").open("w")
    cmd = [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.5)
        assert httpx.get(f"{base}/healthz").json()["status"] == "ok"
        response = httpx.post(
            f"{base}/predict",
            files=upload(png_bytes(chest_like(64, seed=7))),
            data={"models": "resnet50v2"},
            headers=headers("predict"),
            timeout=120,
        )
        assert response.status_code == 200, response.text
        record_id = response.json()["audit_record_id"]
        record = httpx.get(f"{base}/audit/records/{record_id}", headers=headers("audit"))
        assert record.status_code == 200 and record.json()["request_id"] == response.json()["request_id"]
        too_big = httpx.post(
            f"{base}/predict", content=b"\0" * (21 * 1024 * 1024), headers=headers("predict")
        )
        assert too_big.status_code == 413

        # cxr-drift reload: the admin key from the environment, nothing changed, a refusal is exit code 1
        reload = [sys.executable, "-m", "cli.main", "reload", "--url", base, "--reason", "live test"]
        done = subprocess.run(
            reload,
            env={**env, "CXR_DRIFT_API_KEY": KEYS["admin"]},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert "unchanged: densenet201, resnet50v2" in done.stdout and "events: -" in done.stdout
        refused = subprocess.run(
            reload,
            env={**env, "CXR_DRIFT_API_KEY": KEYS["audit"]},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert refused.returncode == 1 and "reload refused (403)" in refused.stderr
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
