"""Issue 11, items 4, 5 and 8 (exposure): a sealed manifest, CSV without formulas, one rule for key names,
paths for admins only, local Swagger UI assets and security headers on every answer.

One app (SQLite) serves the module, over copies of the cached test pairs plus two pairs whose manifest was
changed after export: one edited by hand (class names swapped), one re-sealed with a formula as a class name.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.manifest import MANIFEST_FILE, read_manifest
from engine.report import drift_report
from service.app.settings import Settings
from service.audit import chain
from service.audit.queries import csv_cell
from tests.api_fixtures import (
    ApiClient,
    chest_like,
    copy_pairs,
    error_of,
    headers,
    make_settings,
    sha256_hex,
    sqlite_url,
    started,
)

FORMULA_KEY = "=cmd|' /C calc'!A0"


def _swap_class_names(folder: Path) -> None:
    """Edit manifest.json by hand, as anyone with write access to the folder could: the seal is untouched."""
    path = folder / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    names = manifest["class_names"]
    names[0], names[1] = names[1], names[0]
    path.write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="module")
def artifacts(api_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_pairs(api_artifacts, tmp_path_factory.mktemp("exposure") / "artifacts")
    copy_pairs(api_artifacts, root / "_", names=("resnet50v2",))
    (root / "_" / "resnet50v2").rename(root / "edited")
    _swap_class_names(root / "edited")
    copy_pairs(api_artifacts, root / "_", names=("resnet50v2",))
    (root / "_" / "resnet50v2").rename(root / "formula")
    path = root / "formula" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["class_names"][0] = '=HYPERLINK("http://x")'
    from core.manifest import write_manifest

    write_manifest(root / "formula", manifest)  # sealed: only the class-name rule can refuse it
    (root / "_").rmdir()
    return root


@pytest.fixture(scope="module")
def api(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiClient]:
    folder = tmp_path_factory.mktemp("exposure-db")
    with started(make_settings(artifacts, sqlite_url(folder))) as client:
        yield client


# ------------------------------------------------------------------------------------- item 4: manifest


def test_an_edited_manifest_makes_the_pair_not_ready_with_a_reason(api: ApiClient, artifacts: Path) -> None:
    ready = api.get("/readyz")
    assert ready.status_code == 503
    details = error_of(ready)["details"]
    assert details["models_ready"] == ["densenet201", "resnet50v2"]
    failed = {m["name"]: m["reason"] for m in details["models_failed"]}
    assert set(failed) == {"edited", "formula"}
    assert "edited after it was sealed" in failed["edited"] and "cxr-drift seal" in failed["edited"]
    assert "invalid class name '=HYPERLINK" in failed["formula"]
    models = api.get("/models", headers=headers("admin")).json()
    assert {m["name"] for m in models["not_ready"]} == {"edited", "formula"}
    # the edited pair is never served under its swapped labels
    assert all(
        m["class_names"] == read_manifest(artifacts / m["name"])["class_names"] for m in models["ready"]
    )


# ------------------------------------------------------------------------------ item 5: CSV and key names


def test_a_formula_key_name_in_the_settings_is_refused() -> None:
    entry = f"{FORMULA_KEY}:admin:{sha256_hex('k' * 32)}"
    with pytest.raises(ValidationError, match=r"invalid key name"):
        Settings(_env_file=None, api_keys=[entry])  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match=r"invalid key name"):
        Settings(_env_file=None, api_keys=[f"ok\n:admin:{sha256_hex('k' * 32)}"])  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ("=1+1", "'=1+1"),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("normal", "normal"),
        ("a=b", "a=b"),
        (-0.25, -0.25),
        (3, 3),
        (True, True),
    ],
)
def test_csv_cells_that_start_a_formula_are_text(value: object, cell: object) -> None:
    assert csv_cell(value) == cell


def test_csv_export_neutralises_a_formula_key_name_and_class_name(api: ApiClient) -> None:
    """Rows written before the rules (a key named like a formula, a class name from an old manifest) still
    leave the CSV export as text, while numbers, negative ones included, stay numbers."""
    state = api.app.state.cxr
    pair = copy.copy(state.pairs["resnet50v2"])
    pair.class_names = [f'=HYPERLINK("http://x","{n}")' for n in pair.class_names]
    report = drift_report(pair, chest_like(64, seed=3), methods=["layercam"])
    entry = chain.AuditEntry(
        request_id=uuid.uuid4().hex,
        created_at=datetime.now(UTC),
        api_key_name=FORMULA_KEY,
        image_sha256="0" * 64,
        image_format="png",
        image_width=64,
        image_height=64,
        image_nbytes=100,
        options={},
        reports=[report],
        timings_ms={},
    )
    record_id = chain.append(state.engine, entry).id
    response = api.get("/audit/records.csv", headers=headers("audit"))
    assert response.status_code == 200
    rows = [r for r in csv.DictReader(io.StringIO(response.text)) if r["record_id"] == str(record_id)]
    assert len(rows) == 1
    row = rows[0]
    assert row["api_key_name"] == "'" + FORMULA_KEY
    for column in ("target_class", "transfer_class", "finetuned_class"):
        assert row[column].startswith("'=HYPERLINK("), (column, row[column])
    for value in row.values():
        assert not value.startswith(("=", "+", "@", "\t", "\r")), row
        if value.startswith("-"):
            float(value)  # a minus sign leads only numbers


# ------------------------------------------------------------------------------- item 8: exposure


def test_models_shows_server_paths_to_the_admin_role_only(api: ApiClient, artifacts: Path) -> None:
    root = str(artifacts)
    for role in ("predict", "audit"):
        response = api.get("/models", headers=headers(role))
        assert response.status_code == 200
        assert root not in response.text and str(artifacts.parent) not in response.text
        body = response.json()
        assert all(m["folder"] is None for m in body["ready"] + body["not_ready"])
        reasons = {m["name"]: m["reason"] for m in body["not_ready"]}
        assert "edited/manifest.json was edited after it was sealed" in reasons["edited"]
    admin = api.get("/models", headers=headers("admin")).json()
    assert {m["name"]: m["folder"] for m in admin["ready"]} == {
        "densenet201": str(artifacts / "densenet201"),
        "resnet50v2": str(artifacts / "resnet50v2"),
    }
    assert root in admin["not_ready"][0]["reason"]


def test_readyz_needs_no_key_so_it_shows_no_server_path(api: ApiClient, artifacts: Path) -> None:
    response = api.get("/readyz")
    assert response.status_code == 503  # the edited pair is not ready
    assert str(artifacts) not in response.text and str(artifacts.parent) not in response.text
    details = response.json()["error"]["details"]
    failed = {m["name"]: m for m in details["models_failed"]}
    assert "edited" in failed and all(m["folder"] is None for m in failed.values())
    assert "edited/manifest.json was edited after it was sealed" in failed["edited"]["reason"]


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.refs += [v for k, v in found.items() if k in ("src", "href") and v]
        if tag == "script" and "src" not in found:
            self.inline_scripts += 1


def test_docs_load_every_asset_from_the_service_itself(api: ApiClient) -> None:
    page = api.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    parser = _Refs()
    parser.feed(page.text)
    assert parser.inline_scripts == 0 and not re.search(r"https?://|//[a-z]", page.text, re.I)
    assert len(parser.refs) == 4
    for ref in parser.refs:
        assert ref.startswith("/docs/assets/"), ref
        asset = api.get(ref)
        assert asset.status_code == 200 and len(asset.content) > 0, ref
        assert asset.headers["content-type"].split("/")[0] in ("text", "image"), ref
    bundle = api.get("/docs/assets/swagger-ui-bundle.js").text
    assert "SwaggerUIBundle" in bundle and "OpenAPI31" in bundle  # Swagger UI 5: renders OpenAPI 3.1
    init = api.get("/docs/assets/swagger-init.js").text
    assert "validatorUrl: null" in init and "http" not in init
    csp = page.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "http" not in csp
    assert api.get("/redoc").status_code == 404
    assert api.get("/docs/assets/../settings.py").status_code == 404
    assert api.get("/docs/assets/index.html").status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "role", "status"),
    [
        ("GET", "/healthz", None, 200),
        ("GET", "/readyz", None, 503),
        ("GET", "/models", None, 401),
        ("GET", "/models", "predict", 200),
        ("GET", "/audit/records", "audit", 200),
        ("GET", "/audit/records.csv", "audit", 200),
        ("GET", "/audit/verify", "predict", 403),
        ("GET", "/audit/records/abc", "audit", 422),
        ("GET", "/no/such/route", None, 404),
        ("POST", "/predict", "predict", 422),
        ("GET", "/openapi.json", None, 200),
        ("GET", "/docs", None, 200),
    ],
)
def test_every_answer_carries_the_security_headers(
    api: ApiClient, method: str, path: str, role: str | None, status: int
) -> None:
    response = api.request(method, path, headers=headers(role) if role else {})
    assert response.status_code == status, response.text
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"
    if not path.startswith("/docs"):
        assert response.headers["content-security-policy"].startswith("default-src 'none'; frame-ancestors")


def test_the_dashboard_prefix_allows_same_origin_scripts_and_styles() -> None:
    from service.app.headers import headers_for

    csp = dict(headers_for("/dashboard/app.js"))["content-security-policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe-inline" not in csp
    assert dict(headers_for("/dashboardx"))["content-security-policy"].startswith("default-src 'none';")


def test_an_unhandled_error_answer_carries_the_security_headers_too() -> None:
    """The 500 answer is made outside the middleware stack (Starlette's ServerErrorMiddleware)."""
    import asyncio

    from starlette.requests import Request

    from service.app.errors import _unhandled

    scope = {"type": "http", "method": "GET", "path": "/audit/records", "headers": [], "query_string": b""}
    response = asyncio.run(_unhandled(Request(scope), RuntimeError("boom")))
    assert response.status_code == 500
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-request-id"]
