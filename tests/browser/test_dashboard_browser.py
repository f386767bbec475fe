"""The dashboard in a real browser: Debian's Chromium driven by Playwright against a real uvicorn server with
a seeded audit database. One browser per module, one fresh context (cookie jar) per test.

Skipped, with the reason, where Chromium or Playwright is missing; ``.ci/run`` installs Chromium so CI
runs them.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_fixtures import KEYS, headers
from tests.browser.harness import chromium_missing, launch, seeded_database, serve, settings_for

pytestmark = pytest.mark.browser

DAYS, PER_DAY = 14, 3
MODELS = ("densenet201", "inceptionv3", "resnet50v2")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = chromium_missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires the browser tests (.ci/run installs Chromium)")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch(playwright)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def site(
    browser: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    folder = tmp_path_factory.mktemp("browser-site")
    url, written = seeded_database(folder, days=DAYS, per_day=PER_DAY)
    with serve(settings_for(folder, url)) as base:
        yield base, written


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    problems: list[str] = []

    def on_console(message: Any) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            problems.append(message.text)  # e.g. a script or style refused by the CSP

    def on_response(response: Any) -> None:
        # a stylesheet, script or image that failed (pages themselves may answer 4xx on purpose)
        failed = response.status >= 400 and response.request.resource_type != "document"
        if failed and not response.url.endswith("/favicon.ico"):
            problems.append(f"{response.status} {response.url}")

    tab.on("console", on_console)
    tab.on("pageerror", lambda error: problems.append(str(error)))
    tab.on("response", on_response)
    try:
        yield tab
        assert problems == [], "the pages must load every asset and run under the strict CSP"
    finally:
        context.close()


def sign_in(page: Any, base: str, key: str, *, path: str = "/dashboard") -> None:
    page.goto(base + path)
    assert "/dashboard/sign-in" in page.url  # no session yet: redirected
    page.fill("#api_key", key)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def api_get(base: str, path: str, **params: Any) -> Any:
    response = httpx.get(base + path, params=params, headers=headers("audit"), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_sign_in_and_see_the_overview_plots(page: Any, site: tuple[str, list[dict[str, Any]]]) -> None:
    base, written = site
    sign_in(page, base, KEYS["audit"])
    assert page.url == base + "/dashboard"
    session = next(c for c in page.context.cookies() if c["name"] == "cxr_dashboard_session")
    assert session["httpOnly"] and session["sameSite"] == "Strict" and session["path"] == "/dashboard"
    assert page.inner_text("#total-requests") == str(len(written))
    # the stylesheet came from the service with the session (the header is styled)
    background = page.eval_on_selector("header.top", "e => getComputedStyle(e).backgroundColor")
    assert background == "rgb(23, 50, 77)"
    # bars per day, and per model one point per day in each of the 2 methods x 2 metrics plots
    assert page.locator("svg.bar-chart rect.bar").count() == DAYS
    for model in MODELS:
        assert page.locator(f'svg.line-chart circle[data-series="{model}"]').count() == 2 * 2 * DAYS
    # the hover title of a point carries its numbers; the point links to its records
    title = page.locator('svg.line-chart circle[data-series="inceptionv3"] title').first.text_content()
    assert "inceptionv3" in title and "mean" in title and "n = " in title
    # a point is drawn: it has a size on screen
    box = page.locator('svg.line-chart circle[data-series="densenet201"]').first.bounding_box()
    assert box is not None and box["width"] > 3
    # the ranking and the verdict from the shared summary
    ranking = api_get(base, "/audit/summary")["summary"]["ranking"]
    expected_order = [e["model"] for e in ranking["per_method"]["layercam"]]
    shown = page.locator("#ranking-layercam tbody tr td:nth-child(2) a").all_inner_texts()
    assert shown == expected_order
    assert page.locator("#verdict .badge").count() == len(ranking["comparisons"])
    # clicking a point opens the records behind it
    page.locator('svg.line-chart a:has(circle[data-series="resnet50v2"])').first.click()
    page.wait_for_url("**/dashboard/records?**")
    assert "model=resnet50v2" in page.url and page.locator("#records tbody tr").count() > 0


def test_predict_key_cannot_sign_in(page: Any, site: tuple[str, list[dict[str, Any]]]) -> None:
    base, _ = site
    sign_in(page, base, KEYS["predict"])
    assert "/dashboard/sign-in" in page.url
    assert "audit or admin" in page.inner_text(".error")
    assert not [c for c in page.context.cookies() if c["name"] == "cxr_dashboard_session"]


def test_filter_records_counts_match_the_api(page: Any, site: tuple[str, list[dict[str, Any]]]) -> None:
    base, _ = site
    sign_in(page, base, KEYS["admin"], path="/dashboard/records")
    assert page.url == base + "/dashboard/records"
    page.select_option("select[name=flagged]", "true")
    page.fill("input[name=model]", "inceptionv3")
    page.select_option("select[name=method]", "layercam")
    page.click(".filters button[type=submit]")
    page.wait_for_url("**flagged=true**")
    assert "model=inceptionv3" in page.url and "method=layercam" in page.url  # the filters are in the URL
    expected = api_get(base, "/audit/records", flagged="true", model="inceptionv3", method="layercam")[
        "items"
    ]
    assert expected, "the seeded data should hold flagged inceptionv3 requests"
    assert page.inner_text("#record-count") == str(len(expected))
    assert page.locator("#records tbody tr").count() == len(expected)
    assert page.locator("#records tbody tr.flagged").count() == len(expected)
    # reload keeps the filters (they live in the URL)
    page.reload()
    assert page.input_value("input[name=model]") == "inceptionv3"
    assert page.inner_text("#record-count") == str(len(expected))


def test_open_a_flagged_record(page: Any, site: tuple[str, list[dict[str, Any]]]) -> None:
    base, _ = site
    sign_in(page, base, KEYS["audit"], path="/dashboard/records?flagged=true")
    first = page.locator("#records tbody tr.flagged a").first
    record_id = first.inner_text().lstrip("#")
    first.click()
    page.wait_for_url(f"**/dashboard/records/{record_id}")
    record = api_get(base, f"/audit/records/{record_id}")
    assert page.locator("h1 .badge.bad").inner_text() == "flagged"
    flagged_pairs = [(d["model"], d["method"]) for d in record["drift"] if d["flagged"]]
    assert flagged_pairs
    assert page.locator("table.methods tr.flagged").count() == len(flagged_pairs)
    assert page.locator("table.predictions").count() == 2 * len(record["reports"])
    assert record["request_id"] in page.inner_text("main")
    # the seeded data keeps the maps of flagged requests (CXR_DRIFT_KEEP_MAPS=flagged): every one loads
    assert record["maps"]["kept"] is True
    images = page.locator(".maps img")
    expected = sum(len(c) for by in record["maps"]["models"].values() for c in by.values())
    assert images.count() == expected + len(record["reports"])  # + one colour scale per model
    page.wait_for_load_state("networkidle")
    widths = page.eval_on_selector_all(".maps img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
    assert widths and all(w > 0 for w in widths), widths
    assert page.locator(".map-legend img").first.evaluate("e => e.naturalWidth") == 256


def test_verify_the_chain_and_an_anchor(page: Any, site: tuple[str, list[dict[str, Any]]]) -> None:
    base, written = site
    sign_in(page, base, KEYS["audit"], path="/dashboard/integrity")
    verify = api_get(base, "/audit/verify")
    assert page.inner_text("#chain-status") == "intact"
    head = page.inner_text("#head-hash")
    assert head == verify["head_hash"] == written[-1]["row_hash"]
    page.fill("#anchor", written[5]["row_hash"])
    page.click(".anchor-form button")
    page.wait_for_url("**anchor=**")
    assert page.inner_text("#anchor-result").startswith("Found")
    page.fill("#anchor", "f" * 64)
    page.click(".anchor-form button")
    page.wait_for_load_state()
    assert page.inner_text("#anchor-result").startswith("Not found")


def test_layout_fits_1280_and_laptop_widths(page: Any, site: tuple[str, list[dict[str, Any]]]) -> None:
    base, _ = site
    sign_in(page, base, KEYS["audit"])
    for width in (1280, 1024):
        page.set_viewport_size({"width": width, "height": 800})
        for path in ("/dashboard", "/dashboard/records", "/dashboard/integrity", "/dashboard/models"):
            page.goto(base + path)
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{path} at {width} px overflows by {overflow} px"


def test_sign_out(page: Any, site: tuple[str, list[dict[str, Any]]]) -> None:
    base, _ = site
    sign_in(page, base, KEYS["audit"])
    page.click("header form button")
    page.wait_for_url("**/dashboard/sign-in?signed_out=true")
    page.goto(base + "/dashboard/models")
    assert "/dashboard/sign-in" in page.url


def test_tampered_database_is_reported(browser: Any, tmp_path: Path) -> None:
    url, written = seeded_database(tmp_path, days=3, per_day=2)
    database = sqlite3.connect(tmp_path / "audit.db")
    try:
        for (name,) in database.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            database.execute(f'DROP TRIGGER "{name}"')
        victim = written[3]["id"]
        database.execute("UPDATE audit_drift SET iou = 0.999 WHERE record_id = ?", (victim,))
        database.commit()
    finally:
        database.close()
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        tab = context.new_page()
        with serve(settings_for(tmp_path, url, migrate_on_start=False)) as base:
            sign_in(tab, base, KEYS["audit"], path="/dashboard/integrity")
            assert tab.inner_text("#chain-status") == "BROKEN"
            summary = tab.inner_text("#chain-summary")
            assert f"#{victim}" in summary and "content hash mismatch" in summary
            tab.click("#chain-summary a")
            tab.wait_for_url(f"**/dashboard/records/{victim}")
    finally:
        context.close()
