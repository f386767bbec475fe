"""A throwaway PostgreSQL cluster for tests that stop, freeze or break a database (never the shared one).

``throwaway_cluster()`` runs ``initdb`` in a temporary folder as the ``postgres`` OS user (when run as root)
and starts ``postgres`` on a free loopback port; it skips the test when no PostgreSQL binaries are found
under ``/usr/lib/postgresql/*/bin`` (or ``$CXR_DRIFT_TEST_PG_BIN``). ``freeze()``/``thaw()`` send
SIGSTOP/SIGCONT to the postmaster and every backend, as a network partition or a stuck disk would look.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api_fixtures import free_port


def _pg_bin() -> Path | None:
    configured = os.environ.get("CXR_DRIFT_TEST_PG_BIN")
    candidates = [configured] if configured else sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in candidates:
        if folder and (Path(folder) / "initdb").is_file():
            return Path(folder)
    return None


def _as_postgres(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", "postgres", "--", *argv]


class Cluster:
    def __init__(self, folder: Path, port: int, process: subprocess.Popen[bytes]) -> None:
        self.folder = folder
        self.port = port
        self.process = process

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def pids(self) -> list[int]:
        """The postmaster and all its descendants (backends, background workers), and runuser if any."""
        parents: dict[int, list[int]] = {}
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents.setdefault(int(fields[1]), []).append(int(Path(stat).parent.name))
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(parents.get(pid, []))
        return found

    def _signal(self, signum: int) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def freeze(self) -> None:
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip(
            "no PostgreSQL binaries (initdb) under /usr/lib/postgresql/*/bin; set CXR_DRIFT_TEST_PG_BIN"
        )
    folder = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    subprocess.run(
        _as_postgres(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"]
        ),
        check=True,
        capture_output=True,
    )
    port = free_port()
    process = subprocess.Popen(
        _as_postgres(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-k",
                str(folder),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ]
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # as root, runuser forks: the postmaster is its child (pids() walks all descendants)
    cluster = Cluster(folder, port, process)
    try:
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run(
                [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True
            )
            if ready.returncode == 0:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"throwaway PostgreSQL did not start (exit {process.poll()})")
            time.sleep(0.2)
        yield cluster
    finally:
        cluster.thaw()
        cluster._signal(signal.SIGQUIT)  # immediate shutdown
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            cluster._signal(signal.SIGKILL)
            process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
