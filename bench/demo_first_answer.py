"""Time from ``cxr-drift demo`` start to its first answer and to every pair served, on one checkout.

Runs the demo of the checkout at ``--repo`` (its code on PYTHONPATH) in a fresh folder on a free port, polls
``GET /readyz`` until it answers 200, sends one ``POST /predict`` with the printed key (the first answer),
then polls ``GET /models`` until every architecture is served; prints the seconds of each, then stops the
demo. Compare two checkouts side by side with the same options, e.g. before and after issue 9:

    python bench/demo_first_answer.py --repo /work/main -- --n 60 --epochs-transfer 1 --epochs-finetune 1
    python bench/demo_first_answer.py --repo .          -- --n 60 --epochs-transfer 1 --epochs-finetune 1

(everything after ``--`` goes to ``cxr-drift demo``; without options it is the full demo, ~17 min on 2 cores
before issue 9).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("demo_args", nargs="*")
    args = parser.parse_args()
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="demo-bench-"))
    cmd = [
        sys.executable,
        "-m",
        "cli.main",
        "demo",
        "--dir",
        str(folder),
        "--port",
        str(port),
        *args.demo_args,
    ]
    env = {**os.environ, "PYTHONPATH": str(args.repo.resolve())}
    log = (folder / "demo.log").open("w+")
    started = time.monotonic()
    demo = subprocess.Popen(cmd, cwd=args.repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    marks: dict[str, float] = {}
    try:
        key = None
        while time.monotonic() - started < args.timeout:
            if demo.poll() is not None:
                raise SystemExit(f"demo exited {demo.returncode}: see {folder / 'demo.log'}")
            if key is None:
                found = re.search(r"shown once\):\s+(\S+)", (folder / "demo.log").read_text())
                key = found.group(1) if found else None
            try:
                if (
                    "first_answer" not in marks
                    and key
                    and httpx.get(f"{base}/healthz", timeout=2).status_code == 200
                ):
                    answer = httpx.post(
                        f"{base}/predict",
                        files={"file": ("s.png", (folder / "sample.png").read_bytes())},
                        headers={"X-API-Key": key},
                        timeout=120,
                    )
                    if answer.status_code == 200:
                        marks["first_answer"] = time.monotonic() - started
                        print(f"first answer after {marks['first_answer']:.0f} s", flush=True)
                if "first_answer" in marks and key:
                    models = httpx.get(f"{base}/models", headers={"X-API-Key": key}, timeout=10).json()
                    if len(models["ready"]) >= 3 or "--archs" in args.demo_args:
                        marks["all_served"] = time.monotonic() - started
                        print(f"all pairs served after {marks['all_served']:.0f} s", flush=True)
                        return 0
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise SystemExit("timed out")
    finally:
        demo.terminate()
        try:
            demo.wait(timeout=30)
        except subprocess.TimeoutExpired:
            demo.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
