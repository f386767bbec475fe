"""The API against real model pairs, a real audit database and the real engine (no mocks).

One app (SQLite) serves the module; tests that need their own database (PostgreSQL, tampering, a database
that dies mid-run) start their own.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from core.vocabulary import METHODS
from tests.api_fixtures import (
    KEYS,
    PAIR_ARCHS,
    ApiClient,
    chest_like,
    error_of,
    fresh_pg_database,
    headers,
    jpeg_bytes,
    make_settings,
    png_bytes,
    sqlite_url,
    started,
    upload,
)
from tests.images import dicom_from_gray
from tests.pairs import SMALL_SIZE

# every route that needs a key: (method, route template, a concrete path, roles allowed besides admin)
PROTECTED = [
    ("GET", "/metrics", "/metrics", {"predict", "audit"}),
    ("GET", "/models", "/models", {"predict", "audit"}),
    ("POST", "/predict", "/predict", {"predict"}),
    ("GET", "/audit/summary", "/audit/summary", {"audit"}),
    ("GET", "/audit/records", "/audit/records", {"audit"}),
    ("GET", "/audit/records.csv", "/audit/records.csv", {"audit"}),
    ("GET", "/audit/records/{record_id}", "/audit/records/1", {"audit"}),
    ("GET", "/audit/verify", "/audit/verify", {"audit"}),
    ("GET", "/audit/model-events", "/audit/model-events", {"audit"}),
    ("POST", "/admin/models/reload", "/admin/models/reload", set()),
]
PUBLIC = [("GET", "/healthz"), ("GET", "/readyz")]


@pytest.fixture(scope="module")
def api(api_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiClient]:
    folder = tmp_path_factory.mktemp("api-sqlite")
    with started(make_settings(api_artifacts, sqlite_url(folder))) as client:
        yield client


def predict(api: ApiClient, data: bytes, *, role: str = "predict", **form: Any) -> httpx.Response:
    return api.post(
        "/predict", files=upload(data), data={k: str(v) for k, v in form.items()}, headers=headers(role)
    )


def _close(actual: Any, expected: Any, where: str = "") -> None:
    """Nested equality with a float tolerance (JSON may round-trip float32 values)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (
            f"{where}: keys {actual} != {expected}"
        )
        for key in expected:
            _close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert isinstance(actual, list | tuple) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _close(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(expected, bool):
        if math.isnan(expected):
            assert actual is None or math.isnan(actual), where
        else:
            assert actual == pytest.approx(expected, rel=1e-5, abs=1e-6), where
    else:
        assert actual == expected, where


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "timings_ms"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- health


def test_healthz_and_readyz_need_no_key(api: ApiClient) -> None:
    assert api.get("/healthz").json()["status"] == "ok"
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["ready"] is True and body["reasons"] == [] and body["database"] == "ok"
    assert body["models_ready"] == sorted(PAIR_ARCHS)


def test_models_lists_loaded_pairs_with_manifests(api: ApiClient, api_artifacts: Path) -> None:
    response = api.get("/models", headers=headers("audit"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["not_ready"] == []
    assert [m["name"] for m in body["ready"]] == sorted(PAIR_ARCHS)
    for model in body["ready"]:
        manifest = json.loads((api_artifacts / model["name"] / "manifest.json").read_text())
        assert model["class_names"] == manifest["class_names"]
        assert model["input_size"] == manifest["input_size"] == SMALL_SIZE[model["name"]]
        assert model["manifest"]["files"] == manifest["files"]


# ---------------------------------------------------------------------------------------------- auth


def test_route_table_covers_every_route(api: ApiClient) -> None:
    """A new route must be added to PROTECTED or PUBLIC, so it gets the auth tests below."""
    paths = api.app.openapi()["paths"]
    actual = {(verb.upper(), path) for path, operations in paths.items() for verb in operations}
    expected = {(m, t) for m, t, _, _ in PROTECTED} | set(PUBLIC)
    assert actual == expected


@pytest.mark.parametrize(
    ("method", "template", "path", "roles"), PROTECTED, ids=[f"{m} {t}" for m, t, _, _ in PROTECTED]
)
def test_every_protected_route_checks_key_and_role(
    api: ApiClient, method: str, template: str, path: str, roles: set[str]
) -> None:
    missing = api.request(method, path)
    assert missing.status_code == 401
    assert error_of(missing)["code"] == "unauthorized"
    assert "WWW-Authenticate" in missing.headers
    wrong = api.request(method, path, headers={"X-API-Key": "not-a-key"})
    assert wrong.status_code == 401 and error_of(wrong)["code"] == "unauthorized"
    for role in ("predict", "audit", "admin"):
        response = api.request(method, path, headers=headers(role))
        if role in roles or role == "admin":
            assert response.status_code not in (401, 403), (role, response.text)
        else:
            assert response.status_code == 403, (role, response.text)
            error = error_of(response)
            assert error["code"] == "forbidden" and error["details"]["role"] == role
    allowed = sorted(roles)[0] if roles else "admin"
    bearer = api.request(method, path, headers={"Authorization": f"Bearer {KEYS[allowed]}"})
    assert bearer.status_code not in (401, 403)


@pytest.mark.parametrize(("method", "path"), PUBLIC)
def test_public_routes_answer_without_key(api: ApiClient, method: str, path: str) -> None:
    assert api.request(method, path).status_code == 200


def test_database_keys_authenticate_and_revoke(api: ApiClient) -> None:
    from service.app import keys

    engine = api.app.state.cxr.engine
    plaintext = keys.create_key(engine, name="db-auditor", role="audit")
    assert api.get("/audit/verify", headers={"X-API-Key": plaintext}).status_code == 200
    assert api.get("/audit/verify", headers={"Authorization": f"Bearer {plaintext}"}).status_code == 200
    assert api.post("/predict", headers={"X-API-Key": plaintext}).status_code == 403
    keys.revoke_key(engine, name="db-auditor")
    assert api.get("/audit/verify", headers={"X-API-Key": plaintext}).status_code == 401


# ---------------------------------------------------------------------------------------------- predict


def test_predict_returns_what_the_engine_computes_and_audits_it(api: ApiClient, api_artifacts: Path) -> None:
    from core.imageio import read_image
    from engine.report import drift_report
    from engine.runtime import ModelPair

    data = png_bytes(chest_like(96, seed=1))
    response = predict(api, data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"]["format"] == "png" and (body["image"]["width"], body["image"]["height"]) == (96, 96)
    assert body["options"] == {
        "models": sorted(PAIR_ARCHS),
        "methods": list(METHODS),
        "target_class": None,
        "topk": 20.0,
        "maps": "none",
    }
    gray = read_image(data)
    for result in body["results"]:
        assert result["maps"] is None
        pair = ModelPair.load(api_artifacts / result["model"], verify=True)
        expected = drift_report(pair, gray, methods=METHODS, target_class=None, topk_percent=20.0).to_dict()
        expected.pop("maps", None)
        got = {k: v for k, v in result.items() if k != "maps"}
        _close(_without_timings(got), _without_timings(json.loads(json.dumps(expected))), result["model"])
        # invariants of the report itself
        for checkpoint in ("transfer", "finetuned"):
            probs = result["predictions"][checkpoint]["probabilities"]
            assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
        ft = result["predictions"]["finetuned"]["index"]
        assert result["agreement"] == (result["predictions"]["transfer"]["index"] == ft)
        assert result["target_class"] == {
            "index": ft,
            "name": result["class_names"][ft],
            "source": "finetuned_prediction",
        }
        assert set(result["methods"]) == set(METHODS)

    record = api.get(f"/audit/records/{body['audit_record_id']}", headers=headers("audit"))
    assert record.status_code == 200, record.text
    stored = record.json()
    assert stored["request_id"] == body["request_id"]
    assert stored["image_sha256"] == body["image"]["sha256"]
    assert stored["row_hash"] == body["audit_row_hash"]
    # the row holds the reports exactly as answered, without maps
    _close(stored["reports"], [{k: v for k, v in r.items() if k != "maps"} for r in body["results"]])


def test_predict_options_raw_maps_and_requested_class(api: ApiClient) -> None:
    response = predict(
        api,
        png_bytes(chest_like(80, seed=2)),
        models="resnet50v2",
        methods="layercam",
        target_class="diffuse_patchy",
        maps="raw",
        topk=10,
    )
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["model"] == "resnet50v2" and list(result["methods"]) == ["layercam"]
    assert (
        result["target_class"]["name"] == "diffuse_patchy" and result["target_class"]["source"] == "requested"
    )
    for checkpoint in ("transfer", "finetuned"):
        cam = np.asarray(result["maps"]["layercam"][checkpoint])
        size = SMALL_SIZE["resnet50v2"]
        assert cam.shape == (size, size) and cam.min() >= 0 and cam.max() <= 1


def test_predict_options_as_query_parameters(api: ApiClient) -> None:
    response = api.post(
        "/predict?models=densenet201&methods=gradcampp&target_class=1&maps=overlay",
        files=upload(jpeg_bytes(chest_like(70, seed=3))),
        headers=headers("predict"),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"]["format"] == "jpeg"
    (result,) = body["results"]
    assert result["target_class"]["index"] == 1 and list(result["methods"]) == ["gradcampp"]
    for checkpoint in ("transfer", "finetuned"):
        png = base64.b64decode(result["maps"]["gradcampp"][checkpoint])
        assert Image.open(io.BytesIO(png)).format == "PNG"


@pytest.mark.parametrize("kind", ["dicom", "png16"])
def test_predict_accepts_dicom_and_16_bit_png(api: ApiClient, kind: str) -> None:
    gray = chest_like(72, seed=4)
    data = dicom_from_gray(gray) if kind == "dicom" else png_bytes(gray, bits=16)
    response = predict(api, data, models="resnet50v2", methods="layercam")
    assert response.status_code == 200, response.text
    assert response.json()["image"]["format"] == ("dicom" if kind == "dicom" else "png")


# ---------------------------------------------------------------------------------------------- audit


def test_audit_routes_agree_with_each_other(api: ApiClient) -> None:
    # a record of the other model too, whatever ran before on this worker (the filter below needs one)
    assert predict(api, png_bytes(chest_like(64, seed=9)), models="resnet50v2").status_code == 200
    ids = [
        predict(api, png_bytes(chest_like(64, seed=10 + i)), models="densenet201").json()["audit_record_id"]
        for i in range(3)
    ]
    audit = headers("audit")
    page = api.get("/audit/records", params={"limit": 2}, headers=audit).json()
    assert [item["id"] for item in page["items"]] == sorted(
        page_ids := [i["id"] for i in page["items"]], reverse=True
    )
    assert page_ids[0] == ids[-1] and page["next_before_id"] == page_ids[-1]
    older = api.get(
        "/audit/records", params={"limit": 2, "before_id": page["next_before_id"]}, headers=audit
    ).json()
    assert all(item["id"] < page_ids[-1] for item in older["items"])

    every = api.get("/audit/records", params={"limit": 500}, headers=audit).json()["items"]
    filtered = api.get("/audit/records", params={"limit": 500, "model": "resnet50v2"}, headers=audit).json()[
        "items"
    ]
    assert 0 < len(filtered) < len(every)

    csv_response = api.get("/audit/records.csv", headers=audit)
    assert csv_response.status_code == 200 and csv_response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(csv_response.text)))
    per_record: dict[str, int] = {}
    for row in rows:
        per_record[row["record_id"]] = per_record.get(row["record_id"], 0) + 1
    assert set(map(int, per_record)) == {item["id"] for item in every}
    assert per_record[str(ids[0])] == len(METHODS)  # one model x both methods

    summary = api.get("/audit/summary", params=[("group_by", "model,method")], headers=audit)
    assert summary.status_code == 200, summary.text
    assert summary.json()["group_by"] == ["model", "method"]
    bad = api.get("/audit/summary", params={"group_by": "planet"}, headers=audit)
    assert (
        bad.status_code == 422
        and "model, architecture, digest, method, class, agreement, day, week" in error_of(bad)["message"]
    )

    verify = api.get("/audit/verify", headers=audit).json()
    assert verify["ok"] is True and verify["checked"] == len(every) and verify["first_bad_id"] is None


def test_metrics_count_requests_and_drift(api: ApiClient) -> None:
    before = _metric_values(api)
    response = predict(api, png_bytes(chest_like(64, seed=20)))
    assert response.status_code == 200
    after = _metric_values(api)
    for result in response.json()["results"]:
        model = result["model"]
        key: MetricKey = ("cxr_drift_predictions_total", (("model", model),))
        assert after[key] - before.get(key, 0) == 1
        for method, report in result["methods"].items():
            labels = (("method", method), ("model", model), ("severity", str(report["severity"])))
            key = ("cxr_drift_drift_reports_total", labels)
            assert after[key] - before.get(key, 0) == 1
    request_key = (
        "cxr_drift_http_requests_total",
        (("method", "POST"), ("route", "/predict"), ("status", "200")),
    )
    assert after[request_key] - before.get(request_key, 0) == 1


MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def _metric_values(api: ApiClient) -> dict[MetricKey, float]:
    response = api.get("/metrics", headers=headers("audit"))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values: dict[MetricKey, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


# ---------------------------------------------------------------------------------------------- integrity


def _drop_triggers(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            names = (
                conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'trigger'").scalars().all()
            )
            for name in names:
                conn.exec_driver_sql(f'DROP TRIGGER "{name}"')
        else:
            rows = conn.exec_driver_sql(
                "SELECT t.tgname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                "WHERE NOT t.tgisinternal"
            ).all()
            for trigger, table in rows:
                conn.exec_driver_sql(f'DROP TRIGGER "{trigger}" ON "{table}"')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


@pytest.mark.slow
def test_tampered_row_is_named_by_verify(api_artifacts: Path, database_url: str) -> None:
    with started(make_settings(api_artifacts, database_url)) as app:

        async def batch() -> list[httpx.Response]:
            return await asyncio.gather(
                *[
                    app.client.post(
                        "/predict",
                        files=upload(png_bytes(chest_like(64, seed=30 + i))),
                        data={"models": "resnet50v2", "methods": "layercam"},
                        headers=headers("predict"),
                    )
                    for i in range(4)
                ]
            )

        responses = app.run(batch())
        assert [r.status_code for r in responses] == [200] * 4
        ids = sorted(r.json()["audit_record_id"] for r in responses)
        head = next(r.json()["audit_row_hash"] for r in responses if r.json()["audit_record_id"] == ids[-1])
        verified = app.get("/audit/verify", headers=headers("audit")).json()
        events = verified.pop("model_events")  # the two start-up loads, in their own chain
        assert events["ok"] is True and events["checked"] == len(PAIR_ARCHS)
        assert verified == {
            "ok": True,
            "checked": 4,
            "first_bad_id": None,
            "reason": None,
            "head_id": ids[-1],
            "head_hash": head,
            "anchor_found": None,
            "since_id": None,
        }
        anchored = app.get("/audit/verify", params={"anchor": head}, headers=headers("audit")).json()
        assert anchored["ok"] is True and anchored["anchor_found"] is True
        hashes = {r.json()["audit_record_id"]: r.json()["audit_row_hash"] for r in responses}
        since = {"since_id": ids[1], "since_hash": hashes[ids[1]]}
        incremental = app.get("/audit/verify", params=since, headers=headers("audit")).json()
        assert incremental["ok"] is True and incremental["checked"] == 2 and incremental["since_id"] == ids[1]
        wrong = app.get(
            "/audit/verify", params={**since, "since_hash": hashes[ids[0]]}, headers=headers("audit")
        ).json()
        assert wrong["ok"] is False and "does not hold the anchored hash" in wrong["reason"]
        engine = app.app.state.cxr.engine
        _drop_triggers(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f"UPDATE audit_records SET image_width = image_width + 1 WHERE id = {ids[2]}"
            )
        verify = app.get("/audit/verify", headers=headers("audit")).json()
        assert verify["ok"] is False and verify["first_bad_id"] == ids[2] and verify["reason"]
        after = app.get("/audit/verify", params=since, headers=headers("audit")).json()
        assert after["ok"] is False and after["first_bad_id"] == ids[2] and after["checked"] == 0


@pytest.mark.slow
def test_no_acknowledged_prediction_without_its_audit_row(api_artifacts: Path, database_url: str) -> None:
    """The database dies while requests are in flight: every 2xx has its committed row, the rest are 503."""
    from service.audit import chain, queries
    from service.audit.db import make_engine

    with started(make_settings(api_artifacts, database_url)) as app:
        state = app.app.state.cxr
        healthy = state.engine
        dead = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nothing_listens_here")

        async def run() -> list[httpx.Response]:
            async def one(i: int) -> httpx.Response:
                return await app.client.post(
                    "/predict",
                    files=upload(png_bytes(chest_like(64, seed=40 + i))),
                    data={"models": "resnet50v2", "methods": "layercam"},
                    headers=headers("predict"),
                )

            first = await asyncio.gather(*[one(i) for i in range(2)])
            second = [asyncio.create_task(one(i)) for i in range(2, 6)]
            await asyncio.sleep(0)  # the second wave is in flight (its image is being decoded) ...
            state.engine = dead  # ... when the database "stops"
            return [*first, *(await asyncio.gather(*second))]

        try:
            responses = app.run(run())
            ready = app.get("/readyz")
        finally:
            state.engine = healthy
            dead.dispose()
        assert ready.status_code == 503 and "audit database" in error_of(ready)["message"]
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        assert len(ok) >= 2 and refused, [r.status_code for r in responses]
        for response in refused:
            assert response.status_code == 503
            assert error_of(response)["code"] == "audit_unavailable"
            assert "results" not in response.text
        for response in ok:
            body = response.json()
            record = queries.get_record(healthy, body["audit_record_id"])
            assert record is not None and record["request_id"] == body["request_id"]
        assert chain.verify(healthy).checked == len(ok)


def test_verify_is_split_over_the_configured_worker_processes(
    api_artifacts: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CXR_DRIFT_VERIFY_WORKERS reaches the walk: with 2, the records are walked in worker processes (none
    here) and the answer is the single walk's."""
    from service.audit import verify as verify_module

    with started(make_settings(api_artifacts, database_url, verify_workers=2)) as app:
        for i in range(4):
            response = app.post(
                "/predict",
                files=upload(png_bytes(chest_like(64, seed=60 + i))),
                data={"models": "resnet50v2", "methods": "layercam"},
                headers=headers("predict"),
            )
            assert response.status_code == 200
        engine = app.app.state.cxr.engine
        single = verify_module.verify(engine, workers=1)
        monkeypatch.setattr(verify_module, "PARALLEL_MIN_ROWS", 1)

        def not_here(*args: Any) -> None:
            raise AssertionError("walked in the request's process")

        monkeypatch.setattr(verify_module, "_walk", not_here)
        answer = app.get("/audit/verify", headers=headers("audit")).json()
        assert answer["ok"] is True and answer["checked"] == 4
        assert (answer["head_id"], answer["head_hash"]) == (single.head_id, single.head_hash)
