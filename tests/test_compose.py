"""docker-compose.yml and Dockerfile wiring: db -> migrate -> api, URLs, volumes, ports, healthchecks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from service.audit import db

REPO = Path(__file__).resolve().parents[1]


def interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}`` / ``${NAME}`` with an empty environment."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


def command_text(service: dict[str, Any]) -> str:
    command = service["command"]
    return command if isinstance(command, str) else " ".join(command)


def env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: interpolate(str(v)) for k, v in environment.items()}


def test_services_are_db_migrate_api(services: dict[str, Any]) -> None:
    assert set(services) == {"db", "migrate", "api"}


def test_db_is_postgres_16_with_a_volume_and_pg_isready(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    database = services["db"]
    assert str(database["image"]).startswith("postgres:16")
    healthcheck = " ".join(database["healthcheck"]["test"])
    assert "pg_isready" in healthcheck
    volume_sources = [str(v).split(":")[0] for v in database["volumes"]]
    targets = [str(v).split(":")[1] for v in database["volumes"]]
    assert "/var/lib/postgresql/data" in targets
    assert set(volume_sources) <= set(compose["volumes"]), "the data volume is a declared named volume"


@pytest.mark.parametrize("name", ["migrate", "api"])
def test_database_url_points_at_the_db_service(services: dict[str, Any], name: str) -> None:
    url = sa.make_url(env(services[name])["CXR_DRIFT_DATABASE_URL"])
    database = env(services["db"])
    assert url.host == "db"
    assert url.get_backend_name() == "postgresql" and url.get_driver_name() == "psycopg"
    assert (url.port or 5432) == 5432
    assert url.username == database["POSTGRES_USER"]
    assert url.password == database["POSTGRES_PASSWORD"]
    assert url.database == database["POSTGRES_DB"]
    db.make_engine(url.render_as_string(hide_password=False)).dispose()  # a URL our engine accepts


def test_migrate_runs_once_after_db_is_healthy(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert command_text(migrate) in {"alembic upgrade head", "cxr-drift db upgrade"}
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"
    assert str(migrate.get("restart", "no")) == "no"


def test_migrate_command_migrates(
    services: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run the compose command itself, pointed at a SQLite file instead of the db service."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    monkeypatch.setenv("CXR_DRIFT_DATABASE_URL", url)
    monkeypatch.chdir(REPO)
    command = command_text(services["migrate"]).split()
    if command[0] == "alembic":
        from alembic.config import main as alembic_main

        alembic_main(argv=["-x", "configure_logger=false", *command[1:]])
    else:
        import argparse

        from cli import db as commands_db

        parser = argparse.ArgumentParser()
        commands_db.configure_parser(parser)
        assert commands_db.run(parser.parse_args(command[2:])) == 0
    engine = db.make_engine(url)
    try:
        db.check_writable(engine)
    finally:
        engine.dispose()


def test_api_waits_for_migrate_and_serves_on_8000(services: dict[str, Any]) -> None:
    api = services["api"]
    command = command_text(api)
    assert command.startswith("cxr-drift serve") and "--host 0.0.0.0" in command
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert any(str(p).split(":")[-1] == "8000" and str(p).startswith("8000") for p in api["ports"])
    healthcheck = " ".join(api["healthcheck"]["test"])
    assert "/healthz" in healthcheck and ":8000" in healthcheck


def test_api_mounts_artifacts_read_only(services: dict[str, Any]) -> None:
    api = services["api"]
    assert env(api)["CXR_DRIFT_ARTIFACTS_DIR"] == "/artifacts"
    mounts = []
    for volume in api["volumes"]:
        if isinstance(volume, dict):
            mounts.append((volume["target"], bool(volume.get("read_only"))))
        else:
            parts = interpolate(str(volume)).split(":")
            mounts.append((parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    assert ("/artifacts", True) in mounts


def test_compose_environment_names_are_settings_fields(services: dict[str, Any]) -> None:
    from service.app.settings import Settings

    fields = set(Settings.model_fields)
    for name in ("migrate", "api"):
        for variable in env(services[name]):
            assert variable.startswith("CXR_DRIFT_")
            assert variable.removeprefix("CXR_DRIFT_").lower() in fields, variable


def test_dockerfile_ships_the_migrations_and_serves(services: dict[str, Any]) -> None:
    assert services["migrate"]["build"] in (".", {"context": "."})
    dockerfile = (REPO / "Dockerfile").read_text()
    for line in ("COPY alembic.ini", "COPY migrations", "COPY service", "COPY training"):
        assert line in dockerfile
    assert "CXR_DRIFT_MIGRATIONS_DIR=/app/migrations" in dockerfile
    assert re.search(r'^CMD \["cxr-drift", "serve"', dockerfile, flags=re.MULTILINE)
    assert re.search(r"^USER (?!root)", dockerfile, flags=re.MULTILINE), "the service does not run as root"
