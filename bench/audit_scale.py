"""A million-record audit log on SQLite and PostgreSQL: seed it, time the summaries and the verification.

    python bench/audit_scale.py [--records 1000000] [--days 365] [--db sqlite,postgresql] [--repeats 5]
    python bench/audit_scale.py --records 1000000 --seed-only --sqlite-file F --pg-database D   # seed, keep
    python bench/audit_scale.py --records 1000000 --reuse --sqlite-file F --pg-database D     # measure

Seeding is a bulk path that produces the same rows and the same verifiable chain as ``chain.append``: records
are generated (random values drawn per chunk as arrays) and their hashed documents built in --workers
processes, split around the ``prev_hash`` value; the main process links them in id order (SHA-256 of the
document with the previous hash in place) and checks every CHECK_EVERY-th hash against
``chain.compute_row_hash`` itself. Rows are written with ``executemany`` (SQLite) or ``COPY`` (PostgreSQL) in
chunks, both databases from one generated stream, each in a fresh database (PostgreSQL: a new database,
dropped at the end unless --keep); the rollup is then built by ``rollup.rebuild``. Every record has 3 models x
2 methods (6 drift rows) spread over --days UTC days; the stored payload is shaped like a real one (reports
with predictions, metrics, timings; ~1.5 kB). The seeded rows carry no version digest (no real model pair):
"digest x method" groups them under a null digest, through the same rollup path as with digests.

Then per database (after ``upgrade``, timed: a database seeded at an older revision migrates here):
``summarize()`` for the typical group-bys and filters, in mode auto (the rollup where it can answer) and, up
to --exact-max records, mode exact: p50 over --repeats of the whole call with the reversal test computed
(cold) and reused (a repeated summary on the same records), and of the groups alone; then --incremental
records appended through the real ``chain.append`` (appends/s), a summary with them in the rollup's tail, and
``rollup.catch_up``; incremental verification of the newest --verify-new records (one walk and split over
--verify-workers processes, side by side); with --verify, a full ``chain.verify`` and ``rollup.check`` (linear in records).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing
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

from service.audit import chain, hashing, rollup, summary
from service.audit.db import make_engine, stored_json, upgrade
from service.audit.queries import AuditFilters
from service.audit.summary import summarize
from service.audit.tables import METRIC_COLUMNS, AuditRecord, AuditRollup

MODELS = ("densenet201", "inceptionv3", "resnet50v2")
METHODS = ("gradcampp", "layercam")
CLASSES = ("normal", "lobar_consolidation", "lower_zone_opacities", "diffuse_opacity", "upper_zone_nodules")
START = datetime(2025, 12, 1, tzinfo=UTC)
RECORD_COLUMNS = ("id", *chain.RECORD_CONTENT, "prev_hash", "row_hash")  # the stored columns
DRIFT_COLUMNS = ("id", "record_id", *chain.DRIFT_CONTENT)


# --------------------------------------------------------------------------------------------- generating


def _rounded(values: np.ndarray) -> list[Any]:
    """Values rounded to 6 decimals as Python floats (nested lists), -0.0 as 0.0."""
    return (np.round(values, 6) + 0.0).tolist()


def generate(
    n: int, days: int, seed: int, start: int = 0, count: int | None = None
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(record values as append stores them, drift rows) for requests ``start .. start + count`` of ``n``
    requests over ``days`` days (one random stream per (seed, start): chunks can be generated in parallel;
    the random values of a chunk are drawn as arrays)."""
    rng = np.random.default_rng([seed, start])
    span = timedelta(days=days).total_seconds()
    stop = n if count is None else min(n, start + count)
    c, m, k = stop - start, len(MODELS), len(METHODS)
    # per model x method a different mean IoU, so the ranking and the reversal test have something to find
    base = np.array([[0.46, 0.55], [0.50, 0.51], [0.54, 0.47]])  # MODELS x METHODS
    offsets = rng.uniform(0, 0.5, c).tolist()
    finetuned_i = rng.integers(0, len(CLASSES), (c, m)).tolist()
    kept_class = (rng.random((c, m)) < 0.85).tolist()
    other_i = rng.integers(0, len(CLASSES), (c, m)).tolist()
    iou_raw = np.clip(rng.normal(base, 0.15, (c, m, k)), 0, 1)
    iou = _rounded(iou_raw)
    dice = _rounded(2 * iou_raw / (1 + iou_raw))
    beta = _rounded(rng.beta(2, 5, (c, m, k, len(METRIC_COLUMNS))))
    signed = _rounded(rng.uniform(-1, 1, (c, m, k, 3)))
    changes = _rounded(rng.normal(0, 0.2, (c, m, k, 2)))
    score_raw = 1 - np.round(iou_raw, 6)
    score = _rounded(score_raw)
    index = _rounded(np.clip((np.round(score_raw, 6) - 0.2) / 0.6, 0, 1))
    percentile = _rounded(rng.uniform(0, 100, (c, m, k)))
    eps = _rounded(rng.uniform(0, 0.1, (c, m, k)))
    control = _rounded(np.minimum(1.0, np.round(iou_raw, 6) + 0.05))
    probability = _rounded(rng.uniform(0.3, 1, (c, m, 2)))
    forward = _rounded(rng.uniform(5, 50, (c, m)))
    total = _rounded(rng.uniform(50, 500, c))
    nbytes = rng.integers(1_000_000, 8_000_000, c).tolist()
    random_bytes = rng.bytes(48 * c)
    for r, i in enumerate(range(start, stop)):
        created = START + timedelta(seconds=span * i / n + offsets[r])
        reports, drift = [], []
        for a, model in enumerate(MODELS):
            finetuned = CLASSES[finetuned_i[r][a]]
            transfer = finetuned if kept_class[r][a] else CLASSES[other_i[r][a]]
            methods = {}
            for b, method in enumerate(METHODS):
                metrics = dict(zip(METRIC_COLUMNS, beta[r][a][b], strict=True))
                metrics |= {"iou": iou[r][a][b], "dice": dice[r][a][b]}
                metrics |= dict(zip(("pearson", "spearman", "ssim"), signed[r][a][b], strict=True))
                metrics |= dict(zip(("entropy_change", "gini_change"), changes[r][a][b], strict=True))
                drift_index = index[r][a][b]
                severity = "high" if drift_index >= 0.7 else ("moderate" if drift_index >= 0.4 else "low")
                methods[method] = {
                    "metrics": {**metrics, "iou_k": {"5": iou[r][a][b], "10": iou[r][a][b]}},
                    "drift_score": score[r][a][b],
                    "drift_index": drift_index,
                    "severity": severity,
                    "flagged": severity == "high",
                    "reference_percentile": percentile[r][a][b],
                    "flags": [],
                    "diagnostics": {"eps_fraction": eps[r][a][b]},
                }
                drift.append(
                    {
                        "model": model,
                        "method": method,
                        "target_class": finetuned,
                        "transfer_class": transfer,
                        "finetuned_class": finetuned,
                        "agreement": transfer == finetuned,
                        "drift_score": score[r][a][b],
                        "severity": severity,
                        "flagged": severity == "high",
                        **{name: metrics[name] for name in METRIC_COLUMNS},
                        "drift_index": drift_index,
                        "reference_percentile": percentile[r][a][b],
                        "head_scale_control_iou": control[r][a][b] if method == "gradcampp" else None,
                        "model_architecture": model,  # revision 0004's identity (no digest: no real pair)
                        "model_digest": None,
                    }
                )
            reports.append(
                {
                    "model": model,
                    "predictions": {
                        "transfer": {"class": transfer, "p": probability[r][a][0]},
                        "finetuned": {"class": finetuned, "p": probability[r][a][1]},
                    },
                    "agreement": transfer == finetuned,
                    "target_class": {"name": finetuned, "source": "finetuned_prediction"},
                    "methods": methods,
                    "timings_ms": {"forward": forward[r][a]},
                }
            )
        record = {
            "request_id": uuid.UUID(bytes=random_bytes[48 * r : 48 * r + 16]).hex,
            "created_at": created,
            "api_key_name": "bench",
            "image_sha256": random_bytes[48 * r + 16 : 48 * r + 48].hex(),
            "image_format": "png",
            "image_width": 2048,
            "image_height": 2048,
            "image_nbytes": nbytes[r],
            "options": {"methods": list(METHODS), "topk_percent": 20.0, "target_class": None},
            "payload": {"reports": reports, "timings_ms": {"total": total[r]}},
        }
        yield record, drift


# ----------------------------------------------------------------------------------------------- writing

_PREV = "P" * 64  # stands for prev_hash in a record's hashed document until the previous hash is known


def _document_parts(record: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[bytes, bytes]:
    """The document ``chain.compute_row_hash`` hashes, split around its ``prev_hash`` value: the expensive
    canonical JSON is built in parallel, the chain links it (SHA-256 of head + prev_hash + tail) in order.
    ``seed`` checks the result against ``chain.compute_row_hash`` itself (every CHECK_EVERY-th record)."""
    content = {name: record[name] for name in chain.RECORD_CONTENT}
    drift = sorted(
        (
            {
                name: row[name]
                for name in chain.DRIFT_CONTENT
                if name not in hashing.DRIFT_OPTIONAL_CONTENT or row.get(name) is not None
            }
            for row in rows
        ),
        key=lambda row: (row["model"], row["method"]),
    )
    # canonical_json without its generic walk (3x faster here): the only non-JSON value is created_at
    content["created_at"] = hashing.utc_iso(content["created_at"])
    document = json.dumps(
        {"record": content, "drift": drift, "prev_hash": _PREV},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )
    head, tail = document.split(f'"{_PREV}"')
    return f'{head}"'.encode("ascii"), f'"{tail}'.encode("ascii")


Chunk = tuple[list[tuple[Any, ...]], list[tuple[bytes, bytes]], list[tuple[Any, ...]], list[tuple[Any, ...]]]


def make_chunk(job: tuple[int, int, int, int]) -> Chunk:
    """Records ``start .. start + count`` (of ``n`` over ``days``) ready to write: record rows without their
    two hashes, the hashed documents' parts, drift rows, and (record, drift rows) of every record for the
    spot checks (only the ones ``seed`` checks are kept)."""
    start, count, n, days = job
    records, parts, drift, kept = [], [], [], []
    for i, (record, rows) in enumerate(generate(n, days, seed=0, start=start, count=count), start + 1):
        parts.append(_document_parts(record, rows))
        records.append(
            (
                i,
                *(
                    stored_json(record[c]) if isinstance(record[c], dict) else record[c]
                    for c in chain.RECORD_CONTENT
                ),
            )
        )
        for j, row in enumerate(rows):
            drift.append((6 * (i - 1) + j + 1, i, *(row[c] for c in chain.DRIFT_CONTENT)))
        if i % CHECK_EVERY == 1:
            kept.append((i, record, rows))
    return records, parts, drift, kept


CHECK_EVERY = 997  # records whose hash seed recomputes with chain.compute_row_hash


class Writer:
    """Bulk writes of already-chained rows to one database (rows as tuples in RECORD_COLUMNS and
    DRIFT_COLUMNS order; JSON columns already as their stored text)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self.seconds = 0.0

    def write(self, records: list[tuple[Any, ...]], drift: list[tuple[Any, ...]]) -> None:
        began = time.perf_counter()
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            if self.dialect == "postgresql":
                for table, columns, rows in (
                    ("audit_records", RECORD_COLUMNS, records),
                    ("audit_drift", DRIFT_COLUMNS, drift),
                ):
                    with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
            else:
                cursor.execute("BEGIN IMMEDIATE")
                created = RECORD_COLUMNS.index("created_at")
                as_text = [(*r[:created], _sqlite_time(r[created]), *r[created + 1 :]) for r in records]
                for table, columns, rows in (
                    ("audit_records", RECORD_COLUMNS, as_text),
                    ("audit_drift", DRIFT_COLUMNS, drift),
                ):
                    marks = ", ".join("?" * len(columns))
                    cursor.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)
            raw.commit()
        finally:
            raw.close()
        self.seconds += time.perf_counter() - began

    def finish(self) -> dict[str, float]:
        """Sequences after the explicit ids, ANALYZE, then the rollup built by the service's own code."""
        with self.engine.begin() as connection:
            if self.dialect == "postgresql":
                for table in ("audit_records", "audit_drift"):
                    connection.exec_driver_sql(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
                    )
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("ANALYZE" if self.dialect == "sqlite" else "VACUUM ANALYZE")
        t0 = time.perf_counter()
        with self.engine.begin() as connection:
            rollup.rebuild(connection)
        return {f"rollup_rebuild_{self.dialect}_s": round(time.perf_counter() - t0, 1)}


def _sqlite_time(value: datetime) -> str:
    """As UtcDateTime stores a timestamp on SQLite."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def seed(writers: list[Writer], n: int, days: int, chunk: int, workers: int) -> dict[str, Any]:
    """Generate and canonicalise in ``workers`` processes, link the chain and write here, in id order."""
    prev = chain.GENESIS_HASH
    linking = 0.0
    checked = 0
    began = time.perf_counter()
    jobs = [(start, min(chunk, n - start), n, days) for start in range(0, n, chunk)]
    with (
        multiprocessing.get_context("fork").Pool(workers) as pool,
        tqdm(total=n, desc="seed", unit="rec") as bar,
    ):
        for records, parts, drift, kept in pool.imap(make_chunk, jobs):
            t0 = time.perf_counter()
            hashes: list[str] = []
            chained = []
            for row, (head, tail) in zip(records, parts, strict=True):
                row_hash = hashlib.sha256(head + prev.encode("ascii") + tail).hexdigest()
                chained.append((*row, prev, row_hash))
                hashes.append(prev)
                prev = row_hash
            first = records[0][0]
            for i, record, rows in kept:  # the chain's own function gives the same hash
                link = hashes[i - first]
                assert chain.compute_row_hash(record, rows, link) == chained[i - first][-1], f"record {i}"
                checked += 1
            linking += time.perf_counter() - t0
            for writer in writers:
                writer.write(chained, drift)
            bar.update(len(records))
    out: dict[str, Any] = {"seed_s": round(time.perf_counter() - began, 1), "linking_s": round(linking, 1)}
    out["hashes_checked_with_compute_row_hash"] = checked
    out |= {f"write_{w.dialect}_s": round(w.seconds, 1) for w in writers}
    for writer in writers:
        out |= writer.finish()
    out["total_s"] = round(time.perf_counter() - began, 1)
    return out


# ---------------------------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], repeats: int, cpu: list[float] | None = None) -> tuple[list[float], Any]:
    """Wall times of ``repeats`` calls (and this thread's CPU times into ``cpu``), the last result."""
    times, result = [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        result = fn()
        times.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.thread_time() - c0)
    return times, result


def _summary_times(call: Callable[..., dict[str, Any]], repeats: int) -> dict[str, Any]:
    """p50/min of the whole call with the reversal test computed (cold: the reuse cache emptied before
    each call) and reused (warm), and of the groups alone (reversal_max_records=0)."""

    def cold() -> dict[str, Any]:
        summary._COMPARISONS.clear()
        return call()

    cold_cpu: list[float] = []
    warm_cpu: list[float] = []
    cold_times, result = timed(cold, repeats, cold_cpu)
    warm_times, warm = timed(call, repeats, warm_cpu)
    assert warm["ranking"]["reused"] and warm["ranking"]["comparisons"] == result["ranking"]["comparisons"]
    groups_cpu: list[float] = []
    groups_times, _ = timed(functools.partial(call, reversal_max_records=0), repeats, groups_cpu)
    return {
        "p50_ms_cold": round(1000 * statistics.median(cold_times), 1),
        "p50_ms_reused": round(1000 * statistics.median(warm_times), 1),
        "min_ms_reused": round(1000 * min(warm_times), 1),
        "p50_ms_groups_only": round(1000 * statistics.median(groups_times), 1),
        # this process's CPU time per call (the machine is shared: CPU time does not count waiting for a core;
        # on PostgreSQL the server's work is not in it)
        "cpu_ms_cold": round(1000 * statistics.median(cold_cpu), 1),
        "cpu_ms_reused": round(1000 * statistics.median(warm_cpu), 1),
        "cpu_ms_groups_only": round(1000 * statistics.median(groups_cpu), 1),
        "path": result["source"]["path"],
        "tail_rows": result["source"].get("tail_rows"),
        "groups": len(result["groups"]),
        "total_rows": result["total"],
        "reversal_sample": result["ranking"]["sample"],
    }


def measure(engine: sa.Engine, args: argparse.Namespace, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"uptime_before": _uptime()}
    last_day = (START + timedelta(days=args.days - 1)).replace(hour=0)
    window = AuditFilters(start=last_day - timedelta(days=29), end=last_day + timedelta(days=1))
    queries = [
        ("model x method", ["model", "method"], AuditFilters()),
        ("day x model", ["day", "model"], AuditFilters()),
        ("digest x method (version x method)", ["digest", "method"], AuditFilters()),
        (
            "architecture x method, method=layercam",
            ["architecture", "method"],
            AuditFilters(method="layercam"),
        ),
        (
            "day x model, method=layercam, last 30 days",
            ["day", "model"],
            window.model_copy(update={"method": "layercam"}),
        ),
        ("week x method, model=resnet50v2", ["week", "method"], AuditFilters(model="resnet50v2")),
        ("no grouping", [], AuditFilters()),
        ("class x method (exact path)", ["class", "method"], AuditFilters()),
    ]
    for label, group_by, filters in queries:
        exact = n <= args.exact_max and engine.dialect.name in args.exact_db.split(",")
        modes = ["auto"] + (["exact"] if exact and "exact path" not in label else [])
        if "exact path" in label and n > args.exact_max:
            out[label] = "skipped (exact path over more than --exact-max records)"
            continue
        for mode in modes:
            call = functools.partial(summarize, engine, filters=filters, group_by=group_by, mode=mode)
            out[f"{label} [{mode}]"] = _summary_times(call, args.repeats)
            tqdm.write(f"  {label} [{mode}]: {out[f'{label} [{mode}]']}")
    if args.incremental:
        from tests.db_fixtures import make_entry  # the same entries the test-suite appends

        with engine.connect() as connection:  # a stream of its own per run on a reused database
            newest = connection.execute(sa.select(sa.func.max(AuditRecord.id))).scalar_one()
        rng = np.random.default_rng([7, newest or 0])
        t0 = time.perf_counter()
        for _ in tqdm(range(args.incremental), desc="append", unit="rec"):
            chain.append(engine, make_entry(rng, created_at=datetime.now(UTC)))
        appended = time.perf_counter() - t0
        out["append"] = {"records": args.incremental, "per_s": round(args.incremental / appended, 1)}
        call = functools.partial(summarize, engine, filters=AuditFilters(), group_by=["model", "method"])
        out["model x method, with the appended records in the tail"] = _summary_times(call, args.repeats)
        t0 = time.perf_counter()
        covered = rollup.catch_up(engine)
        out["catch_up"] = {"records": covered, "s": round(time.perf_counter() - t0, 2)}
        tqdm.write(f"  append/tail/catch-up: {out}")
    if args.verify_new:
        out |= _incremental_verification(engine, args.verify_new, args.verify_workers)
    out["uptime_after"] = _uptime()
    if not args.verify:
        return out
    t0 = time.perf_counter()
    full = chain.verify(engine, batch_size=5000)
    out["verify_full"] = {"s": round(time.perf_counter() - t0, 2), "ok": full.ok, "checked": full.checked}
    tqdm.write(f"  verify full: {out['verify_full']}")
    t0 = time.perf_counter()
    problems = rollup.check(engine)
    out["rollup_check"] = {"s": round(time.perf_counter() - t0, 2), "problems": len(problems)}
    tqdm.write(f"  rollup check: {out['rollup_check']}")
    with engine.connect() as connection:
        out["rollup_rows"] = connection.execute(
            sa.select(sa.func.count()).select_from(AuditRollup)
        ).scalar_one()
    return out


def _uptime() -> str:
    return Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "n/a"


def _incremental_verification(engine: sa.Engine, new: int, workers: int) -> dict[str, Any]:
    """``chain.verify(since=...)`` of the newest ``new`` records: one walk and split over ``workers``
    processes, alternated (p50 of 3; the pool started by an untimed call first, as a running service has it)."""
    with engine.connect() as connection:
        newest = connection.execute(sa.select(sa.func.max(AuditRecord.id))).scalar_one()
        since = (
            newest - new,
            connection.execute(
                sa.select(AuditRecord.row_hash).where(AuditRecord.id == newest - new)
            ).scalar_one(),
        )
    chain.verify(engine, batch_size=5000, since=since, workers=workers)
    times: dict[int, list[float]] = {1: [], workers: []}
    for _ in range(3):
        for count in times:
            t0 = time.perf_counter()
            result = chain.verify(engine, batch_size=5000, since=since, workers=count)
            times[count].append(time.perf_counter() - t0)
            assert result.ok and result.checked == new, result
    out = {
        f"verify {new} new rows, {count} worker{'s' if count > 1 else ''}": {
            "p50_s": round(statistics.median(seconds), 3),
            "all_s": [round(t, 3) for t in seconds],
        }
        for count, seconds in times.items()
    }
    tqdm.write(f"  incremental verification: {out}")
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
    parser.add_argument("--workers", type=int, default=2, help="processes generating and canonicalising")
    parser.add_argument("--incremental", type=int, default=10_000)
    parser.add_argument(
        "--exact-max", type=int, default=200_000, help="time mode=exact up to this many records"
    )
    parser.add_argument("--exact-db", default="sqlite,postgresql", help="databases to time mode=exact on")
    parser.add_argument("--keep", action="store_true", help="keep the databases")
    parser.add_argument("--seed-only", action="store_true", help="seed, keep the databases, stop")
    parser.add_argument("--sqlite-file", type=Path, help="the SQLite file (default: a new temporary one)")
    parser.add_argument("--pg-database", help="the PostgreSQL database (default: a new cxr_drift_bench_*)")
    parser.add_argument("--reuse", action="store_true", help="measure the databases named, seeded before")
    parser.add_argument("--verify", action="store_true", help="time a full chain.verify (linear in records)")
    parser.add_argument(
        "--verify-new", type=int, default=10_000, help="time verifying the newest N records (0: skip)"
    )
    parser.add_argument("--verify-workers", type=int, default=2, help="processes for the split walk")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    names = args.db.split(",")
    keep = args.keep or args.seed_only or args.reuse
    workdir = Path(tempfile.mkdtemp(prefix="audit_scale_"))
    sqlite_file = args.sqlite_file or workdir / "audit.db"
    urls: dict[str, str] = {}
    pg_name = args.pg_database or f"cxr_drift_bench_{uuid.uuid4().hex[:8]}"
    admin = None
    if "sqlite" in names:
        urls["sqlite"] = f"sqlite:///{sqlite_file}"
    if "postgresql" in names:
        base = sa.make_url(args.pg_url)
        admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        if not args.reuse:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'CREATE DATABASE "{pg_name}"')
        urls["postgresql"] = base.set(database=pg_name).render_as_string(hide_password=False)
    results: dict[str, Any] = {"records": args.records, "days": args.days, "drift_rows": 6 * args.records}
    try:
        for name, url in urls.items():  # --reuse: a seeded database may be at an older revision
            t0 = time.perf_counter()
            upgrade(url)
            results[f"upgrade_{name}_s"] = round(time.perf_counter() - t0, 1)
        writers = [Writer(url) for url in urls.values()]
        if not args.reuse:
            results["seed"] = seed(writers, args.records, args.days, args.chunk, args.workers)
            print(f"seeded: {results['seed']} (sqlite: {sqlite_file}, postgresql: {pg_name})")
        for name, writer in zip(urls, writers, strict=True):
            if not args.seed_only:
                print(f"== {name}")
                results[name] = measure(writer.engine, args, args.records)
            writer.engine.dispose()
    finally:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
        print(json.dumps(results, indent=2, default=str))
        if admin is not None:
            if not keep:
                with admin.connect() as connection:
                    connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
            admin.dispose()
        if not keep and sqlite_file.exists():
            for suffix in ("", "-wal", "-shm"):
                Path(f"{sqlite_file}{suffix}").unlink(missing_ok=True)
        if not any(workdir.iterdir()):
            workdir.rmdir()


if __name__ == "__main__":
    main()
