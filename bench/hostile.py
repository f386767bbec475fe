"""The hostile client, fuller form: against a live server (uvicorn subprocess) on SQLite and on PostgreSQL,

1. schemathesis (the committed OpenAPI document of the running app) with each role's key and without one,
   check ``not_a_server_error``; every request and status is read back from its HAR report;
2. every .dcm file installed with pydicom, and the generated malformed-image corpus of
   tests/service/test_hostile.py, through POST /predict;
3. the server log searched for the patient names and ids of those DICOM files.

Prints one JSON summary and exits 1 on any 5xx (other than a 503 the client was told to retry) or any
identifier in the log.

    python bench/hostile.py [--max-examples 10] [--db sqlite --db postgres] [--pg-url URL]
        [--phases examples,coverage,fuzzing] [--roles predict audit admin none] [--no-corpus]

PostgreSQL: a fresh database on the server of ``--pg-url`` (default the tests' CXR_DRIFT_TEST_PG_URL),
dropped afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving import wait_ready  # noqa: E402  (after the path insert)

KEYS = {role: f"bench-{role}-key-" + role[0] * 24 for role in ("predict", "audit", "admin")}


def settings_keys() -> str:
    return ",".join(
        f"{role}-user:{role}:{hashlib.sha256(k.encode()).hexdigest()}" for role, k in KEYS.items()
    )


@contextlib.contextmanager
def live_server(artifacts: Path, database_url: str, workdir: Path, port: int) -> Iterator[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CXR_DRIFT_ARTIFACTS_DIR": str(artifacts),
        "CXR_DRIFT_DATABASE_URL": database_url,
        "CXR_DRIFT_API_KEYS": settings_keys(),
        "CXR_DRIFT_ORT_THREADS": "1",
    }
    log = (workdir / "server.log").open("w")
    cmd = [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, base, log=workdir / "server.log")
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def run_schemathesis(
    base: str, role: str | None, workdir: Path, max_examples: int, seed: int, phases: str
) -> Counter[int]:
    har = workdir / f"schemathesis-{role or 'nokey'}.har"
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{base}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(max_examples),
        "--seed",
        str(seed),
        "--request-timeout",
        "60",
        "--report",
        "har",
        "--report-har-path",
        str(har),
        "--suppress-health-check",
        "all",
        "--phases",
        phases,
    ]
    if role is not None:
        cmd += ["-H", f"X-API-Key: {KEYS[role]}"]
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=3600)
    (workdir / f"schemathesis-{role or 'nokey'}.txt").write_text(result.stdout + result.stderr)
    statuses: Counter[int] = Counter()
    if har.exists():
        for entry in json.loads(har.read_text())["log"]["entries"]:
            statuses[int(entry["response"]["status"])] += 1
    if not statuses:
        raise RuntimeError(f"schemathesis sent nothing:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return statuses


def image_corpus() -> dict[str, bytes]:
    from pydicom.data import get_testdata_files

    from tests.service.test_hostile import malformed_corpus

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = {Path(p).name: Path(p).read_bytes() for p in get_testdata_files("*.dcm")}
    files.update({f"malformed/{name}": data for name, (data, _) in malformed_corpus().items()})
    return files


def identifiers() -> set[str]:
    """Patient names and ids of the installed pydicom test files (with at least 4 letters or digits)."""
    import pydicom
    from pydicom.data import get_testdata_files

    found: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in get_testdata_files("*.dcm"):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
                for keyword in ("PatientName", "PatientID"):
                    value = str(ds.get(keyword, "") or "").strip()
                    if sum(c.isalnum() for c in value) >= 4:  # "^^^^" would match a traceback's markers
                        found.add(value)
            except Exception:
                continue
    return found


def post_corpus(base: str, corpus: dict[str, bytes]) -> tuple[Counter[int], list[str]]:
    statuses: Counter[int] = Counter()
    bad: list[str] = []
    with httpx.Client(base_url=base, timeout=300) as client:
        for name, data in sorted(corpus.items()):
            response = client.post(
                "/predict",
                files={"file": ("upload", data, "application/octet-stream")},
                data={"models": "resnet50v2", "methods": "layercam"},
                headers={"X-API-Key": KEYS["predict"]},
            )
            statuses[response.status_code] += 1
            if response.status_code >= 400:
                body = response.json()
                if set(body) != {"error"}:
                    bad.append(f"{name}: not the error model")
            if response.status_code >= 500:
                bad.append(f"{name}: {response.status_code} {response.text[:200]}")
    return statuses, bad


@contextlib.contextmanager
def database(kind: str, workdir: Path, pg_url: str | None) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'audit.db'}"
        return
    if pg_url:
        os.environ["CXR_DRIFT_TEST_PG_URL"] = pg_url
    from tests.api_fixtures import fresh_pg_database

    with fresh_pg_database() as url:
        yield url


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-examples", type=int, default=10, help="schemathesis examples per operation")
    parser.add_argument("--db", action="append", choices=["sqlite", "postgres"])
    parser.add_argument("--pg-url", default=None)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--no-corpus", action="store_true")
    parser.add_argument("--keep", type=Path, default=None, help="copy server logs and reports here")
    parser.add_argument("--phases", default="examples,coverage,fuzzing", help="schemathesis phases")
    parser.add_argument(
        "--roles", nargs="*", default=[*KEYS, "none"], help="keys to run schemathesis with (none: no key)"
    )
    args = parser.parse_args()
    dbs = args.db or ["sqlite", "postgres"]

    from tests.pairs import export_small_pair

    summary: dict = {"max_examples": args.max_examples, "runs": {}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="cxr-hostile-") as tmp:
        artifacts = Path(tmp) / "artifacts"
        export_small_pair("resnet50v2", artifacts / "resnet50v2", seed=1)
        corpus = {} if args.no_corpus else image_corpus()
        secrets = identifiers()
        for n, kind in enumerate(dbs):
            workdir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=tmp))
            started = time.perf_counter()
            with (
                database(kind, workdir, args.pg_url) as url,
                live_server(artifacts, url, workdir, 18_500 + os.getpid() % 400 + n) as base,
            ):
                run: dict = {"schemathesis": {}}
                for role in [None if r == "none" else r for r in args.roles]:
                    statuses = run_schemathesis(
                        base, role, workdir, args.max_examples, args.seed, args.phases
                    )
                    run["schemathesis"][role or "no key"] = {
                        "requests": sum(statuses.values()),
                        "statuses": {str(k): v for k, v in sorted(statuses.items())},
                    }
                    failed |= any(s >= 500 and s != 503 for s in statuses)
                if corpus:
                    statuses, bad = post_corpus(base, corpus)
                    run["corpus"] = {
                        "files": len(corpus),
                        "statuses": {str(k): v for k, v in sorted(statuses.items())},
                        "problems": bad,
                    }
                    failed |= bool(bad)
            log_text = (workdir / "server.log").read_text(errors="replace")
            if args.keep is not None:
                import shutil

                shutil.copytree(
                    workdir, args.keep / kind, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.db*")
                )
            leaked = sorted(s for s in secrets if s in log_text)
            run["identifiers_checked"] = len(secrets)
            run["identifiers_in_log"] = leaked
            run["tracebacks_in_log"] = log_text.count("Traceback (most recent call last)")
            run["wall_s"] = round(time.perf_counter() - started, 1)
            failed |= bool(leaked)
            total5xx = sum(
                v
                for r in run["schemathesis"].values()
                for k, v in r["statuses"].items()
                if int(k) >= 500 and int(k) != 503
            )
            run["server_errors_5xx"] = total5xx + sum(
                v for k, v in run.get("corpus", {}).get("statuses", {}).items() if int(k) >= 500
            )
            summary["runs"][kind] = run
            print(json.dumps({kind: run}, indent=1), flush=True)
    summary["ok"] = not failed
    print(json.dumps({"ok": summary["ok"]}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
