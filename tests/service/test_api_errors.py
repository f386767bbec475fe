"""Every error path of the API answers the one JSON error model with the right status; no input gives a 500."""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import engine.predict
from core.errors import InputError
from service.app.settings import Settings, get_settings
from tests.api_fixtures import (
    ApiClient,
    chest_like,
    copy_pairs,
    error_of,
    headers,
    make_settings,
    png_bytes,
    sqlite_url,
    started,
    upload,
)
from tests.images import dicom_from_gray

MAX_BODY = 200_000
MAX_PIXELS = 100 * 100


@pytest.fixture(scope="module")
def api(api_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiClient]:
    folder = tmp_path_factory.mktemp("api-errors")
    settings = make_settings(
        api_artifacts, sqlite_url(folder), max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS
    )
    app_client = started(settings, raise_app_exceptions=False)

    async def boom() -> None:
        raise RuntimeError("a bug")

    app_client.app.add_api_route("/boom", boom, methods=["GET"])
    yield app_client
    app_client.close()


def post_image(api: ApiClient, data: bytes, **form: str) -> httpx.Response:
    return api.post("/predict", files=upload(data), data=form, headers=headers("predict"))


# ---------------------------------------------------------------------------------------------- limits


def test_declared_body_over_the_cap_is_413_before_reading(api: ApiClient) -> None:
    response = post_image(api, b"\0" * (MAX_BODY + 1))
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "payload_too_large" and error["details"]["limit_bytes"] == MAX_BODY


def test_streamed_body_over_the_cap_is_413_before_the_end(api: ApiClient) -> None:
    chunk = b"x" * 16_384
    total_chunks = 4 * MAX_BODY // len(chunk)
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield (
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n"
        )
        for _ in range(total_chunks):
            sent += 1
            yield chunk

    response = api.post(
        "/predict",
        content=body(),  # no Content-Length: chunked
        headers={**headers("predict"), "Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"
    assert sent * len(chunk) <= MAX_BODY + 2 * len(chunk) < total_chunks * len(chunk)


def test_pixel_cap_is_413(api: ApiClient) -> None:
    response = post_image(api, png_bytes(chest_like(128)))
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "image_too_large" and error["details"]["max_pixels"] == MAX_PIXELS


# ---------------------------------------------------------------------------------------------- inputs


def _corrupt_png() -> bytes:
    good = png_bytes(chest_like(32))
    return good[:40] + b"\x00garbage" * 20  # valid signature and IHDR, broken data


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"hello, this is not an image at all", 415, "unsupported_media_type"),
        (b"GIF89a" + b"\0" * 200, 415, "unsupported_media_type"),
        (_corrupt_png(), 422, "undecodable_image"),
        (b"\x89PNG\r\n\x1a\n", 422, "undecodable_image"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 50, 422, "undecodable_image"),
        (dicom_from_gray(None), 422, "no_pixel_data"),
        (b"", 422, "empty_file"),
    ],
    ids=[
        "text",
        "gif",
        "corrupt-png",
        "png-signature-only",
        "truncated-jpeg",
        "dicom-without-pixels",
        "empty",
    ],
)
def test_bad_images(api: ApiClient, data: bytes, status: int, code: str) -> None:
    response = post_image(api, data)
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code


@pytest.mark.parametrize(
    ("form", "code", "listed"),
    [
        ({"models": "vgg16"}, "unknown_model", "densenet201, resnet50v2"),
        ({"models": "densenet201,nope"}, "unknown_model", "densenet201, resnet50v2"),
        ({"methods": "gradcam"}, "unknown_method", "layercam, gradcampp"),
        ({"target_class": "pneumothorax"}, "unknown_class", "normal, lobar_consolidation"),
        ({"target_class": "5"}, "unknown_class", "0..4"),
        ({"target_class": "-1"}, "unknown_class", "0..4"),
        # str.isdigit() accepts these, int() does not: they once escaped as 500s
        ({"target_class": "--5"}, "unknown_class", "normal, lobar_consolidation"),
        ({"target_class": "\u00b2"}, "unknown_class", "normal, lobar_consolidation"),
        ({"topk": "3"}, "validation_error", "topk"),
        ({"topk": "51"}, "validation_error", "topk"),
        ({"topk": "nan"}, "validation_error", "topk"),
        ({"maps": "jpeg"}, "validation_error", "maps"),
    ],
)
def test_bad_options_are_422_listing_valid_ones(
    api: ApiClient, form: dict[str, str], code: str, listed: str
) -> None:
    response = post_image(api, png_bytes(chest_like(48)), **form)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == code and listed in error["message"] + str(error["details"])


def test_missing_file_field_is_422(api: ApiClient) -> None:
    response = api.post("/predict", data={"models": "densenet201"}, headers=headers("predict"))
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "validation_error" and any("file" in d["loc"] for d in error["details"])


@pytest.mark.filterwarnings("ignore:Unknown encoding:UserWarning")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prefix=st.sampled_from(
        [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\0" * 128 + b"DICM", b"\x08\x00\x05\x00CS"]
    ),
    tail=st.binary(max_size=600),
)
def test_no_byte_string_gives_a_500(api: ApiClient, prefix: bytes, tail: bytes) -> None:
    response = post_image(api, prefix + tail, models="resnet50v2", methods="layercam")
    assert response.status_code in (200, 413, 415, 422), response.text
    if response.status_code != 200:
        error_of(response)


def test_png_header_declaring_a_huge_image_is_413_not_a_bomb(api: ApiClient) -> None:
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )
    response = post_image(api, data)
    assert response.status_code == 413 and error_of(response)["code"] == "image_too_large"


# ---------------------------------------------------------------------------------------------- routing


def test_unknown_route_method_and_record_answer_json(api: ApiClient) -> None:
    missing = api.get("/nope")
    assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
    wrong_method = api.request("DELETE", "/healthz")
    assert wrong_method.status_code == 405 and error_of(wrong_method)["code"] == "method_not_allowed"
    record = api.get("/audit/records/987654", headers=headers("audit"))
    assert record.status_code == 404 and error_of(record)["details"] == {"id": 987654}
    not_int = api.get("/audit/records/abc", headers=headers("audit"))
    assert not_int.status_code == 422 and error_of(not_int)["code"] == "validation_error"
    window = api.get(
        "/audit/records",
        params={"start": "2026-02-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"},
        headers=headers("audit"),
    )
    assert window.status_code == 422 and "must be after start" in error_of(window)["message"]


@pytest.mark.parametrize(
    ("path", "params"),
    [
        # a time without an offset is UTC (it used to reach the database layer naive: 500)
        ("/audit/records", {"start": "2026-01-01T00:00:00"}),
        ("/audit/records.csv", {"start": "2026-01-01T00:00:00"}),
        ("/audit/summary", {"start": "2026-01-01T00:00:00", "end": "2026-01-02T00:00:00Z"}),
        ("/audit/summary", {"end": "2026-01-02"}),
    ],
)
def test_audit_filters_take_times_without_offset_as_utc(
    api: ApiClient, path: str, params: dict[str, str]
) -> None:
    response = api.get(path, params=params, headers=headers("audit"))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/audit/records/99999999999999999999", {}),
        ("/audit/records/0", {}),
        ("/audit/records", {"before_id": "99999999999999999999"}),
        ("/audit/records", {"start": "0001-01-01T00:00:00+05:00"}),
        ("/audit/summary", {"end": "9999-12-31T23:00:00-05:00"}),
        ("/audit/records.csv", {"start": "0001-01-01T00:00:00+05:00"}),
        ("/audit/summary", {"model": "dense\x00net"}),
        ("/audit/records", {"class": "\x00"}),
        ("/audit/verify", {"anchor": "not-a-hash"}),
        ("/audit/verify", {"since_id": "1"}),
        ("/audit/verify", {"since_id": "0", "since_hash": "0" * 64}),
        ("/audit/summary", {"mode": "fast"}),
    ],
)
def test_out_of_range_audit_parameters_are_422_not_500(
    api: ApiClient, path: str, params: dict[str, str]
) -> None:
    response = api.get(path, params=params, headers=headers("audit"))
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "validation_error"


def test_unhandled_exception_is_a_json_500(api: ApiClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="service.app.errors"):
        response = api.get("/boom")
    assert response.status_code == 500
    error = error_of(response)
    assert error["code"] == "internal_error" and "a bug" not in error["message"]
    request_id = error["details"]["request_id"]
    assert len(request_id) == 32 and request_id in error["message"]
    assert response.headers["x-request-id"] == request_id
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "a bug" in str(logged[0].exc_info[1])


def test_every_answer_carries_a_request_id(api: ApiClient) -> None:
    first, second = api.get("/healthz"), api.get("/healthz")
    assert len(first.headers["x-request-id"]) == 32
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


@pytest.mark.parametrize(
    ("raised", "status", "code"),
    [
        (ValueError("an engine bug, not bad input"), 500, "internal_error"),
        (IndexError("another bug"), 500, "internal_error"),
        (InputError("this image cannot be scored", code="invalid_input"), 422, "invalid_input"),
    ],
)
def test_a_bug_in_the_engine_is_a_500_and_bad_input_a_422(
    api: ApiClient, monkeypatch: pytest.MonkeyPatch, raised: Exception, status: int, code: str
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(engine.predict, "drift_report", fail)
    before = api.get("/audit/records", headers=headers("audit")).json()["items"]
    response = post_image(api, png_bytes(chest_like(48)))
    assert response.status_code == status
    error = error_of(response)
    assert error["code"] == code
    if status == 500:
        assert error["details"]["request_id"] == response.headers["x-request-id"]
    else:
        assert str(raised) in error["message"] and error["details"]["model"]
    after = api.get("/audit/records", headers=headers("audit")).json()["items"]
    assert [r["id"] for r in after] == [r["id"] for r in before], "a failed prediction was audited"


# ---------------------------------------------------------------------------------------------- readiness


def test_broken_pair_is_not_ready_with_its_reason(api_artifacts: Path, tmp_path: Path) -> None:
    artifacts = copy_pairs(api_artifacts, tmp_path / "artifacts")
    onnx = artifacts / "resnet50v2" / "finetuned.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"tampered")
    with started(make_settings(artifacts, sqlite_url(tmp_path))) as app:
        ready = app.get("/readyz")
        assert ready.status_code == 503
        error = error_of(ready)
        assert error["code"] == "not_ready" and "finetuned.onnx" in error["message"]
        assert error["details"]["models_ready"] == ["densenet201"]
        models = app.get("/models", headers=headers("predict")).json()
        assert [m["name"] for m in models["ready"]] == ["densenet201"]
        (failed,) = models["not_ready"]
        assert failed["name"] == "resnet50v2" and "finetuned.onnx" in failed["reason"]
        # the healthy pair still serves
        ok = app.post("/predict", files=upload(png_bytes(chest_like(48))), headers=headers("predict"))
        assert ok.status_code == 200 and [r["model"] for r in ok.json()["results"]] == ["densenet201"]
        unknown = app.post(
            "/predict",
            files=upload(png_bytes(chest_like(48))),
            data={"models": "resnet50v2"},
            headers=headers("predict"),
        )
        assert unknown.status_code == 422 and error_of(unknown)["details"]["valid"] == ["densenet201"]


def test_unmigrated_database_is_not_ready_and_refuses_predictions(
    api_artifacts: Path, tmp_path: Path
) -> None:
    settings = make_settings(api_artifacts, sqlite_url(tmp_path), migrate_on_start=False)
    with started(settings) as app:
        ready = app.get("/readyz")
        assert ready.status_code == 503 and "audit database" in error_of(ready)["message"]
        response = app.post(
            "/predict",
            files=upload(png_bytes(chest_like(48))),
            data={"models": "resnet50v2"},
            headers=headers("predict"),
        )
        assert response.status_code == 503
        assert error_of(response)["code"] == "audit_unavailable" and "results" not in response.json()


def test_no_artifacts_is_not_ready_and_predict_is_503(tmp_path: Path) -> None:
    with started(make_settings(tmp_path / "missing", sqlite_url(tmp_path))) as app:
        assert app.get("/healthz").status_code == 200
        ready = app.get("/readyz")
        assert ready.status_code == 503 and "no model pair is loaded" in error_of(ready)["message"]
        response = app.post("/predict", files=upload(png_bytes(chest_like(48))), headers=headers("predict"))
        assert response.status_code == 503 and error_of(response)["code"] == "no_models"


def test_auth_disabled_on_loopback_lets_requests_through(tmp_path: Path) -> None:
    with started(make_settings(tmp_path / "missing", sqlite_url(tmp_path), auth_enabled=False)) as app:
        assert app.get("/audit/verify").status_code == 200
        assert app.get("/metrics").status_code == 200


# ---------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"host": "0.0.0.0", "auth_enabled": False}, "only allowed on a loopback host"),
        ({"max_body_bytes": 0}, "max_body_bytes must be a positive integer"),
        ({"max_pixels": -5}, "max_pixels must be a positive integer"),
        ({"port": 70000}, "port must be in 1..65535"),
        ({"backend": "tensorrt"}, "backend must be one of onnx, torch"),
        ({"ort_threads": 0}, "ort_threads must be >= 1"),
        ({"api_keys": ["alice:predict"]}, "name:role:sha256hex"),
        ({"api_keys": ["alice:root:" + "0" * 64]}, "valid options: predict, audit, admin"),
        ({"api_keys": ["alice:audit:xyz"]}, "64 hex digits"),
        ({"api_keys": ["a:audit:" + "0" * 64, "a:predict:" + "1" * 64]}, "appears twice"),
        ({"database_url": "mysql://x"}, "SQLite"),
        ({"database_url": "postgresql+psycopg2://postgres@db/cxr"}, "psycopg"),
        ({"database_url": "::not a url::"}, "cannot parse"),
        ({"api_keys": ["a:audit:" + "0" * 64, "b:admin:" + "0" * 64]}, "same SHA-256"),
    ],
)
def test_settings_refuse_unsafe_values(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(_env_file=None, **values)  # type: ignore[arg-type,call-arg]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    digest = "ab" * 32
    other = "cd" * 32
    monkeypatch.setenv("CXR_DRIFT_API_KEYS", f"ops:audit:{digest}, ml:predict:{other.upper()}")
    monkeypatch.setenv("CXR_DRIFT_MAX_PIXELS", "1234")
    monkeypatch.setenv("CXR_DRIFT_BACKEND", "TORCH")
    get_settings.cache_clear()
    try:
        settings_ = get_settings()
        assert get_settings() is settings_
        assert [(k.name, k.role, k.sha256) for k in settings_.settings_keys()] == [
            ("ops", "audit", digest),
            ("ml", "predict", other),
        ]
        assert settings_.max_pixels == 1234 and settings_.backend == "torch"
        assert (settings_.host, settings_.port, settings_.auth_enabled) == ("127.0.0.1", 8000, True)
    finally:
        get_settings.cache_clear()
