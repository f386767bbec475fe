"""Upload routes answer 401/403 from the headers alone, before the multipart body is read."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.api_fixtures import (
    ApiClient,
    chest_like,
    error_of,
    headers,
    make_settings,
    png_bytes,
    sqlite_url,
    started,
)

BOUNDARY = "cxrdriftboundary"


@pytest.fixture(scope="module")
def api(api_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiClient]:
    folder = tmp_path_factory.mktemp("upload-auth")
    client = started(make_settings(api_artifacts, sqlite_url(folder)))
    yield client
    client.close()


def _multipart(image: bytes) -> list[bytes]:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return [head, image, f"\r\n--{BOUNDARY}--\r\n".encode()]


def _post(api: ApiClient, extra_headers: dict[str, str]) -> tuple[int, dict[str, object], int]:
    """POST /predict with a streamed body; returns (status, error or {}, number of body chunks consumed)."""
    chunks = _multipart(png_bytes(chest_like(64)))
    consumed = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal consumed
        for chunk in chunks:
            consumed += 1
            yield chunk

    response = api.post(
        "/predict",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}", **extra_headers},
    )
    error = error_of(response) if response.status_code >= 400 else {}
    return response.status_code, error, consumed


@pytest.mark.parametrize(
    ("extra", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        ({"X-API-Key": "not-a-key"}, 401, "unauthorized"),
        ({"Authorization": "Bearer not-a-key"}, 401, "unauthorized"),
        (headers("audit"), 403, "forbidden"),
    ],
    ids=["missing", "wrong-header-key", "wrong-bearer", "wrong-role"],
)
def test_rejected_before_the_body_is_read(
    api: ApiClient, extra: dict[str, str], status: int, code: str
) -> None:
    got, error, consumed = _post(api, extra)
    assert got == status and error["code"] == code
    assert consumed == 0, f"{consumed} body chunks were read before the {status}"


def test_a_valid_key_still_reaches_the_route(api: ApiClient) -> None:
    got, error, consumed = _post(api, headers("predict"))
    assert got == 200, error
    assert consumed == 3
