"""Time from ``cxr-drift demo`` start to its first answer and to every pair served, on one checkout.

Runs the demo of the checkout at ``--repo`` (its code on PYTHONPATH) in a fresh folder on a free port, polls
``GET /healthz`` until it answers 200, sends one ``POST /predict`` with the printed key (the first answer),
then polls ``GET /models`` until every architecture is served; prints the seconds of each, then stops the
demo. On the way it prints each ``[demo]`` line of the demo's log with the second it appeared, the load
average, and at the end each trained pair's stage timings and test metrics (from its ``train/metrics.json``).
``--second-run`` then starts the demo again in the same folder and times its first answer (everything reused);
``--dir`` runs it in a given folder instead of a fresh one (e.g. one an earlier run left).
Compare two checkouts side by side with the same options, e.g. before and after issue 9:

    python bench/demo_first_answer.py --repo /work/main -- --n 60 --epochs-transfer 1 --epochs-finetune 1
    python bench/demo_first_answer.py --repo .          -- --n 60 --epochs-transfer 1 --epochs-finetune 1

(everything after ``--`` goes to ``cxr-drift demo``; without options it is the full demo, ~17 min on 2 cores
before issue 9).
"""

from __future__ import annotations

import argparse
import json
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


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def stage_report(artifacts: Path) -> None:
    """Per pair: stage-1 and stage-2 seconds, the fine-tune epochs' seconds, test accuracy and macro AUC."""
    for metrics_file in sorted(artifacts.glob("*/train/metrics.json")):
        m = json.loads(metrics_file.read_text())
        epochs = "/".join(f"{e['seconds']:.0f}" for e in m["finetuned"].get("history", []))
        quality = ", ".join(
            f"{stage} acc {m[stage]['test']['accuracy']:.3f} AUC {m[stage]['test']['auc_ovr']['macro']:.3f}"
            for stage in ("transfer", "finetuned")
        )
        print(
            f"  {metrics_file.parent.parent.name}: transfer {m['transfer']['seconds']:.0f} s, fine-tune "
            f"{m['finetuned']['seconds']:.0f} s (epochs {epochs}), training {m['seconds_total']:.0f} s; "
            f"test {quality}",
            flush=True,
        )


def time_demo(args: argparse.Namespace, folder: Path, port: int, *, label: str) -> dict[str, float]:
    """Run the demo in ``folder`` until its first answer (and every pair served, unless ``--archs``)."""
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
    log_path = folder / f"demo-{label}.log"
    log = log_path.open("w+")
    print(f"[{label}] load average {load()}", flush=True)
    started = time.monotonic()
    demo = subprocess.Popen(cmd, cwd=args.repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    marks: dict[str, float] = {}
    seen = 0
    try:
        key = None
        while time.monotonic() - started < args.timeout:
            lines = log_path.read_text().splitlines()
            for line in lines[seen:]:
                if line.startswith("[demo]"):
                    print(f"{time.monotonic() - started:6.0f} s  {line}", flush=True)
            seen = len(lines)
            if demo.poll() is not None:
                raise SystemExit(f"demo exited {demo.returncode}: see {log_path}")
            if key is None:
                found = re.search(r"shown once\):\s+(\S+)", log_path.read_text())
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
                        print(
                            f"[{label}] first answer after {marks['first_answer']:.1f} s (load {load()})",
                            flush=True,
                        )
                if "first_answer" in marks and key:
                    models = httpx.get(f"{base}/models", headers={"X-API-Key": key}, timeout=10).json()
                    if len(models["ready"]) >= 3 or "--archs" in args.demo_args:
                        marks["all_served"] = time.monotonic() - started
                        print(
                            f"[{label}] all pairs served after {marks['all_served']:.1f} s (load {load()})",
                            flush=True,
                        )
                        return marks
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--second-run", action="store_true", help="then time a second run in the same folder")
    parser.add_argument("--dir", type=Path, help="the demo's folder (default: a fresh temporary one)")
    parser.add_argument("demo_args", nargs="*")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="demo-bench-"))
    print(f"demo folder {folder}", flush=True)
    time_demo(args, folder, free_port(), label="run" if args.dir else "first run")
    stage_report(folder / "artifacts")
    if args.second_run:
        time_demo(args, folder, free_port(), label="second run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
