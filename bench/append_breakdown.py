"""Where one append's time goes on PostgreSQL, and how much of it holds the chain lock.

    python bench/append_breakdown.py [--appends 200] [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test]

One writer appends the test-suite's entries (3 models x 2 methods) through ``chain.append`` into a fresh
schema (dropped at the end). Each statement is timed from the client (send to result: the round trip and
the server's work), and so is COMMIT; the chain lock is held from the statement that takes it
(``pg_advisory_xact_lock``) to the end of COMMIT. Prints the median per append of each part, of the time
holding the lock and of the whole append; 1 / (lock hold time) bounds appends/s over all replicas.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.audit import chain
from service.audit.db import make_engine, upgrade


def kind_of(statement: str) -> str:
    text = " ".join(statement.split())[:60].lower()
    if "pg_advisory_xact_lock" in text:
        return "lock"
    if text.startswith("select audit_records.row_hash"):
        return "read head"
    if text.startswith("insert into audit_records"):
        return "insert record"
    if text.startswith("insert into audit_drift"):
        return "insert drift rows"
    if "audit_rollup" in text:
        return "rollup"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--appends", type=int, default=200)
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    from tests.db_fixtures import make_entry

    admin = sa.create_engine(sa.make_url(args.pg_url), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    schema = f"breakdown_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = sa.make_url(args.pg_url).update_query_dict({"options": f"-csearch_path={schema}"})
    url_text = url.render_as_string(hide_password=False)
    engine = None
    try:
        upgrade(url_text)
        engine = make_engine(url_text)
        current: dict[str, Any] = {"parts": defaultdict(float), "locked_at": 0.0, "commit_at": 0.0}

        @event.listens_for(engine, "before_cursor_execute")
        def _before(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
            conn.info["t0"] = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def _after(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
            kind = kind_of(statement)
            current["parts"][kind] += time.perf_counter() - conn.info["t0"]
            if kind == "lock":
                current["locked_at"] = conn.info["t0"]

        @event.listens_for(engine, "commit")
        def _commit(conn: Any) -> None:
            current["commit_at"] = time.perf_counter()

        rng = np.random.default_rng(3)
        entries = [make_entry(rng) for _ in range(args.appends + 5)]
        rows: list[dict[str, float]] = []
        for i, entry in enumerate(entries):
            current["parts"] = defaultdict(float)
            t0 = time.perf_counter()
            chain.append(engine, entry)
            t1 = time.perf_counter()
            if i < 5:  # warm-up
                continue
            parts = dict(current["parts"])
            parts["commit"] = t1 - current["commit_at"]  # to append's return
            parts["total"] = t1 - t0
            parts["lock held"] = t1 - current["locked_at"]
            rows.append(parts)
        names = sorted({name for row in rows for name in row})
        out = {name: round(1000 * statistics.median(row.get(name, 0.0) for row in rows), 2) for name in names}
        out["appends"] = len(rows)
        out["bound_appends_per_s"] = round(1000 / out["lock held"], 1)
        print(json.dumps(out, indent=2))
    finally:
        if engine is not None:
            engine.dispose()
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


if __name__ == "__main__":
    main()
