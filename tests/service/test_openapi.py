"""The committed OpenAPI document is the app's: a change to the API must regenerate it (and be reviewed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from service.app.openapi import openapi_document, render

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "openapi" / "openapi.json"


def test_committed_document_matches_the_app() -> None:
    assert COMMITTED.is_file(), (
        "openapi/openapi.json is missing; run: cxr-drift openapi --out openapi/openapi.json"
    )
    expected = render(openapi_document())
    assert COMMITTED.read_text(encoding="utf-8") == expected, (
        "openapi/openapi.json is out of date; run: cxr-drift openapi --out openapi/openapi.json"
    )


def test_operation_ids_are_tag_dash_name_and_unique() -> None:
    document = openapi_document()
    seen: list[str] = []
    for path, operations in document["paths"].items():
        for verb, operation in operations.items():
            tag = operation["tags"][0]
            assert operation["operationId"].startswith(f"{tag}-"), (verb, path, operation["operationId"])
            seen.append(operation["operationId"])
    assert len(seen) == len(set(seen))
    assert "predict-predict" in seen and "audit-verify" in seen


def test_every_error_is_documented_with_the_error_model() -> None:
    document = openapi_document()
    for path, operations in document["paths"].items():
        for verb, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (verb, path, status)
            if path not in ("/healthz", "/readyz"):
                assert {"401", "403"} <= set(operation["responses"]), (verb, path)


def test_cli_check_detects_drift_and_regenerates(tmp_path: Path) -> None:
    out = tmp_path / "openapi.json"
    cmd = [sys.executable, "-m", "cli.main", "openapi", "--out", str(out)]
    assert subprocess.run([*cmd, "--check"], capture_output=True, text=True).returncode != 0
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    assert json.loads(out.read_text())["info"]["title"] == "cxr-drift"
    assert subprocess.run([*cmd, "--check"], capture_output=True, text=True).returncode == 0
    out.write_text(out.read_text().replace("predict-predict", "predict-renamed"))
    stale = subprocess.run([*cmd, "--check"], capture_output=True, text=True)
    assert stale.returncode != 0 and "out of date" in stale.stderr
