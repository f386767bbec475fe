"""docker-compose.yml and Dockerfile wiring: db -> migrate -> api, URLs, volumes, ports, healthchecks."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from cli.main import build_parser
from service.app.settings import Settings
from service.audit import db
from tests.test_layers import LAYERS, import_graph

REPO = Path(__file__).resolve().parents[2]


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


def test_db_data_lives_in_a_declared_volume_and_is_health_checked(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    database = services["db"]
    sources = [str(v).split(":")[0] for v in database["volumes"]]
    assert set(sources) <= set(compose["volumes"]), "an undeclared volume would be created anonymously"
    assert any(str(v).split(":")[1] == "/var/lib/postgresql/data" for v in database["volumes"])
    check = " ".join(database["healthcheck"]["test"])
    user, name = env(database)["POSTGRES_USER"], env(database)["POSTGRES_DB"]
    assert f"-U {user}" in check and f"-d {name}" in check, "the health check must probe the real database"


@pytest.mark.parametrize("name", ["migrate", "api"])
def test_database_url_points_at_the_db_service(services: dict[str, Any], name: str) -> None:
    url = sa.make_url(env(services[name])["CXR_DRIFT_DATABASE_URL"])
    database = env(services["db"])
    assert url.host == "db"
    assert url.get_backend_name() == "postgresql" and url.get_driver_name() == "psycopg"
    assert (url.port or 5432) == 5432
    if name == "migrate":  # the owner migrates ...
        assert url.username == database["POSTGRES_USER"]
        assert url.password == database["POSTGRES_PASSWORD"]
    else:  # ... the API connects as the service role that migrate creates and grants
        migrate = env(services["migrate"])
        assert url.username == migrate["CXR_DRIFT_SERVICE_ROLE"] != database["POSTGRES_USER"]
        assert url.password == migrate["CXR_DRIFT_SERVICE_ROLE_PASSWORD"]
        assert env(services["api"])["CXR_DRIFT_MIGRATE_ON_START"] == "false"
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

        # the service role is PostgreSQL-only: tests/service/test_service_role.py runs this step there
        monkeypatch.delenv("CXR_DRIFT_SERVICE_ROLE", raising=False)
        parser = argparse.ArgumentParser()
        commands_db.configure_parser(parser)
        assert commands_db.run(parser.parse_args(command[2:])) == 0
    engine = db.make_engine(url)
    try:
        db.check_writable(engine)
    finally:
        engine.dispose()


def test_api_command_is_a_valid_cli_invocation_on_the_published_port(services: dict[str, Any]) -> None:
    api = services["api"]
    command = command_text(api).split()
    assert command[0] == "cxr-drift"
    args = build_parser(command[1]).parse_args(command[1:])  # argparse exits on a flag that does not exist
    assert args.command == "serve" and args.host == "0.0.0.0"
    published = {str(p).rsplit(":", 1)[-1] for p in api["ports"]}
    assert str(args.port) in published
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    healthcheck = api["healthcheck"]["test"]
    assert healthcheck[:3] == ["CMD", "python", "-c"]
    compile(healthcheck[3], "<healthcheck>", "exec")
    assert f"127.0.0.1:{args.port}/healthz" in healthcheck[3]


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

    fields = set(Settings.model_fields)
    for name in ("migrate", "api"):
        for variable in env(services[name]):
            assert variable.startswith("CXR_DRIFT_")
            assert variable.removeprefix("CXR_DRIFT_").lower() in fields, variable


def dockerfile_copies() -> set[str]:
    """The top-level paths the Dockerfile copies into the image."""
    lines = (REPO / "Dockerfile").read_text().splitlines()
    return {
        part.rstrip("/")
        for line in lines
        if line.startswith("COPY ")
        for part in line.split()[1:-1]
        if not part.startswith("--")
    }


def test_dockerfile_copies_every_package_the_install_needs(services: dict[str, Any]) -> None:
    assert services["migrate"]["build"] in (".", {"context": "."})
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = dockerfile_copies()
    assert packages <= copied, f"packages pyproject installs but the image lacks: {packages - copied}"
    assert {"pyproject.toml", "README.md", "alembic.ini", "migrations"} <= copied
    graph = import_graph(REPO, LAYERS)  # every project package the installed command can reach
    reachable, todo = set(), [m for m in graph if m.startswith("cli.")]
    while todo:
        module = todo.pop()
        if module not in reachable:
            reachable.add(module)
            todo.extend(graph[module])
    assert {m.split(".")[0] for m in reachable} <= copied


def test_dockerfile_runs_the_migrations_it_ships_and_serves_as_a_user(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    directory = re.search(r"CXR_DRIFT_MIGRATIONS_DIR=(\S+)", dockerfile)
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, flags=re.MULTILINE)
    assert directory and workdir and directory.group(1) == f"{workdir.group(1)}/migrations"
    shipped = tmp_path / "app" / "migrations"
    shutil.copytree(REPO / "migrations", shipped)
    monkeypatch.setenv("CXR_DRIFT_MIGRATIONS_DIR", str(shipped))
    assert db.migrations_dir() == shipped, "the variable the image sets is the one the service reads"
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, flags=re.MULTILINE)
    assert cmd is not None
    command = json.loads(cmd.group(1))
    assert command[0] == "cxr-drift"
    build_parser(command[1]).parse_args(command[1:])
    assert re.search(r"^USER (?!root)", dockerfile, flags=re.MULTILINE), "the service does not run as root"
