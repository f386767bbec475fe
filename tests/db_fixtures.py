"""Database fixtures for tests: a fresh SQLite file or a fresh PostgreSQL schema per test.

Use them by importing into a test module (``from tests.db_fixtures import db_engine, db_url, ...``) or
with ``pytest_plugins = ["tests.db_fixtures"]`` in conftest.py.

- ``db_url`` / ``db_engine``: parametrized over "sqlite" and "postgresql"; migrated to the newest revision.
- ``empty_db_url``: the same, not migrated.
- PostgreSQL: ``CXR_DRIFT_TEST_PG_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
  A database is created per test session (dropped after) and a schema per test, selected with the
  ``options=-csearch_path=...`` connection parameter carried in the URL. If the server is unreachable
  the PostgreSQL cases are skipped with the reason, unless ``CI=true``, where they fail.

``make_report``/``make_entry`` build realistic :class:`engine.report.DriftReport` objects and audit entries.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from core.vocabulary import METHODS
from engine.report import DriftReport, MethodResult, Prediction
from service.audit.chain import AuditEntry
from service.audit.db import make_engine, upgrade
from service.audit.tables import METRIC_COLUMNS

PG_URL_ENV = "CXR_DRIFT_TEST_PG_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MODELS = ("densenet201", "resnet50v2", "inceptionv3")
CLASSES = ("normal", "lobar_consolidation", "lower_zone_opacities", "diffuse_opacity", "upper_zone_nodules")


def configured_pg_url() -> str:
    return os.environ.get(PG_URL_ENV, DEFAULT_PG_URL)


def _unreachable(reason: str) -> None:
    message = f"PostgreSQL at {PG_URL_ENV} unreachable ({reason})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true requires it")
    pytest.skip(f"{message}; set {PG_URL_ENV} or start the server (skipped because CI is not 'true')")


def _render(url: sa.URL) -> str:
    return url.render_as_string(hide_password=False)


# server states that pass: the shared server is out of connection slots, or restarting after a crash
TRANSIENT_PG_ERRORS = (
    "too many clients",
    "remaining connection slots",
    "starting up",
    "recovery mode",
    "shutting down",
)


@contextlib.contextmanager
def connect_when_ready(engine: sa.Engine, wait_s: float = 60.0) -> Iterator[sa.Connection]:
    """``engine.connect()``, retried while the server is in a transient state (:data:`TRANSIENT_PG_ERRORS`).

    The shared server serves other clients too; a test should not fail because one of them held every slot
    for a moment. Another error, or a state lasting past ``wait_s``, raises with the server's message.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            connection = engine.connect()
            break
        except sa.exc.OperationalError as error:
            message = str(error.orig)
            if not any(state in message for state in TRANSIENT_PG_ERRORS) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    with connection:
        yield connection


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database for this test session (per xdist worker), dropped at the end."""
    base = sa.make_url(configured_pg_url())
    admin = sa.create_engine(
        base, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}, poolclass=sa.NullPool
    )
    name = f"cxr_drift_test_{uuid.uuid4().hex[:12]}"
    try:
        with connect_when_ready(admin) as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as error:
        admin.dispose()
        _unreachable(str(error.orig).strip().splitlines()[0])
    try:
        yield _render(base.set(database=name))
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def pg_url(pg_database_url: str) -> Iterator[str]:
    """URL of an empty schema (first on the search path) in the session's PostgreSQL database."""
    base = sa.make_url(pg_database_url)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with connect_when_ready(admin) as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield _render(base.update_query_dict({"options": f"-csearch_path={schema}"}))
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path / 'audit.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_db_url(request: pytest.FixtureRequest) -> str:
    """An empty database, not migrated: SQLite file in tmp_path, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    """A database migrated to the newest revision."""
    upgrade(empty_db_url)
    return empty_db_url


@pytest.fixture
def db_engine(db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------- factories


def make_report(
    rng: np.random.Generator,
    *,
    model: str,
    methods: Sequence[str] = METHODS,
    transfer_class: str | None = None,
    finetuned_class: str | None = None,
    class_names: Sequence[str] = CLASSES,
) -> DriftReport:
    """A report (without maps) with random but valid values."""
    transfer = transfer_class or str(rng.choice(class_names))
    finetuned = finetuned_class or str(rng.choice(class_names))

    def prediction(name: str) -> Prediction:
        probabilities = rng.dirichlet(np.ones(len(class_names)))
        return {
            "index": class_names.index(name),
            "class": name,
            "probabilities": {c: float(p) for c, p in zip(class_names, probabilities, strict=True)},
        }

    method_results: dict[str, MethodResult] = {}
    for method in methods:
        metrics: dict[str, Any] = {name: float(rng.uniform(0.0, 1.0)) for name in METRIC_COLUMNS}
        metrics["entropy_change"] = float(rng.uniform(-0.5, 0.5))
        metrics["gini_change"] = float(rng.uniform(-0.5, 0.5))
        metrics["iou_k"] = {"5": float(rng.uniform()), "10": float(rng.uniform())}
        score = float(rng.uniform(0.0, 1.0))
        severity = "low" if score < 0.4 else ("moderate" if score < 0.7 else "high")
        method_results[method] = {
            "metrics": metrics,
            "drift_score": score,
            "severity": severity,
            "flagged": severity == "high",
            "flags": ["high_drift"] if severity == "high" else [],
            "diagnostics": {"eps_fraction": float(rng.uniform(0.0, 0.1))},
            "drift_index": float(rng.uniform(0.0, 1.0)),
            "reference_percentile": float(rng.uniform(0.0, 100.0)),
            "own_prediction": None,
        }
    return DriftReport(
        model=model,
        class_names=list(class_names),
        predictions={"transfer": prediction(transfer), "finetuned": prediction(finetuned)},
        agreement=transfer == finetuned,
        target_class={
            "index": class_names.index(finetuned),
            "name": finetuned,
            "source": "finetuned_prediction",
        },
        methods=method_results,
        thresholds={"calibrated": False},
        timings_ms={"forward": float(rng.uniform(5, 50))},
    )


def make_entry(
    rng: np.random.Generator,
    *,
    created_at: datetime | None = None,
    models: Sequence[str] = MODELS,
    methods: Sequence[str] = METHODS,
    api_key_name: str | None = "tester",
) -> AuditEntry:
    """An audit entry for one request over ``models`` x ``methods``."""
    return AuditEntry(
        request_id=uuid.UUID(bytes=rng.bytes(16)).hex,
        created_at=created_at or datetime.now(UTC),
        api_key_name=api_key_name,
        image_sha256=rng.bytes(32).hex(),
        image_format=str(rng.choice(["png", "jpeg", "dicom"])),
        image_width=int(rng.integers(64, 4096)),
        image_height=int(rng.integers(64, 4096)),
        image_nbytes=int(rng.integers(1_000, 50_000_000)),
        options={"methods": list(methods), "topk_percent": 20.0, "target_class": None},
        reports=[make_report(rng, model=model, methods=methods) for model in models],
        timings_ms={"decode": float(rng.uniform(1, 5)), "total": float(rng.uniform(50, 500))},
    )


def disable_append_only(engine: sa.Engine) -> None:
    """What an attacker with admin rights does first: take the append-only triggers away."""
    with engine.begin() as connection:
        for table in ("audit_records", "audit_drift"):
            if engine.dialect.name == "sqlite":
                for operation in ("update", "delete"):
                    connection.exec_driver_sql(f"DROP TRIGGER {table}_append_only_{operation}")
            else:
                connection.exec_driver_sql(f"ALTER TABLE {table} DISABLE TRIGGER USER")
