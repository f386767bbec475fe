"""Screenshots of every dashboard page for seeded demo data, for the README (docs/dashboard/*.png).

    PYTHONPATH=. python -m tests.browser.screenshots [--out docs/dashboard] [--artifacts demo/artifacts]

Seeds a fresh SQLite audit database (``tests.dashboard_data.seed_audit``: 14 days x 4 requests, three models,
both methods), serves the app with uvicorn on a free loopback port, signs in with an admin key and saves a
1280 px wide PNG of each page with Debian's Chromium. ``--artifacts`` names the model pairs the Models page
shows (default: the small exported test pairs, built on first use, about a minute).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.api_fixtures import KEYS, copy_pairs
from tests.browser.harness import chromium_missing, launch, seeded_database, serve, settings_for

PAGES = (
    ("overview", "/dashboard", True),
    ("records", "/dashboard/records?flagged=true&limit=25", True),
    ("record", None, True),
    ("integrity", None, False),
    ("models", "/dashboard/models", False),
)


def _default_artifacts() -> Path:
    from tests.pairs import cached_pairs

    return cached_pairs(None)  # type: ignore[arg-type]  # no pytest config: a temp-folder cache


def _shrink(path: Path) -> None:
    """A 256-colour palette PNG: a flat UI screenshot looks the same at a third of the size."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard"))
    parser.add_argument("--artifacts", type=Path, default=None, help="model pairs for the Models page")
    args = parser.parse_args(argv)
    reason = chromium_missing()
    if reason is not None:
        parser.error(reason)
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cxr-dashboard-shots-") as tmp:
        folder = Path(tmp)
        artifacts = args.artifacts or copy_pairs(_default_artifacts(), folder / "artifacts")
        url, written = seeded_database(folder, days=14, per_day=4)
        with serve(settings_for(folder, url, artifacts=artifacts)) as base, sync_playwright() as playwright:
            browser = launch(playwright)
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.goto(base + "/dashboard/sign-in")
            page.screenshot(path=str(args.out / "sign-in.png"))
            _shrink(args.out / "sign-in.png")
            page.fill("#api_key", KEYS["admin"])
            page.click("button[type=submit]")
            page.wait_for_url(base + "/dashboard")
            flagged = next(
                w["id"] for w in reversed(written) if any(r["flagged"] for r in w["rows"].values())
            )
            paths = {
                "record": f"/dashboard/records/{flagged}",
                "integrity": f"/dashboard/integrity?anchor={written[len(written) // 2]['row_hash']}",
            }
            for name, path, full in PAGES:
                page.goto(base + (path or paths[name]))
                page.wait_for_load_state("networkidle")
                target = args.out / f"{name}.png"
                page.screenshot(path=str(target), full_page=full)
                _shrink(target)
                print(f"{target} ({target.stat().st_size // 1024} KiB)")
            browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
