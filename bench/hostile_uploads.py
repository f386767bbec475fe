"""Peak RSS of a live server under concurrent hostile uploads, for two checkouts side by side.

For each ``--code`` folder (e.g. the main checkout before the fix, and this one), start ``cli.main serve``
from it in a subprocess (uvicorn, one worker, SQLite, one small exported resnet50v2 pair), wait for
/readyz, send one warm-up prediction, then for each attack reset the server's peak RSS (``5 >
/proc/PID/clear_refs``) and send ``--clients`` uploads at once; report the statuses, the wall time and the
server's peak RSS (VmHWM) above its RSS before the attack.

Attacks:
  zero-png       a 35 KB all-zero 6000 x 6000 PNG (36 Mpx, under the 40 Mpx cap)
  patched-jpeg   a ~9 KB 96 x 96 JPEG whose frame header says 6000 x 6000
  large-jpeg     a genuine 4000 x 4000 JPEG (16 Mpx, ~1.6 MB): decodes, then inference

    python bench/hostile_uploads.py --code /work/main --code . [--clients 16]

Linux only (reads /proc). The numbers go to BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving import wait_ready  # noqa: E402  (after the path insert)

KEY = "bench-predict-key-" + "b" * 24


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def zero_png(side: int = 6000) -> bytes:
    row = b"\0" * (side + 1)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def patched_jpeg(side: int = 6000) -> bytes:
    rng = np.random.default_rng(0)
    out = bytearray(jpeg(rng.integers(0, 256, (96, 96), dtype=np.uint8), quality=95))
    pos = 2
    while pos < len(out):
        marker, length = out[pos + 1], struct.unpack(">H", out[pos + 2 : pos + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            out[pos + 5 : pos + 9] = struct.pack(">HH", side, side)
            break
        pos += 2 + length
    return bytes(out)


def large_jpeg(side: int = 4000) -> bytes:
    yy, xx = np.mgrid[0:side, 0:side] / side
    img = 120 + 60 * np.sin(5 * xx) * np.cos(3 * yy)
    img += np.random.default_rng(1).normal(0, 4, (side, side))
    return jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=85)


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def export_artifacts(folder: Path) -> Path:
    from tests.pairs import export_small_pair

    export_small_pair("resnet50v2", folder / "resnet50v2", seed=1)
    return folder


async def attack(base: str, data: bytes, clients: int) -> tuple[Counter[int], float]:
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:

        async def one() -> int:
            files = {"file": ("x", data, "application/octet-stream")}
            form = {"models": "resnet50v2", "methods": "layercam"}
            response = await client.post("/predict", files=files, data=form, headers={"X-API-Key": KEY})
            if response.status_code >= 500 and response.status_code != 503:
                print("   5xx:", response.text[:200], file=sys.stderr)
            return response.status_code

        started = time.perf_counter()
        statuses = await asyncio.gather(*(one() for _ in range(clients)))
        return Counter(statuses), time.perf_counter() - started


def run_server(code: Path, artifacts: Path, workdir: Path, attacks: dict[str, bytes], clients: int) -> dict:
    port = 18_000 + os.getpid() % 1000
    env = {
        **os.environ,
        "PYTHONPATH": str(code),
        "CXR_DRIFT_ARTIFACTS_DIR": str(artifacts),
        "CXR_DRIFT_DATABASE_URL": f"sqlite:///{workdir / 'audit.db'}",
        "CXR_DRIFT_API_KEYS": f"bench:predict:{hashlib.sha256(KEY.encode()).hexdigest()}",
        "CXR_DRIFT_ORT_THREADS": "1",
    }
    log = (workdir / "server.log").open("w")
    cmd = [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    results: dict = {"code": str(code)}
    try:
        wait_ready(server, base, log=workdir / "server.log")
        rng = np.random.default_rng(2)
        warm = jpeg(rng.integers(0, 256, (256, 256), dtype=np.uint8))
        asyncio.run(attack(base, warm, 2))
        for name, data in attacks.items():
            time.sleep(1.0)
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            before = rss_kib(server.pid, "VmRSS")
            statuses, wall = asyncio.run(attack(base, data, clients))
            peak = rss_kib(server.pid, "VmHWM")
            results[name] = {
                "file_bytes": len(data),
                "statuses": dict(sorted(statuses.items())),
                "wall_s": round(wall, 2),
                "rss_before_mib": round(before / 1024, 1),
                "peak_rss_mib": round(peak / 1024, 1),
                "peak_above_before_mib": round((peak - before) / 1024, 1),
            }
            print(f"  {name}: {json.dumps(results[name])}", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--code", action="append", type=Path, required=True, help="a checkout to serve from")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--attacks", nargs="*", default=["zero-png", "patched-jpeg", "large-jpeg"])
    args = parser.parse_args()
    makers = {"zero-png": zero_png, "patched-jpeg": patched_jpeg, "large-jpeg": large_jpeg}
    attacks = {name: makers[name]() for name in args.attacks}
    with tempfile.TemporaryDirectory(prefix="cxr-hostile-") as tmp:
        artifacts = export_artifacts(Path(tmp) / "artifacts")
        for code in args.code:
            workdir = Path(tempfile.mkdtemp(prefix="run-", dir=tmp))
            print(f"{code.resolve()} ({args.clients} clients at once)", flush=True)
            run_server(code.resolve(), artifacts, workdir, attacks, args.clients)


if __name__ == "__main__":
    main()
