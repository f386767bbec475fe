"""Dashboard page latency next to the API call behind it, on seeded audit data (SQLite, in-process client).

    python bench/dashboard_pages.py [--days 14] [--per-day 4] [--repeats 5]

Seeds ``--days`` x ``--per-day`` requests (three models x two methods: ``tests.dashboard_data``), signs in
once and times each page (median of ``--repeats``) with ``/audit/summary`` (what the overview computes: the
grouped statistics and the ranking with its bootstrap) measured in the same run.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.api_fixtures import KEYS, started
from tests.browser.harness import seeded_database, settings_for

PATHS = (
    "/audit/summary?group_by=day&group_by=model&group_by=method",
    "/dashboard",
    "/dashboard/records",
    "/dashboard/records/10",
    "/audit/verify",
    "/dashboard/integrity",
    "/dashboard/models",
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--per-day", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url, written = seeded_database(folder, days=args.days, per_day=args.per_day)
        with started(settings_for(folder, url)) as client:
            form = client.get("/dashboard/sign-in")
            token = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert token is not None
            client.post("/dashboard/sign-in", data={"api_key": KEYS["audit"], "csrf": token.group(1)})
            print(f"{len(written)} requests seeded; median of {args.repeats}")
            print("| path | ms | KiB |\n|---|---|---|")
            for path in PATHS:
                times = []
                for _ in range(args.repeats):
                    started_at = time.perf_counter()
                    response = client.get(path, headers={"X-API-Key": KEYS["audit"]})
                    times.append(time.perf_counter() - started_at)
                    assert response.status_code == 200, (path, response.status_code)
                print(
                    f"| `{path}` | {1000 * statistics.median(times):.0f} | {len(response.content) // 1024} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
