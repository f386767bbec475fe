"""Appends per second through ``chain.append`` into a new database, with the code on PYTHONPATH.

    PYTHONPATH=<checkout> python bench/append_rate.py {sqlite,postgresql} [N] [--pg-url URL]

Run it with PYTHONPATH pointing at two checkouts (before/after a change) for a side-by-side ratio: it appends
20 warm-up entries and then N (default 150) of the test-suite's entries (``tests.db_fixtures.make_entry``),
and drops the database (a temporary SQLite file or a new PostgreSQL database) at the end.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from service.audit import chain
from service.audit.db import make_engine, upgrade
from tests.db_fixtures import make_entry


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("db", choices=["sqlite", "postgresql"])
    parser.add_argument("n", type=int, nargs="?", default=150)
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    admin = None
    folder = Path(tempfile.mkdtemp(prefix="append_rate_"))
    name = f"cxr_drift_bench_append_{uuid.uuid4().hex[:8]}"
    if args.db == "sqlite":
        url = f"sqlite:///{folder / 'audit.db'}"
    else:
        base = sa.make_url(args.pg_url)
        admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url = base.set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        engine = make_engine(url)
        rng = np.random.default_rng(1)
        for _ in range(20):
            chain.append(engine, make_entry(rng, created_at=datetime.now(UTC)))
        began = time.perf_counter()
        for _ in range(args.n):
            chain.append(engine, make_entry(rng, created_at=datetime.now(UTC)))
        seconds = time.perf_counter() - began
        engine.dispose()
        print(f"{args.db}: {args.n / seconds:.1f} appends/s ({1000 * seconds / args.n:.1f} ms each)")
    finally:
        if admin is not None:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.dispose()
        for path in folder.glob("*"):
            path.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
