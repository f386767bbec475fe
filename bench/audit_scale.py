"""A million-record audit log on SQLite and PostgreSQL: seed it, time the summaries and the verification.

    python bench/audit_scale.py [--records 1000000] [--days 365] [--db sqlite,postgresql] [--repeats 5]

Seeding is a bulk path that produces the same rows and the same verifiable chain as ``chain.append``:
``chain.drift_rows_from_reports``-shaped drift rows, ``chain.compute_row_hash`` over each record linked to the
previous one, the rollup from ``rollup.accumulate`` (the function append uses); rows are written with
``executemany`` (SQLite) or ``COPY`` (PostgreSQL) in chunks, both databases from one generated stream, each in
a fresh database (PostgreSQL: a new database, dropped at the end unless --keep). Every record has 3 models x
2 methods (6 drift rows) spread over --days UTC days; the stored payload is shaped like a real one (reports
with predictions, metrics, timings; ~1.5 kB).

Then per database: ``summarize()`` p50/min over --repeats for the typical group-bys (model x method, day x
model, class x method: "version" is not a column on this branch, class is the stand-in dimension and goes to
the exact path), with and without filters, in mode auto (the rollup where it can answer) and, up to
--exact-max records, mode exact; the share of the call spent on the sampled reversal test; a full
``chain.verify``; then --incremental more records appended through the real ``chain.append`` and timed with
``chain.verify(since=...)``; and ``rollup.check``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.audit import chain, rollup
from service.audit.db import make_engine, stored_json, upgrade
from service.audit.queries import AuditFilters
from service.audit.summary import summarize
from service.audit.tables import METRIC_COLUMNS, AuditRollup

MODELS = ("densenet201", "inceptionv3", "resnet50v2")
METHODS = ("gradcampp", "layercam")
CLASSES = ("normal", "lobar_consolidation", "lower_zone_opacities", "diffuse_opacity", "upper_zone_nodules")
START = datetime(2025, 12, 1, tzinfo=UTC)
RECORD_COLUMNS = ("id", *chain.RECORD_CONTENT, "prev_hash", "row_hash")  # the stored columns
DRIFT_COLUMNS = ("id", "record_id", *chain.DRIFT_CONTENT)


# --------------------------------------------------------------------------------------------- generating


def _round(x: float) -> float:
    return float(round(x, 6)) + 0.0


def generate(n: int, days: int, seed: int) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(record values as append stores them, drift rows) for ``n`` requests over ``days`` days."""
    rng = np.random.default_rng(seed)
    span = timedelta(days=days).total_seconds()
    # per model x method a different mean IoU, so the ranking and the reversal test have something to find
    base = {("densenet201", "gradcampp"): 0.46, ("inceptionv3", "gradcampp"): 0.50}
    base |= {("resnet50v2", "gradcampp"): 0.54, ("densenet201", "layercam"): 0.55}
    base |= {("inceptionv3", "layercam"): 0.51, ("resnet50v2", "layercam"): 0.47}
    for i in range(n):
        created = START + timedelta(seconds=span * i / n + float(rng.uniform(0, 0.5)))
        reports, drift = [], []
        for model in MODELS:
            finetuned = CLASSES[int(rng.integers(0, len(CLASSES)))]
            transfer = finetuned if rng.random() < 0.85 else CLASSES[int(rng.integers(0, len(CLASSES)))]
            methods = {}
            for method in METHODS:
                iou = float(np.clip(rng.normal(base[(model, method)], 0.15), 0, 1))
                metrics = {name: _round(float(rng.beta(2, 5))) for name in METRIC_COLUMNS}
                metrics |= {"iou": _round(iou), "dice": _round(2 * iou / (1 + iou))}
                metrics |= {
                    name: _round(float(rng.uniform(-1, 1))) for name in ("pearson", "spearman", "ssim")
                }
                metrics |= {
                    name: _round(float(rng.normal(0, 0.2))) for name in ("entropy_change", "gini_change")
                }
                score = _round(1 - iou)
                index = _round(float(np.clip((score - 0.2) / 0.6, 0, 1)))
                severity = "high" if index >= 0.7 else ("moderate" if index >= 0.4 else "low")
                percentile = _round(float(rng.uniform(0, 100)))
                methods[method] = {
                    "metrics": {**metrics, "iou_k": {"5": _round(iou), "10": _round(iou)}},
                    "drift_score": score,
                    "drift_index": index,
                    "severity": severity,
                    "flagged": severity == "high",
                    "reference_percentile": percentile,
                    "flags": [],
                    "diagnostics": {"eps_fraction": _round(float(rng.uniform(0, 0.1)))},
                }
                drift.append(
                    {
                        "model": model,
                        "method": method,
                        "target_class": finetuned,
                        "transfer_class": transfer,
                        "finetuned_class": finetuned,
                        "agreement": transfer == finetuned,
                        "drift_score": score,
                        "severity": severity,
                        "flagged": severity == "high",
                        **{name: metrics[name] for name in METRIC_COLUMNS},
                        "drift_index": index,
                        "reference_percentile": percentile,
                        "head_scale_control_iou": _round(min(1.0, iou + 0.05))
                        if method == "gradcampp"
                        else None,
                        "model_architecture": model,  # revision 0004's identity (no digest: no real pair)
                        "model_digest": None,
                    }
                )
            reports.append(
                {
                    "model": model,
                    "predictions": {
                        "transfer": {"class": transfer, "p": _round(float(rng.uniform(0.3, 1)))},
                        "finetuned": {"class": finetuned, "p": _round(float(rng.uniform(0.3, 1)))},
                    },
                    "agreement": transfer == finetuned,
                    "target_class": {"name": finetuned, "source": "finetuned_prediction"},
                    "methods": methods,
                    "timings_ms": {"forward": _round(float(rng.uniform(5, 50)))},
                }
            )
        record = {
            "request_id": uuid.UUID(bytes=rng.bytes(16)).hex,
            "created_at": created,
            "api_key_name": "bench",
            "image_sha256": rng.bytes(32).hex(),
            "image_format": "png",
            "image_width": 2048,
            "image_height": 2048,
            "image_nbytes": int(rng.integers(1_000_000, 8_000_000)),
            "options": {"methods": list(METHODS), "topk_percent": 20.0, "target_class": None},
            "payload": {"reports": reports, "timings_ms": {"total": _round(float(rng.uniform(50, 500)))}},
        }
        yield record, drift


# ----------------------------------------------------------------------------------------------- writing


class Writer:
    """Bulk writes of already-chained rows to one database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self.seconds = 0.0

    def write(self, records: list[dict[str, Any]], drift: list[dict[str, Any]]) -> None:
        began = time.perf_counter()
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            if self.dialect == "postgresql":
                self._copy(cursor, "audit_records", RECORD_COLUMNS, records)
                self._copy(cursor, "audit_drift", DRIFT_COLUMNS, drift)
            else:
                cursor.execute("BEGIN IMMEDIATE")
                for table, columns, rows in (
                    ("audit_records", RECORD_COLUMNS, records),
                    ("audit_drift", DRIFT_COLUMNS, drift),
                ):
                    marks = ", ".join("?" * len(columns))
                    cursor.executemany(
                        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                        [tuple(self._sqlite_value(row[c]) for c in columns) for row in rows],
                    )
            raw.commit()
        finally:
            raw.close()
        self.seconds += time.perf_counter() - began

    @staticmethod
    def _sqlite_value(value: Any) -> Any:
        if isinstance(value, datetime):  # as UtcDateTime stores it
            return value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
        if isinstance(value, dict):
            return stored_json(value)
        return value

    @staticmethod
    def _copy(cursor: Any, table: str, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
        with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([stored_json(row[c]) if isinstance(row[c], dict) else row[c] for c in columns])

    def finish(self, rollups: dict[tuple[str, str, str], rollup.Accumulator]) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                sa.insert(AuditRollup),
                [
                    {"day": k[0], "model": k[1], "method": k[2], **acc.values()}
                    for k, acc in sorted(rollups.items())
                ],
            )
            if self.dialect == "postgresql":
                for table in ("audit_records", "audit_drift"):
                    connection.exec_driver_sql(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
                    )
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("ANALYZE" if self.dialect == "sqlite" else "VACUUM ANALYZE")


def seed(writers: list[Writer], n: int, days: int, chunk: int) -> dict[str, float]:
    prev = chain.GENESIS_HASH
    rollups: dict[tuple[str, str, str], rollup.Accumulator] = {}
    records: list[dict[str, Any]] = []
    drift: list[dict[str, Any]] = []
    drift_id = 0
    hashing = 0.0

    def flush() -> None:
        for writer in writers:
            writer.write(records, drift)
        for key, acc in rollup.accumulate(drift_with_time).items():
            if key in rollups:
                rollups[key].merge(acc)
            else:
                rollups[key] = acc
        records.clear()
        drift.clear()
        drift_with_time.clear()

    drift_with_time: list[dict[str, Any]] = []
    began = time.perf_counter()
    for i, (record, rows) in enumerate(tqdm(generate(n, days, seed=0), total=n, desc="seed", unit="rec"), 1):
        t0 = time.perf_counter()
        row_hash = chain.compute_row_hash(record, rows, prev)
        hashing += time.perf_counter() - t0
        records.append({**record, "id": i, "prev_hash": prev, "row_hash": row_hash})
        for row in rows:
            drift_id += 1
            drift.append({**row, "id": drift_id, "record_id": i})
            drift_with_time.append({**row, "created_at": record["created_at"]})
        prev = row_hash
        if len(records) >= chunk:
            flush()
    flush()
    for writer in writers:
        writer.finish(rollups)
    return {"total_s": time.perf_counter() - began, "hashing_s": hashing}


# ---------------------------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def measure(engine: sa.Engine, args: argparse.Namespace, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    last_day = (START + timedelta(days=args.days - 1)).replace(hour=0)
    window = AuditFilters(start=last_day - timedelta(days=29), end=last_day + timedelta(days=1))
    queries = [
        ("model x method", ["model", "method"], AuditFilters()),
        ("day x model", ["day", "model"], AuditFilters()),
        ("class x method (exact path)", ["class", "method"], AuditFilters()),
        (
            "day x model, method=layercam, last 30 days",
            ["day", "model"],
            window.model_copy(update={"method": "layercam"}),
        ),
        ("week x method, model=resnet50v2", ["week", "method"], AuditFilters(model="resnet50v2")),
        ("no grouping", [], AuditFilters()),
    ]
    for label, group_by, filters in queries:
        exact = n <= args.exact_max and engine.dialect.name in args.exact_db.split(",")
        modes = ["auto"] + (["exact"] if exact and "exact path" not in label else [])
        if "exact path" in label and n > args.exact_max:
            out[label] = "skipped (exact path over more than --exact-max records)"
            continue
        for mode in modes:
            call = functools.partial(summarize, engine, filters=filters, group_by=group_by, mode=mode)
            times, result = timed(call, args.repeats)
            no_ranking, _ = timed(functools.partial(call, reversal_max_records=0), args.repeats)
            out[f"{label} [{mode}]"] = {
                "p50_ms": round(1000 * statistics.median(times), 1),
                "min_ms": round(1000 * min(times), 1),
                "p50_ms_groups_only": round(1000 * statistics.median(no_ranking), 1),
                "path": result["source"]["path"],
                "groups": len(result["groups"]),
                "total_rows": result["total"],
                "reversal_sample": result["ranking"]["sample"],
            }
            tqdm.write(f"  {label} [{mode}]: {out[f'{label} [{mode}]']}")
    t0 = time.perf_counter()
    full = chain.verify(engine, batch_size=5000)
    out["verify_full"] = {"s": round(time.perf_counter() - t0, 2), "ok": full.ok, "checked": full.checked}
    tqdm.write(f"  verify full: {out['verify_full']}")
    rng = np.random.default_rng(7)
    from tests.db_fixtures import make_entry  # the same entries the test-suite appends

    t0 = time.perf_counter()
    for _ in tqdm(range(args.incremental), desc="append", unit="rec"):
        chain.append(engine, make_entry(rng, created_at=datetime.now(UTC)))
    appended = time.perf_counter() - t0
    assert full.head_id is not None and full.head_hash is not None
    times, inc = timed(lambda: chain.verify(engine, batch_size=5000, since=(full.head_id, full.head_hash)), 3)
    out["append"] = {"records": args.incremental, "per_s": round(args.incremental / appended, 1)}
    out["verify_incremental"] = {
        "new_rows": args.incremental,
        "p50_s": round(statistics.median(times), 3),
        "ok": inc.ok,
        "checked": inc.checked,
    }
    tqdm.write(f"  append: {out['append']}  verify incremental: {out['verify_incremental']}")
    t0 = time.perf_counter()
    problems = rollup.check(engine)
    out["rollup_check"] = {"s": round(time.perf_counter() - t0, 2), "problems": len(problems)}
    tqdm.write(f"  rollup check: {out['rollup_check']}")
    with engine.connect() as connection:
        out["rollup_rows"] = connection.execute(
            sa.select(sa.func.count()).select_from(AuditRollup)
        ).scalar_one()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=5000)
    parser.add_argument("--incremental", type=int, default=10_000)
    parser.add_argument(
        "--exact-max", type=int, default=200_000, help="time mode=exact up to this many records"
    )
    parser.add_argument("--exact-db", default="sqlite,postgresql", help="databases to time mode=exact on")
    parser.add_argument("--keep", action="store_true", help="keep the databases")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    names = args.db.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="audit_scale_"))
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
    results: dict[str, Any] = {"records": args.records, "days": args.days, "drift_rows": 6 * args.records}
    try:
        for url in urls.values():
            upgrade(url)
        writers = [Writer(url) for url in urls.values()]
        results["seed"] = seed(writers, args.records, args.days, args.chunk)
        results["seed"] |= {f"write_{w.dialect}_s": round(w.seconds, 1) for w in writers}
        print(f"seeded: {results['seed']}")
        for name, writer in zip(urls, writers, strict=True):
            print(f"== {name}")
            results[name] = measure(writer.engine, args, args.records)
            writer.engine.dispose()
    finally:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
        print(json.dumps(results, indent=2, default=str))
        if admin is not None and not args.keep:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        if not args.keep:
            for path in workdir.glob("*"):
                path.unlink()
            workdir.rmdir()


if __name__ == "__main__":
    main()
