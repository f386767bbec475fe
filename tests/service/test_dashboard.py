"""The dashboard over HTTP (no browser): sign-in, the session cookie, CSRF, and pages that agree with the
``/audit`` API on the same seeded database. The browser tests (tests/browser) drive the same pages in
Chromium."""

from __future__ import annotations

import csv
import io
import logging
import re
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from service.app import keys
from service.audit import chain
from service.audit.db import make_engine, upgrade
from service.audit.queries import AuditFilters
from service.audit.summary import requests_over_time
from service.dashboard import views
from service.dashboard.session import PRESESSION_COOKIE, SESSION_COOKIE, SessionSigner
from service.dashboard.svg import nice_ticks
from tests.api_fixtures import KEYS, ApiClient, headers, make_settings, sqlite_url, started
from tests.dashboard_data import SEED_START, seed_audit
from tests.db_fixtures import make_entry

DAYS, PER_DAY = 10, 3


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[dict[str, Any]]]:
    folder = tmp_path_factory.mktemp("dashboard")
    url = sqlite_url(folder)
    upgrade(url)
    engine = make_engine(url)
    try:
        written = seed_audit(engine, days=DAYS, per_day=PER_DAY)
    finally:
        engine.dispose()
    (folder / "artifacts").mkdir()
    return folder, url, written


@pytest.fixture(scope="module")
def api(seeded: tuple[Path, str, list[dict[str, Any]]]) -> Iterator[ApiClient]:
    folder, url, _ = seeded
    with started(make_settings(folder / "artifacts", url)) as client:
        yield client


def sign_in(api: ApiClient, key: str, *, next_url: str = "/dashboard") -> httpx.Response:
    """A fresh browser (empty cookie jar): open the sign-in form, post the key with its CSRF token."""
    api.client.cookies.clear()
    form = api.get("/dashboard/sign-in")
    assert form.status_code == 200
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token is not None
    return api.post("/dashboard/sign-in", data={"api_key": key, "csrf": token.group(1), "next": next_url})


def session_csrf(page: httpx.Response) -> str:
    match = re.search(r'action="/dashboard/sign-out".*?name="csrf" value="([^"]+)"', page.text, re.S)
    assert match is not None, "no sign-out form on the page"
    return match.group(1)


# ----------------------------------------------------------------------------------- the signer alone


def test_session_cookie_round_trips_and_rejects_tampering_and_expiry() -> None:
    signer = SessionSigner(b"s" * 32, lifetime_s=60)
    session = signer.new_session(name="alice", role="audit", key_sha256="ab" * 32, now=1000.0)
    value = signer.dumps(session)
    assert signer.loads(value, now=1000.0) == session
    assert signer.loads(value, now=1059.0) == session
    assert signer.loads(value, now=1060.0) is None  # expired
    body, mac = value.split(".")
    forged_body = body[:-2] + ("AA" if body[-2:] != "AA" else "BB")
    assert signer.loads(f"{forged_body}.{mac}", now=1000.0) is None  # payload changed
    assert signer.loads(f"{body}.{mac[:-1]}x", now=1000.0) is None  # signature changed
    assert SessionSigner(b"t" * 32, lifetime_s=60).loads(value, now=1000.0) is None  # another secret
    presession, _ = signer.new_presession()
    assert signer.loads(presession, now=1000.0) is None  # a sign-in token is not a session
    assert signer.presession_token(value) is None
    for junk in (None, "", "abc", "a.b.c", "!!!.???"):
        assert signer.loads(junk, now=1000.0) is None
    with pytest.raises(ValueError):
        SessionSigner(b"short", lifetime_s=60)


# ----------------------------------------------------------------------------------- sign-in over HTTP


def test_pages_redirect_to_sign_in_and_assets_answer_401(api: ApiClient) -> None:
    api.client.cookies.clear()
    for path in (
        "/dashboard",
        "/dashboard/records?flagged=true",
        "/dashboard/integrity",
        "/dashboard/models",
    ):
        response = api.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/dashboard/sign-in?next=%2Fdashboard")
    assert "flagged%3Dtrue" in api.get("/dashboard/records?flagged=true").headers["location"]
    for asset in ("/dashboard/static/dashboard.css", "/dashboard/static/dashboard.js"):
        assert api.get(asset).status_code == 401
    # an API key header is not a session: the dashboard needs the cookie
    assert api.get("/dashboard", headers=headers("admin")).status_code == 303


def test_every_dashboard_route_needs_a_session(api: ApiClient) -> None:
    """A new dashboard route is covered here: without a session it redirects (pages) or answers 401."""
    from fastapi.routing import APIRoute

    from service.dashboard.routes import router

    api.client.cookies.clear()
    routes = [r for r in router.routes if isinstance(r, APIRoute)]
    assert all(r.path.startswith("/dashboard") for r in routes)
    assert len(routes) >= 9
    for route in routes:
        if route.path == "/dashboard/sign-in":
            continue  # the way in
        path = route.path.replace("{record_id}", "1").replace("{name}", "dashboard.css")
        for name, value in (
            ("{model}", "resnet50v2"),
            ("{method}", "layercam"),
            ("{checkpoint}", "transfer"),
        ):
            path = path.replace(name, value)
        for method in route.methods or ():
            response = api.request(method, path)
            if path.startswith("/dashboard/static/") or path.endswith(".png"):  # assets (images: kept maps)
                assert response.status_code == 401, (method, path)
            else:
                assert response.status_code == 303, (method, path)
                assert response.headers["location"].startswith("/dashboard/sign-in?next="), (method, path)


def test_sign_in_sets_a_strict_httponly_cookie_and_never_logs_the_key(
    api: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        response = sign_in(api, KEYS["audit"], next_url="/dashboard/records?flagged=true")
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/records?flagged=true"
    cookie = next(h for h in response.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE + "="))
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "path", "max-age", "samesite"} <= attributes
    assert "samesite=strict" in cookie.lower() and "path=/dashboard" in cookie.lower()
    assert "secure" not in attributes  # not configured here (see the next test)
    assert KEYS["audit"] not in cookie
    assert KEYS["audit"] not in caplog.text
    page = api.get("/dashboard")
    assert page.status_code == 200 and "audit-user" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert api.get("/dashboard/static/dashboard.css").status_code == 200


def test_secure_flag_and_configured_secret(seeded: tuple[Path, str, list[dict[str, Any]]]) -> None:
    folder, url, _ = seeded
    settings = make_settings(
        folder / "artifacts",
        url,
        dashboard_cookie_secure=True,
        dashboard_secret="k" * 40,
        migrate_on_start=False,
    )
    with started(settings) as client:
        # a Secure cookie does not come back over plain http: send the pre-session cookie by hand
        form = client.get("/dashboard/sign-in")
        presession = next(h for h in form.headers.get_list("set-cookie") if h.startswith(PRESESSION_COOKIE))
        assert "secure" in presession.lower()
        token = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert token is not None
        client.client.cookies.clear()
        response = client.post(
            "/dashboard/sign-in",
            data={"api_key": KEYS["admin"], "csrf": token.group(1)},
            headers={"Cookie": presession.split(";")[0]},
        )
        cookie = next(
            h for h in response.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE + "=")
        )
        assert "secure" in cookie.lower()
        value = cookie.split(";")[0].split("=", 1)[1]
    # a second process with the same configured secret accepts the session (replicas, restarts)
    with started(settings) as other:
        other.client.cookies.set(SESSION_COOKIE, value, path="/dashboard")
        assert other.get("/dashboard/models").status_code == 200


def test_predict_key_and_unknown_key_cannot_sign_in(api: ApiClient) -> None:
    refused = sign_in(api, KEYS["predict"])
    assert refused.status_code == 403
    assert "audit or admin" in refused.text
    assert not any(h.startswith(SESSION_COOKIE + "=") for h in refused.headers.get_list("set-cookie"))
    unknown = sign_in(api, "not-a-key-" + "z" * 30)
    assert unknown.status_code == 401 and "unknown or revoked" in unknown.text
    assert api.get("/dashboard").status_code == 303


def test_sign_in_without_the_csrf_token_is_refused(api: ApiClient) -> None:
    api.client.cookies.clear()
    # no pre-session cookie at all (a cross-site form post)
    no_cookie = api.post("/dashboard/sign-in", data={"api_key": KEYS["admin"], "csrf": "x" * 43})
    assert no_cookie.status_code == 403 and "CSRF" in no_cookie.text
    # the cookie, but a form token that does not match it
    api.get("/dashboard/sign-in")
    assert api.client.cookies.get(PRESESSION_COOKIE, path="/dashboard")
    wrong = api.post("/dashboard/sign-in", data={"api_key": KEYS["admin"], "csrf": "y" * 43})
    assert wrong.status_code == 403
    missing = api.post("/dashboard/sign-in", data={"api_key": KEYS["admin"]})
    assert missing.status_code == 403
    assert api.get("/dashboard").status_code == 303


def test_tampered_and_expired_cookies_are_rejected(api: ApiClient) -> None:
    assert sign_in(api, KEYS["admin"]).status_code == 303
    value = api.client.cookies.get(SESSION_COOKIE, path="/dashboard")
    assert value
    _body, mac = value.split(".")
    signer: SessionSigner = api.app.state.dashboard_signer
    payload = signer.loads(value)
    assert payload is not None and payload.role == "admin"
    # the same payload with the role changed but the old signature
    forged = signer.dumps(type(payload)(**{**payload.__dict__, "role": "admin", "name": "mallory"}))
    api.client.cookies.clear()
    api.client.cookies.set(SESSION_COOKIE, forged.split(".")[0] + "." + mac, path="/dashboard")
    assert api.get("/dashboard").status_code == 303
    expired = signer.dumps(
        type(payload)(**{**payload.__dict__, "expires": payload.expires - signer.lifetime_s - 1})
    )
    api.client.cookies.clear()
    api.client.cookies.set(SESSION_COOKIE, expired, path="/dashboard")
    assert api.get("/dashboard").status_code == 303
    assert api.get("/dashboard/static/dashboard.js").status_code == 401


def test_sign_out_needs_the_session_csrf_token(api: ApiClient) -> None:
    sign_in(api, KEYS["audit"])
    page = api.get("/dashboard/models")
    token = session_csrf(page)
    refused = api.post("/dashboard/sign-out", data={"csrf": "wrong"})
    assert refused.status_code == 403
    assert api.get("/dashboard/models").status_code == 200  # still signed in
    assert api.post("/dashboard/sign-out", data={}).status_code == 403
    done = api.post("/dashboard/sign-out", data={"csrf": token})
    assert done.status_code == 303 and "signed_out" in done.headers["location"]
    assert api.get("/dashboard/models").status_code == 303


def test_revoking_the_key_ends_the_session(api: ApiClient) -> None:
    engine = api.app.state.cxr.engine
    key = keys.create_key(engine, name="reviewer-to-revoke", role="audit")
    assert sign_in(api, key).status_code == 303
    assert api.get("/dashboard/integrity").status_code == 200
    keys.revoke_key(engine, name="reviewer-to-revoke")
    assert api.get("/dashboard/integrity").status_code == 303


def test_next_is_kept_inside_the_dashboard(api: ApiClient) -> None:
    for target in ("https://evil.example/", "//evil.example/x", "/audit/records"):
        response = sign_in(api, KEYS["audit"], next_url=target)
        assert response.headers["location"] == "/dashboard", target


# ----------------------------------------------------------------------------------- pages vs the API


@pytest.mark.parametrize(
    "query",
    [
        "",
        "flagged=true",
        "model=inceptionv3&method=gradcampp&severity=high",
        "agreement=false&flagged=",
        f"start={(SEED_START + timedelta(days=2)).date()}&end={(SEED_START + timedelta(days=4)).date()}",
    ],
)
def test_records_page_lists_what_the_api_lists(api: ApiClient, query: str) -> None:
    sign_in(api, KEYS["audit"])
    page = api.get(f"/dashboard/records?{query}&limit=100")
    assert page.status_code == 200
    shown = [int(i) for i in re.findall(r'<a href="/dashboard/records/(\d+)">#', page.text)]
    api_query = "&".join(p for p in query.split("&") if p and not p.endswith("="))
    expected = api.get(f"/audit/records?{api_query}&limit=100", headers=headers("audit")).json()["items"]
    assert shown == [item["id"] for item in expected]
    assert f'<span id="record-count">{len(expected)}</span>' in page.text


def test_records_page_pages_with_before_id(api: ApiClient) -> None:
    sign_in(api, KEYS["audit"])
    first = api.get("/dashboard/records?limit=25")
    older = re.search(r'href="([^"]+)" id="older"', first.text)
    assert older is not None
    second = api.get(older.group(1).replace("&amp;", "&"))
    ids = [int(i) for i in re.findall(r'<a href="/dashboard/records/(\d+)">#', first.text + second.text)]
    assert ids == list(range(DAYS * PER_DAY, 0, -1))


def test_csv_download_is_the_api_csv(api: ApiClient) -> None:
    sign_in(api, KEYS["audit"])
    page = api.get("/dashboard/records?flagged=true&method=layercam")
    link = re.search(r'href="([^"]+)" id="csv-link"', page.text)
    assert link is not None
    mine = api.get(link.group(1).replace("&amp;", "&"))
    theirs = api.get("/audit/records.csv?flagged=true&method=layercam", headers=headers("audit"))
    assert mine.status_code == 200 and mine.headers["content-type"].startswith("text/csv")
    assert mine.text == theirs.text
    rows = list(csv.DictReader(io.StringIO(mine.text)))
    assert rows and all(r["flagged"] == "True" and r["method"] == "layercam" for r in rows)


def test_invalid_filters_say_what_is_wrong(api: ApiClient) -> None:
    sign_in(api, KEYS["audit"])
    for query, needle in (
        ("start=yesterday", "start"),
        ("method=nonsense", "method"),
        ("start=2026-11-05&end=2026-11-01", "must be after start"),
        ("flagged=maybe", "flagged"),
    ):
        response = api.get(f"/dashboard/records?{query}")
        assert response.status_code == 422, query
        assert needle in response.text, query
    assert api.get("/dashboard/records/999999").status_code == 404
    assert api.get("/dashboard/records/abc").status_code == 404


def test_overview_plots_one_point_per_window_model_and_method(
    api: ApiClient, seeded: tuple[Path, str, list[dict[str, Any]]]
) -> None:
    _, _, written = seeded
    sign_in(api, KEYS["audit"])
    page = api.get("/dashboard?window=day")
    assert page.status_code == 200
    # 2 methods x 2 metrics x 3 models x DAYS windows, plus the flagged-rate line (one per day)
    points = re.findall(r'<circle class="point"[^>]*data-series="([^"]+)"', page.text)
    assert Counter(points)["flagged"] == DAYS
    for model in ("densenet201", "resnet50v2", "inceptionv3"):
        assert Counter(points)[model] == 2 * 2 * DAYS
    assert len(re.findall(r'<rect class="bar"', page.text)) == DAYS
    # the bar titles carry the counts, computed here from what was written
    per_day = Counter(w["created_at"].date().isoformat() for w in written)
    flagged = Counter(
        w["created_at"].date().isoformat() for w in written if any(r["flagged"] for r in w["rows"].values())
    )
    for day, n in per_day.items():
        assert f"{day}: {n} requests, {flagged[day]} flagged" in page.text
    assert f'<strong id="total-requests">{len(written)}</strong>' in page.text
    # the ranking and its verdict come from the shared summary
    summary = api.get("/audit/summary", headers=headers("audit")).json()["summary"]["ranking"]
    layercam_order = [e["model"] for e in summary["per_method"]["layercam"]]
    table = re.search(r'id="ranking-layercam".*?</table>', page.text, re.S)
    assert table is not None
    assert [
        m for m in re.findall(r">(densenet201|resnet50v2|inceptionv3)</a>", table.group(0))
    ] == layercam_order
    verdict = summary["comparisons"][0]["reversal"]
    expected = "undetermined" if verdict is None else ("reversal" if verdict else "no reversal")
    assert f">{expected}</span></h3>" in page.text
    # every point links into the records behind it
    link = re.search(r'<a href="(/dashboard/records\?[^"]*model=inceptionv3[^"]*)"><circle', page.text)
    assert link is not None
    assert api.get(link.group(1).replace("&amp;", "&")).status_code == 200


def test_overview_links_stay_inside_the_filtered_time_range(api: ApiClient) -> None:
    sign_in(api, KEYS["audit"])
    # the API also takes Unix seconds: 2026-11-03T12:00:00Z, half-way through the second seeded day
    start = int((SEED_START + timedelta(days=1, hours=12)).timestamp())
    page = api.get(f"/dashboard?start={start}&window=week")
    assert page.status_code == 200
    links = re.findall(r'<a href="(/dashboard/records\?[^"]*)"><rect class="bar"', page.text)
    assert links and "start=2026-11-03T12%3A00%3A00%2B00%3A00" in links[0]
    assert api.get(links[0].replace("&amp;", "&")).status_code == 200


def test_overview_empty_state_says_why(api: ApiClient) -> None:
    sign_in(api, KEYS["audit"])
    page = api.get("/dashboard?start=2030-01-01")
    assert page.status_code == 200
    assert 'id="empty-overview"' in page.text and "No audit records match these filters" in page.text


def test_integrity_page_verifies_anchors(
    api: ApiClient, seeded: tuple[Path, str, list[dict[str, Any]]]
) -> None:
    _, _, written = seeded
    sign_in(api, KEYS["audit"])
    page = api.get("/dashboard/integrity")
    verify = api.get("/audit/verify", headers=headers("audit")).json()
    assert verify["ok"]
    assert f'<code id="head-hash">{verify["head_hash"]}</code>' in page.text and "intact" in page.text
    found = api.get(f"/dashboard/integrity?anchor={written[3]['row_hash'].upper()}")
    assert 'id="anchor-result"' in found.text and "Found:" in found.text
    missing = api.get(f"/dashboard/integrity?anchor={'0' * 63}1")
    assert "Not found" in missing.text
    assert api.get("/dashboard/integrity?anchor=xyz").status_code == 422


def test_models_page_shows_versions_and_paths_to_admins_only(tmp_path: Path, api_artifacts: Path) -> None:
    from core.identity import version_digest
    from core.manifest import read_manifest

    with started(make_settings(api_artifacts, sqlite_url(tmp_path))) as client:
        digests = {
            name: version_digest(read_manifest(folder))
            for name, folder in client.app.state.cxr.folders.items()
        }
        assert digests
        sign_in(client, KEYS["audit"])
        page = client.get("/dashboard/models").text
        for name, digest in digests.items():
            assert f'title="version digest {digest}"' in page and f"{digest[:12]}…" in page, name
        assert "serving since" in page and str(api_artifacts) not in page
        sign_in(client, KEYS["admin"])  # a fresh browser
        assert str(api_artifacts) in client.get("/dashboard/models").text


def test_models_page_empty_state(api: ApiClient) -> None:
    sign_in(api, KEYS["audit"])
    page = api.get("/dashboard/models")
    assert page.status_code == 200 and 'id="empty-models"' in page.text


# ----------------------------------------------------------------------------------- pure pieces


def test_requests_over_time_counts_records_not_rows(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(5)
    times = [SEED_START + timedelta(days=d, hours=h) for d in (0, 0, 1, 8, 8, 8) for h in (3,)]
    for t in times:
        chain.append(db_engine, make_entry(rng, created_at=t))
    days = requests_over_time(db_engine, filters=AuditFilters(), window="day")
    assert [(d["window"], d["requests"]) for d in days] == [
        (SEED_START.date().isoformat(), 2),
        ((SEED_START + timedelta(days=1)).date().isoformat(), 1),
        ((SEED_START + timedelta(days=8)).date().isoformat(), 3),
    ]
    weeks = requests_over_time(db_engine, filters=AuditFilters(), window="week")
    assert [(w["window"], w["requests"]) for w in weeks] == [
        (SEED_START.date().isoformat(), 3),
        ((SEED_START + timedelta(days=7)).date().isoformat(), 3),
    ]
    flagged = requests_over_time(db_engine, filters=AuditFilters(flagged=True), window="week")
    for item in flagged:
        assert item["flagged"] == item["requests"]


def test_parse_filters_reads_the_api_filters() -> None:
    assert set(views.FILTER_FIELDS) == {
        "start",
        "end",
        "model",
        "architecture",
        "digest",
        "method",
        "class",
        "agreement",
        "severity",
        "flagged",
    }
    parsed = views.parse_filters({"start": "2026-11-02", "class": " normal ", "flagged": "", "model": ""})
    assert parsed.errors == []
    assert parsed.filters is not None
    assert parsed.filters.target_class == "normal" and parsed.filters.flagged is None
    assert parsed.filters.start is not None and parsed.filters.start.utcoffset() == timedelta(0)
    assert views.parse_filters({"model": "a\x00b"}).errors


def test_errors_on_pages_are_pages_and_the_api_keeps_json(tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "db"
    folder.mkdir()
    (tmp_path / "artifacts").mkdir()
    with started(make_settings(tmp_path / "artifacts", sqlite_url(folder))) as client:
        assert sign_in(client, KEYS["audit"]).status_code == 303
        refused = client.post("/dashboard/sign-out", data={"csrf": "wrong"})
        assert refused.status_code == 403 and refused.headers["content-type"].startswith("text/html")
        client.app.state.cxr.engine.dispose()
        shutil.rmtree(folder)  # the database is gone: every read fails
        for path in ("/dashboard", "/dashboard/records", "/dashboard/integrity"):
            page = client.get(path)
            assert page.status_code == 503, path
            assert page.headers["content-type"].startswith("text/html") and "retry later" in page.text
        api = client.get("/audit/records", headers=headers("audit"))
        assert api.status_code == 503 and api.json()["error"]["code"] == "database_unavailable"
        csv_answer = client.get("/dashboard/records.csv")
        assert csv_answer.status_code == 503 and csv_answer.json()["error"]["code"] == "database_unavailable"


def test_every_api_filter_has_a_form_field(api: ApiClient) -> None:
    sign_in(api, KEYS["audit"])
    page = api.get("/dashboard/records")
    for name in views.FILTER_FIELDS:
        assert re.search(rf'<(input|select)[^>]*name="{name}"', page.text), name


def test_nice_ticks_cover_the_range() -> None:
    for low, high in ((0.0, 1.0), (0.0, 37.0), (0.12, 0.93), (0.0, 0.0)):
        ticks = nice_ticks(low, high)
        assert ticks[0] <= low and ticks[-1] >= high and len(ticks) >= 2


def test_auth_disabled_opens_the_dashboard_on_loopback(
    seeded: tuple[Path, str, list[dict[str, Any]]],
) -> None:
    folder, url, _ = seeded
    settings = make_settings(folder / "artifacts", url, auth_enabled=False, migrate_on_start=False)
    with started(settings) as client:
        page = client.get("/dashboard/integrity")
        assert page.status_code == 200 and "local (auth disabled)" in page.text
        assert client.get("/dashboard/sign-in").status_code == 303
        assert client.get("/dashboard/static/dashboard.css").status_code == 200
        assert client.post("/dashboard/sign-out", data={"csrf": "forged"}).status_code == 403
        assert client.post("/dashboard/sign-out", data={"csrf": session_csrf(page)}).status_code == 303


def test_model_rows_read_metrics_and_calibration_from_the_manifest() -> None:
    manifest = {
        "architecture": "densenet201",
        "input_size": 224,
        "class_names": ["normal", "lobar_consolidation"],
        "created_at": "2026-11-01T00:00:00Z",
        "cxr_drift_version": "0.1.0",
        "checkpoints": {
            "transfer": {"metrics": {"accuracy": 0.8125, "macro_f1": 0.75}},
            "finetuned": {"metrics": {"accuracy": 0.9}},
        },
        "drift_calibration": {
            "subset": "both_correct",
            "n": 120,
            "score": "1 - top-20% IoU",
            "severity": {"bands": {"moderate": 0.333, "high": 0.667}},
            "methods": {"layercam": {"noise_floor": 0.12, "reference_percentiles": {"50": 0.2, "99": 0.61}}},
        },
    }
    uncalibrated = {**manifest, "architecture": "resnet50v2", "drift_calibration": None}
    rows = views.model_rows({"densenet201": manifest, "resnet50v2": uncalibrated}, {"densenet201": "/a/d"})
    assert [r["name"] for r in rows] == ["densenet201", "resnet50v2"]
    first = rows[0]
    assert dict(first["columns"])["input size"] == "224 px" and first["folder"] == "/a/d"
    assert first["metrics"][0] == {
        "checkpoint": "transfer",
        "cells": {"accuracy": "0.812", "macro_f1": "0.750"},
    }
    assert first["calibration"]["n"] == 120
    assert first["calibration"]["methods"] == [
        {"label": "LayerCAM", "noise_floor": "0.120", "p50": "0.200", "p99": "0.610"}
    ]
    assert rows[1]["calibration"] is None
