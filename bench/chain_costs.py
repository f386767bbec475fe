"""What the hash chain costs per row: full and incremental verification, and appends.

    python bench/chain_costs.py [--records 20000] [--new 10000] [--appends 300] [--db sqlite,postgresql]
                                [--workers 2]

Seeds --records + --new records (3 models x 2 methods, ~4 kB payload) with bench/audit_scale.py's bulk path
(the same rows and chain as ``chain.append``, JSON columns in the form append writes) into a fresh SQLite
file and a fresh PostgreSQL database (dropped at the end), then per database: a full ``chain.verify`` (time
per row) and ``chain.verify(since=...)`` anchored at record --records (so it checks the last --new rows;
p50 of 5), each with one walk and split over --workers processes, alternated; and --appends appends through ``chain.append`` of the test-suite's entries (p50 and appends/s, one
writer). Run it from two checkouts on the same machine to compare code versions. --legacy-json seeds the
JSON columns as rows written before canonical storage hold them (verification then parses them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.audit_scale import Writer, seed
from service.audit import chain
from service.audit.db import upgrade
from service.audit.tables import AuditRecord


def measure(engine: sa.Engine, records: int, new: int, appends: int, workers: int) -> dict[str, Any]:
    """Verification with one walk (workers=1) and split over ``workers`` processes, side by side (the
    pool is started by an untimed call first, as a running service has it), then appends."""
    out: dict[str, Any] = {}
    with engine.connect() as connection:
        anchor = connection.execute(
            sa.select(AuditRecord.row_hash).where(AuditRecord.id == records)
        ).scalar_one()
    chain.verify(engine, batch_size=5000, workers=workers, since=(records, anchor))  # starts the pool
    for label, count in (("1_worker", 1), (f"{workers}_workers", workers)):
        t0 = time.perf_counter()
        full = chain.verify(engine, batch_size=5000, workers=count)
        seconds = time.perf_counter() - t0
        out[f"verify_full_{label}"] = {
            "rows": full.checked,
            "ok": full.ok,
            "s": round(seconds, 2),
            "ms_per_row": round(1000 * seconds / max(full.checked, 1), 3),
        }
    times: dict[int, list[float]] = {1: [], workers: []}
    for _ in range(5):  # alternated, so both see the same machine
        for count in times:
            t0 = time.perf_counter()
            inc = chain.verify(engine, batch_size=5000, since=(records, anchor), workers=count)
            times[count].append(time.perf_counter() - t0)
            assert inc.ok and inc.checked == new, inc
    for count, seconds_list in times.items():
        out[f"verify_incremental_{count}_worker{'s' if count > 1 else ''}"] = {
            "new_rows": new,
            "p50_s": round(statistics.median(seconds_list), 3),
            "all_s": [round(t, 3) for t in seconds_list],
        }
    from tests.db_fixtures import make_entry  # the entries the test-suite appends

    rng = np.random.default_rng(7)
    entries = [make_entry(rng, created_at=datetime.now(UTC)) for _ in range(appends)]
    latencies = []
    for entry in entries:
        t0 = time.perf_counter()
        chain.append(engine, entry)
        latencies.append(time.perf_counter() - t0)
    if not appends:
        return out
    out["append"] = {
        "n": appends,
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "per_s": round(appends / sum(latencies), 1),
    }
    head = chain.verify(engine, batch_size=5000, since=(full.head_id or 0, full.head_hash or ""))
    out["verify_after_appends"] = {"ok": head.ok, "checked": head.checked}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--new", type=int, default=10_000)
    parser.add_argument("--appends", type=int, default=300)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workers", type=int, default=2, help="processes for the split walk")
    parser.add_argument(
        "--legacy-json",
        action="store_true",
        help="seed the JSON columns in the form rows written before canonical storage hold (json.dumps)",
    )
    args = parser.parse_args()
    if args.legacy_json:
        from bench import audit_scale
        from service.audit.db import legacy_stored_json

        audit_scale.stored_json = legacy_stored_json
    names = args.db.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="chain_costs_"))
    urls: dict[str, str] = {}
    pg_name = f"cxr_drift_bench_{uuid.uuid4().hex[:8]}"
    admin = None
    if "sqlite" in names:
        urls["sqlite"] = f"sqlite:///{workdir / 'audit.db'}"
    if "postgresql" in names:
        base = sa.make_url(args.pg_url)
        admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{pg_name}"')
        urls["postgresql"] = base.set(database=pg_name).render_as_string(hide_password=False)
    results: dict[str, Any] = {"records": args.records, "new": args.new}
    writers: list[Writer] = []
    try:
        for url in urls.values():
            upgrade(url)
        writers = [Writer(url) for url in urls.values()]
        results["seed_s"] = round(
            seed(writers, args.records + args.new, args.days, 5000, workers=2)["total_s"], 1
        )
        for name, writer in zip(urls, writers, strict=True):
            results[name] = measure(writer.engine, args.records, args.new, args.appends, args.workers)
            print(name, json.dumps(results[name]), flush=True)
    finally:
        for writer in writers:
            writer.engine.dispose()
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
        if admin is not None:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
            admin.dispose()
        for path in workdir.glob("*"):
            path.unlink()
        workdir.rmdir()


if __name__ == "__main__":
    main()
