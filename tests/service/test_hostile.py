"""A hostile client, bounded for the suite: malformed and bomb-like images, pydicom's test files, multipart
abuses, a body that never arrives, decode slots all busy. Every answer is 2xx/4xx (503 only for the decode
bound) with the JSON error model; nothing is logged at ERROR for the client's mistakes.

bench/hostile.py runs the fuller form (every installed pydicom file, schemathesis on both databases).
"""

from __future__ import annotations

import asyncio
import io
import logging
import struct
import warnings
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from service.app.concurrency import decode_limiter
from tests.api_fixtures import (
    ApiClient,
    chest_like,
    error_of,
    headers,
    jpeg_bytes,
    make_settings,
    png_bytes,
    sqlite_url,
    started,
    upload,
)
from tests.images import dicom_bytes

BODY_TIMEOUT_S = 1.0
DECODE_WAIT_S = 0.3


@pytest.fixture(scope="module")
def api(api_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiClient]:
    folder = tmp_path_factory.mktemp("hostile")
    settings = make_settings(
        api_artifacts,
        sqlite_url(folder),
        body_read_timeout_s=BODY_TIMEOUT_S,
        max_concurrent_decodes=1,
        decode_wait_s=DECODE_WAIT_S,
    )
    client = started(settings, raise_app_exceptions=False)
    yield client
    client.close()


def post(api: ApiClient, data: bytes, **form: str) -> httpx.Response:
    form = {"models": "resnet50v2", "methods": "layercam", **form}
    return api.post("/predict", files=upload(data), data=form, headers=headers("predict"))


# ---------------------------------------------------------------------------------------------- corpus


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def zero_png(side: int) -> bytes:
    row = b"\0" * (side + 1)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def patch_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    pos = 2
    while pos < len(out):
        marker, length = out[pos + 1], struct.unpack(">H", out[pos + 2 : pos + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            out[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
            break
        pos += 2 + length
    return bytes(out)


def patch_png_size(data: bytes, width: int, height: int) -> bytes:
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:8] + _chunk(b"IHDR", ihdr) + data[33:]


def malformed_corpus() -> dict[str, tuple[bytes, set[int]]]:
    """name -> (bytes, the statuses allowed). Generated here, small."""
    gray = chest_like(64)
    png, jpeg = png_bytes(gray), jpeg_bytes(gray)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
    palette = io.BytesIO()
    Image.fromarray((gray * 255).astype(np.uint8)).convert("P").save(palette, format="PNG")
    bad = {422}
    return {
        "zero-byte": (b"", bad),
        "png-truncated-half": (png[: len(png) // 2], bad),
        "png-signature-only": (png[:8], bad),
        "png-header-patched-larger": (patch_png_size(png, 64, 4000), bad),
        "png-header-patched-huge": (patch_png_size(png, 60_000, 60_000), {413}),
        "png-all-zero-6000": (zero_png(6000), bad),
        "png-palette": (palette.getvalue(), {200}),
        "png-magic-random": (b"\x89PNG\r\n\x1a\n" + noise, bad),
        "jpeg-truncated-half": (jpeg[: len(jpeg) // 2], bad),
        "jpeg-truncated-half-eoi": (jpeg[: len(jpeg) // 2] + b"\xff\xd9", bad),
        "jpeg-header-patched-1000": (patch_jpeg_size(jpeg, 1000, 1000), bad),
        "jpeg-header-patched-6000": (patch_jpeg_size(jpeg, 6000, 6000), bad),
        "jpeg-magic-random": (b"\xff\xd8\xff" + noise, bad),
        "dicom-magic-random": (b"\0" * 128 + b"DICM" + noise, bad),
        "dicom-no-pixel-data": (dicom_bytes(None), bad),
        "dicom-multiframe": (dicom_bytes(np.stack([gray * 4000, gray * 2000]).round(), frames=2), {200}),
        "dicom-rows-patched": (dicom_bytes((gray * 4000).round(), Rows=640), bad),
        "dicom-wrong-transfer-syntax": (_wrong_syntax(dicom_bytes((gray * 4000).round())), bad),
        "random": (noise, {415}),
        "gif": (b"GIF89a" + noise, {415}),
    }


def _wrong_syntax(data: bytes) -> bytes:
    """Explicit VR Little Endian data under the RLE Lossless transfer syntax UID (same length)."""
    explicit, jpeg = b"1.2.840.10008.1.2.1\0", b"1.2.840.10008.1.2.5\0"  # RLE Lossless
    assert explicit in data
    return data.replace(explicit, jpeg[: len(explicit)], 1)


CORPUS = malformed_corpus()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_malformed_images_get_4xx_json_never_5xx(api: ApiClient, name: str) -> None:
    data, allowed = CORPUS[name]
    response = post(api, data)
    assert response.status_code in allowed, (name, response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = error_of(response)
        assert " at 0x" not in error["message"]


PYDICOM_FILES = [
    "JPGExtended.dcm",
    "JPEGLSNearLossless_16.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEG2000.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_dcmtk_+eb+cy+s4.dcm",
    "MR_small_RLE.dcm",
    "examples_palette.dcm",
    "examples_ybr_color.dcm",  # 30 frames: the first is read
]


@pytest.mark.parametrize("name", PYDICOM_FILES)
def test_compressed_palette_and_multiframe_dicom_are_served(api: ApiClient, name: str) -> None:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not installed")
    response = post(api, Path(path).read_bytes())
    assert response.status_code == 200, response.text[:400]
    assert response.json()["image"]["format"] == "dicom"


# ---------------------------------------------------------------------------------------------- multipart


def test_two_file_parts_are_refused(api: ApiClient) -> None:
    image = png_bytes(chest_like(48))
    files = [("file", ("a.png", image, "image/png")), ("file", ("b.png", image, "image/png"))]
    response = api.post("/predict", files=files, headers=headers("predict"))
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert "exactly one file part" in error["message"] and error["details"] == {"file_parts": 2}


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (
            "multipart/form-data; boundary=xyz",
            b"--xyz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--xyz--\r\n",
        ),
        ("multipart/form-data", b"no boundary"),
        ("multipart/form-data; boundary=xyz", b"--xyz\r\nbroken"),
        ("application/json", b'{"file": "x"}'),
        ("application/x-www-form-urlencoded", b"file=abc"),
    ],
    ids=["nameless-part", "no-boundary", "unterminated", "json", "urlencoded"],
)
def test_multipart_abuses_are_4xx_json(api: ApiClient, content_type: str, body: bytes) -> None:
    response = api.post(
        "/predict", content=body, headers={**headers("predict"), "content-type": content_type}
    )
    assert 400 <= response.status_code < 500, response.text
    error_of(response)


def test_a_declared_body_that_never_arrives_is_408(api: ApiClient) -> None:
    async def stall() -> AsyncIterator[bytes]:
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        await asyncio.sleep(3600)
        yield b""

    async def go() -> httpx.Response:
        return await api.client.post(
            "/predict",
            content=stall(),
            headers={**headers("predict"), "content-type": "multipart/form-data; boundary=xyz"},
        )

    response = api.run(go(), timeout=BODY_TIMEOUT_S + 30)
    assert response.status_code == 408
    error = error_of(response)
    assert error["code"] == "request_timeout" and error["details"] == {"timeout_s": BODY_TIMEOUT_S}
    assert response.headers["connection"] == "close"


# ---------------------------------------------------------------------------------------------- decode bound


def test_busy_decode_slots_give_503_with_retry_after_then_recover(api: ApiClient) -> None:
    limiter = decode_limiter(api.app, api.app.state.cxr.settings)
    image = png_bytes(chest_like(48))
    release = asyncio.Event()
    held = asyncio.Event()

    async def hold() -> None:
        async with limiter.slot():
            held.set()
            await release.wait()

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        holder = asyncio.create_task(hold())
        await held.wait()
        busy = await api.client.post(
            "/predict", files=upload(image), data={"models": "resnet50v2"}, headers=headers("predict")
        )
        # a request that arrives while the slot is busy waits for it (up to decode_wait_s)
        waiting = asyncio.create_task(
            api.client.post(
                "/predict", files=upload(image), data={"models": "resnet50v2"}, headers=headers("predict")
            )
        )
        await asyncio.sleep(DECODE_WAIT_S / 3)
        release.set()
        await holder
        return busy, await waiting

    busy, waited = api.run(scenario(), timeout=120)
    assert busy.status_code == 503, busy.text
    error = error_of(busy)
    assert error["code"] == "overloaded" and error["details"]["max_concurrent_decodes"] == 1
    assert busy.headers["retry-after"] == "1"
    assert waited.status_code == 200, waited.text
    assert limiter.active == 0


# ---------------------------------------------------------------------------------------------- logging


def test_client_decode_failures_are_one_info_line_without_traceback(
    api: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    path = get_testdata_file("JPEG-lossy.dcm")  # every decoder plugin fails on it
    data = Path(path).read_bytes() if path else b"\x89PNG\r\n\x1a\n"
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        response = post(api, data)
        other = post(api, b"\x89PNG\r\n\x1a\n")
    assert response.status_code == 422 and other.status_code == 422
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [(r.name, r.levelname, r.getMessage()[:80]) for r in loud]
    request_id = response.headers["x-request-id"]
    lines = [r for r in caplog.records if r.name == "service.app.errors" and request_id in r.getMessage()]
    assert (
        len(lines) == 1
        and lines[0].levelno == logging.INFO
        and "422 undecodable_image" in lines[0].getMessage()
    )


def test_no_object_address_in_a_422(api: ApiClient) -> None:
    response = post(api, b"\x89PNG\r\n\x1a\n")
    assert response.status_code == 422
    assert " at 0x" not in error_of(response)["message"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_concurrent_decodes": 0}, "max_concurrent_decodes must be >= 1"),
        ({"decode_wait_s": 0}, "decode_wait_s must be a positive number of seconds"),
        ({"body_read_timeout_s": -1}, "body_read_timeout_s must be a positive number of seconds"),
        ({"max_pixels_per_byte": float("nan")}, "max_pixels_per_byte must be a positive number"),
    ],
)
def test_settings_refuse_bad_limits(values: dict[str, object], message: str) -> None:
    from pydantic import ValidationError

    from service.app.settings import Settings

    with pytest.raises(ValidationError, match=message):
        Settings(_env_file=None, **values)  # type: ignore[arg-type,call-arg]
