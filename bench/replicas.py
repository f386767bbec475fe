"""Several writer processes (service replicas) appending to one PostgreSQL audit chain: throughput, and where
it serialises.

    python bench/replicas.py [--writers 1,2,4] [--seconds 20] [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test]

Each writer is a separate process with its own engine (as a uvicorn replica is) appending entries of 3 models
x 2 methods (the test-suite's ``make_entry``) through ``chain.append`` for --seconds. Per writer count, in a
fresh schema: appends/s in total, p50/p95 of one append, the time a writer spends outside ``append`` (building
the entry: what replicas do in parallel), and afterwards: the chain verifies, and every acknowledged append
is exactly one row with that hash. ``append`` holds the chain lock (``pg_advisory_xact_lock``) from reading
the head to commit, so the writers serialise on it: the bound on throughput is 1 / (time the lock is held),
which the single-writer append latency measures; more writers only overlap the work outside the lock.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def writer(url: str, index: int, seconds: float, start_at: Any, ready: Any, out: Any) -> None:
    from service.audit import chain
    from service.audit.db import make_engine
    from tests.db_fixtures import make_entry

    engine = make_engine(url)
    rng = np.random.default_rng(1000 + index)
    results, latencies, outside = [], [], 0.0
    chain.append(engine, make_entry(rng))  # warm the connection pool and imports (not counted)
    ready.put(index)
    while start_at.value == 0.0 or time.time() < start_at.value:
        time.sleep(0.001)
    end = start_at.value + seconds
    while time.time() < end:
        t0 = time.perf_counter()
        entry = make_entry(rng)
        t1 = time.perf_counter()
        result = chain.append(engine, entry)
        latencies.append(time.perf_counter() - t1)
        outside += t1 - t0
        results.append((result.id, result.row_hash))
    engine.dispose()
    out.put({"index": index, "results": results, "latencies": latencies, "outside_s": outside})


def run(base_url: str, writers: int, seconds: float) -> dict[str, Any]:
    from service.audit import chain
    from service.audit.db import make_engine, upgrade
    from service.audit.tables import AuditRecord

    admin = sa.create_engine(sa.make_url(base_url), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    schema = f"replicas_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = sa.make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
    url_text = url.render_as_string(hide_password=False)
    try:
        upgrade(url_text)
        context = multiprocessing.get_context("spawn")
        queue, ready = context.Queue(), context.Queue()
        start_at = context.Value("d", 0.0)  # set once every writer has started and warmed up
        processes = [
            context.Process(target=writer, args=(url_text, i, seconds, start_at, ready, queue))
            for i in range(writers)
        ]
        for process in processes:
            process.start()
        for _ in processes:
            ready.get(timeout=300)
        start_at.value = time.time() + 0.2
        reports = [queue.get(timeout=seconds + 120) for _ in processes]
        for process in processes:
            process.join()
        acknowledged = [pair for report in reports for pair in report["results"]]
        latencies = [x for report in reports for x in report["latencies"]]
        engine = make_engine(url_text)
        verdict = chain.verify(engine, batch_size=5000)
        with engine.connect() as connection:
            stored = dict(connection.execute(sa.select(AuditRecord.id, AuditRecord.row_hash)).all())
        engine.dispose()
        matched = sum(1 for record_id, row_hash in acknowledged if stored.get(record_id) == row_hash)
        counted = len(acknowledged)
        return {
            "writers": writers,
            "appends": counted,
            "appends_per_s": round(counted / seconds, 1),
            "append_ms_p50": round(1000 * statistics.median(latencies), 2),
            "append_ms_p95": round(1000 * float(np.percentile(latencies, 95)), 2),
            "outside_append_share": round(sum(r["outside_s"] for r in reports) / (writers * seconds), 3),
            "chain_ok": verdict.ok,
            "rows": len(stored),
            "rows_expected": counted + writers,  # + one warm-up append per writer
            "acknowledged_matched": matched,
        }
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--writers", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for count in (int(x) for x in args.writers.split(",")):
        result = run(args.pg_url, count, args.seconds)
        print(json.dumps(result))
        results.append(result)
    base = results[0]["appends_per_s"]
    for result in results:
        result["speedup_vs_first"] = round(result["appends_per_s"] / base, 2) if base else None
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
