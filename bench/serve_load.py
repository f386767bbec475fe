"""Served throughput and latency against the offline engine, with dynamic batching on and off, and how fast
an overloaded service says so. One run, one machine, side by side.

1. Model pairs: random-init ``--archs`` exported at ``--size`` px to a temporary folder (or ``--artifacts``).
2. Offline: ``engine.report.drift_reports`` over every pair, batch 1 and batch ``--max-batch`` (both methods),
   as requests/s (one request = one image through every pair).
3. Live: ``cxr-drift serve`` in a subprocess (uvicorn, SQLite audit log in a temp folder, auth off on
   loopback) with batching on, then off; for 1, 4 and 16 concurrent clients (``--clients``): real HTTP
   (httpx), each client posting 256 px PNGs back to back; after ``--warmup`` seconds and a first answer for
   every client, the 200s completed in ``--seconds``: throughput and p50/p95/p99; 503s counted; mean images
   per batched forward (from /metrics).
4. Overload: batching on, ``queue_bound = --overload-bound``, ``--overload-clients`` clients (a refused
   client waits 50 ms, then retries) keep every slot taken, plus one probe client sending a request every
   20 ms, alternating with a request for a route that does not exist (a 404 from the router: the floor of
   what any answer costs on this loaded server): latency of the 503 answers (all clients, and the probe's
   alone) and p99/p50 of the admitted ones.

5. Rounds: ``--rounds`` times, alternating, the offline engine at ``--max-batch`` and the live service with the
   most clients (batching on): the goal's ratio per round, side by side on a machine whose speed may drift.

Goals (issue 12): 16-client throughput >= offline batched throughput; p99 <= 3 x p50 at the queue bound;
503 in under 50 ms when overloaded. The clients run on the same cores as the service.

    python bench/serve_load.py [--archs resnet50v2] [--size 128] [--seconds 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving import wait_ready  # noqa: E402  (after the path insert)


def _radiograph(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size] / size
    lungs = np.exp(-(((cols - 0.3) / 0.15) ** 2 + ((rows - 0.5) / 0.3) ** 2))
    lungs += np.exp(-(((cols - 0.7) / 0.15) ** 2 + ((rows - 0.5) / 0.3) ** 2))
    image = 0.7 - 0.4 * lungs + 0.05 * rng.standard_normal((size, size))
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _png(gray: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((gray * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def export_pairs(archs: list[str], size: int, folder: Path) -> Path:
    import torch

    from training.export import export_pair
    from training.models import build_model

    classes = ["normal", "lobar_consolidation", "peripheral_opacities", "diffuse_opacity", "upper_nodules"]
    for i, name in enumerate(archs):
        torch.manual_seed(i)
        transfer = build_model(name, len(classes)).eval()
        finetuned = build_model(name, len(classes)).eval()
        with torch.no_grad():
            finetuned.load_state_dict(transfer.state_dict())
            for p in finetuned.parameters():
                p.add_(0.05 * p.abs().mean() * torch.randn_like(p))
        export_pair(transfer, finetuned, out_dir=folder / name, class_names=classes, input_size=size)
    return folder


def offline(
    artifacts: Path, grays: list[np.ndarray], *, batch: int, repeats: int, threads: int | None
) -> float:
    """Requests/s of the engine alone: every pair's drift reports for ``batch`` images at a time."""
    return offline_rate(load_pairs(artifacts, threads), grays, batch=batch, repeats=repeats)


def load_pairs(artifacts: Path, threads: int | None) -> list[Any]:
    from engine.runtime import ModelPair

    return [ModelPair.load(p, threads=threads) for p in sorted(artifacts.iterdir()) if p.is_dir()]


def offline_rate(pairs: list[Any], grays: list[np.ndarray], *, batch: int, repeats: int) -> float:
    """Requests/s of the engine alone over loaded ``pairs`` (median of ``repeats`` timed passes)."""
    from engine.report import drift_reports

    images = (grays * (batch // len(grays) + 1))[:batch]
    for pair in pairs:
        drift_reports(pair, images)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for pair in pairs:
            drift_reports(pair, images)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``cxr-drift serve`` in a subprocess, with the given CXR_DRIFT_* settings."""

    def __init__(self, artifacts: Path, db: Path, **settings: Any) -> None:
        self.port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO), "CXR_DRIFT_AUTH_ENABLED": "false"}
        env.update({f"CXR_DRIFT_{k.upper()}": str(v) for k, v in settings.items() if v is not None})
        cmd = [
            sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--artifacts-dir", str(artifacts), "--database-url", f"sqlite:///{db}", "--log-level", "warning",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 180) -> None:
        wait_ready(self.proc, self.url, timeout_s=timeout)

    def batch_stats(self) -> tuple[float, float]:
        """(batched forwards, images) so far, over every model pair and checkpoint."""
        import httpx

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        count = sum(float(v) for v in re.findall(r"^cxr_drift_batch_size_count\{.*\} (\S+)$", text, re.M))
        rows = sum(float(v) for v in re.findall(r"^cxr_drift_batch_size_sum\{.*\} (\S+)$", text, re.M))
        return count, rows

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _load(
    url: str, pngs: list[bytes], clients: int, seconds: float, warmup: float, *, probe: bool = False
) -> dict[str, Any]:
    """``clients`` closed-loop clients. The measured window opens on one client's answer once ``warmup``
    seconds have passed *and* every client has had an answer (the pipeline is full), and closes on that same
    client's first answer at least ``seconds`` later; what completes inside it counts. Opening and closing
    on one client's answers makes the window span whole cycles of requests: batched answers come in waves
    (16 clients: about 16 at once), and a window cut at an arbitrary time would count a wave or not (+-16
    answers). Requests still running when it closes are awaited, not counted. ``probe``: one more client
    sends one request every 20 ms inside the window, its answers timed apart (the 503 latency without the
    load clients' own queueing in this process)."""
    import httpx

    ok: list[float] = []
    refused: list[float] = []
    other: dict[int, int] = {}
    probed: list[tuple[int, float]] = []
    floor: list[float] = []
    answered: set[int] = set()
    window: list[float] = []  # [start, end, the client whose answer opened it] once open
    closed: list[float] = []  # that client's first answer at or after the end: where the window ends
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        begin = time.perf_counter()

        async def one(k: int) -> None:
            i = k
            while not window or not closed:
                start = time.perf_counter()
                files = {"file": ("x.png", pngs[i % len(pngs)], "image/png")}
                response = await client.post("/predict", files=files)
                end = time.perf_counter()
                i += clients
                answered.add(k)
                if not window:
                    if len(answered) == clients and end - begin >= warmup:
                        window.extend([end, end + seconds, k])
                elif end > window[0] and not closed:
                    if end >= window[1] and k == window[2]:
                        closed.append(end)
                    if response.status_code == 200:
                        ok.append(end - start)
                    elif response.status_code == 503:
                        refused.append(end - start)
                    else:
                        other[response.status_code] = other.get(response.status_code, 0) + 1
                if response.status_code == 503:
                    await asyncio.sleep(0.05)  # a client told to back off does, a little

        async def prober() -> None:
            while not window:
                await asyncio.sleep(0.02)
            while time.perf_counter() < window[1]:
                start = time.perf_counter()
                files = {"file": ("x.png", pngs[0], "image/png")}
                response = await client.post("/predict", files=files)
                probed.append((response.status_code, time.perf_counter() - start))
                await asyncio.sleep(0.01)
                # the floor: the cheapest answer this server gives (a 404 from the router, no thread)
                start = time.perf_counter()
                response = await client.get("/no-such-route")
                floor.append(time.perf_counter() - start)
                await asyncio.sleep(0.01)

        tasks = [one(k) for k in range(clients)] + ([prober()] if probe else [])
        await asyncio.gather(*tasks)
        elapsed = closed[0] - window[0]

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q) * 1000.0) if values else None

    return {
        "clients": clients,
        "ok": len(ok),
        "rps": len(ok) / elapsed,
        "p50_ms": pct(ok, 50),
        "p95_ms": pct(ok, 95),
        "p99_ms": pct(ok, 99),
        "refused": len(refused),
        "refused_p50_ms": pct(refused, 50),
        "refused_p99_ms": pct(refused, 99),
        "refused_max_ms": max(refused) * 1000.0 if refused else None,
        "other": other,
        "probe_503": len([t for c, t in probed if c == 503]),
        "probe_200": len([t for c, t in probed if c == 200]),
        "probe_503_p50_ms": pct([t for c, t in probed if c == 503], 50),
        "probe_503_p99_ms": pct([t for c, t in probed if c == 503], 99),
        "probe_503_max_ms": max([t for c, t in probed if c == 503], default=0.0) * 1000.0,
        "floor_404_p50_ms": pct(floor, 50),
        "floor_404_p99_ms": pct(floor, 99),
    }


def batching_on(args: argparse.Namespace) -> dict[str, Any]:
    """The service settings of every batching-on server this bench starts."""
    return {"batching": "true", "batch_window_ms": args.window_ms, "max_batch": args.max_batch}


def rounds(
    artifacts: Path, db: Path, grays: list[np.ndarray], pngs: list[bytes], args: argparse.Namespace
) -> list[dict[str, float]]:
    """The goal's ratio measured ``--rounds`` times, alternating: the offline engine at ``--max-batch``, then
    the live service (batching on) with the most ``--clients``; a machine whose speed drifts during the run
    (a shared host) moves both sides of each round alike."""
    clients = max(args.clients)
    pairs = load_pairs(artifacts, args.threads)
    server = Server(
        artifacts, db, ort_threads=args.threads, queue_bound=args.queue_bound, **batching_on(args)
    )
    out = []
    try:
        server.wait_ready()
        for _ in range(args.rounds):
            engine = offline_rate(pairs, grays, batch=args.max_batch, repeats=args.repeats)
            served = asyncio.run(_load(server.url, pngs, clients, args.seconds, args.warmup))["rps"]
            out.append({"offline": engine, "served": served, "ratio": served / engine})
            print(f"round: {out[-1]}", file=sys.stderr)
    finally:
        server.stop()
    return out


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--archs", nargs="+", default=["resnet50v2"])
    parser.add_argument("--size", type=int, default=128, help="input size of the exported pairs")
    parser.add_argument("--artifacts", type=Path, help="serve these pairs instead of exporting --archs")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point")
    parser.add_argument(
        "--threads", type=int, default=None, help="ONNX Runtime intra-op threads (both sides)"
    )
    parser.add_argument("--window-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--queue-bound", type=int, default=32)
    parser.add_argument("--overload-bound", type=int, default=4)
    parser.add_argument("--overload-clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="offline repeats (median)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating offline / most-clients rounds for the goal's ratio"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    grays = [_radiograph(256, seed) for seed in range(8)]
    pngs = [_png(g) for g in grays]
    results: dict[str, Any] = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        artifacts = args.artifacts or export_pairs(args.archs, args.size, tmp / "artifacts")
        print(f"pairs: {sorted(p.name for p in artifacts.iterdir() if p.is_dir())}", file=sys.stderr)
        results["offline"] = {
            "batch_1": offline(artifacts, grays, batch=1, repeats=args.repeats * 4, threads=args.threads),
            f"batch_{args.max_batch}": offline(
                artifacts, grays, batch=args.max_batch, repeats=args.repeats, threads=args.threads
            ),
        }
        print(f"offline: {results['offline']}", file=sys.stderr)
        common = {"ort_threads": args.threads, "queue_bound": args.queue_bound}
        modes = {
            "batching on": batching_on(args),
            "batching off": {"batching": "false"},
        }
        results["served"] = {}
        for mode, settings in modes.items():
            server = Server(artifacts, tmp / f"{mode.replace(' ', '_')}.db", **common, **settings)
            try:
                server.wait_ready()
                points = []
                for clients in args.clients:
                    before = server.batch_stats()
                    point = asyncio.run(_load(server.url, pngs, clients, args.seconds, args.warmup))
                    after = server.batch_stats()
                    forwards = after[0] - before[0]
                    point["mean_batch"] = (after[1] - before[1]) / forwards if forwards else None
                    points.append(point)
                    print(f"{mode} {clients}: {point}", file=sys.stderr)
                results["served"][mode] = points
            finally:
                server.stop()
        server = Server(
            artifacts,
            tmp / "overload.db",
            ort_threads=args.threads,
            queue_bound=args.overload_bound,
            **batching_on(args),
        )
        try:
            server.wait_ready()
            results["overload"] = asyncio.run(
                _load(server.url, pngs, args.overload_clients, args.seconds, args.warmup, probe=True)
            )
            results["overload"]["queue_bound"] = args.overload_bound
            print(f"overload: {results['overload']}", file=sys.stderr)
        finally:
            server.stop()
        results["rounds"] = rounds(artifacts, tmp / "rounds.db", grays, pngs, args)
    results["load_after"] = os.getloadavg()

    off = results["offline"]
    batched = off[f"batch_{args.max_batch}"]
    print(f"\noffline engine: batch 1 {off['batch_1']:.2f} req/s, batch {args.max_batch} {batched:.2f} req/s")
    print(
        "\n| mode | clients | req/s | p50 ms | p95 ms | p99 ms | p99/p50 | 503s | mean batch | req/s / offline batched |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, points in results["served"].items():
        for p in points:
            ratio = p["p99_ms"] / p["p50_ms"] if p["p50_ms"] else None
            print(
                f"| {mode} | {p['clients']} | {p['rps']:.2f} | {_fmt(p['p50_ms'])} | {_fmt(p['p95_ms'])} | "
                f"{_fmt(p['p99_ms'])} | {_fmt(ratio, '.2f')} | {p['refused']} | {_fmt(p['mean_batch'], '.2f')} | "
                f"{p['rps'] / batched:.2f} |"
            )
    o = results["overload"]
    ratio = o["p99_ms"] / o["p50_ms"] if o["p50_ms"] else None
    print(
        f"\noverload (queue bound {o['queue_bound']}, {o['clients']} clients): {o['ok']} answered 200 "
        f"({o['rps']:.2f} req/s, p50 {_fmt(o['p50_ms'])} ms, p99 {_fmt(o['p99_ms'])} ms, p99/p50 "
        f"{_fmt(ratio, '.2f')}); {o['refused']} answered 503 in p50 {_fmt(o['refused_p50_ms'], '.1f')} ms, "
        f"p99 {_fmt(o['refused_p99_ms'], '.1f')} ms, max {_fmt(o['refused_max_ms'], '.1f')} ms; probe: "
        f"{o['probe_503']} answered 503 in p50 {_fmt(o['probe_503_p50_ms'], '.1f')} ms, p99 "
        f"{_fmt(o['probe_503_p99_ms'], '.1f')} ms, max {o['probe_503_max_ms']:.1f} ms ({o['probe_200']} admitted); "
        f"floor (a 404 from the same server meanwhile): p50 {_fmt(o['floor_404_p50_ms'], '.1f')} ms, p99 "
        f"{_fmt(o['floor_404_p99_ms'], '.1f')} ms"
    )
    ratios = [r["ratio"] for r in results["rounds"]]
    if ratios:
        print(
            f"\nalternating rounds ({max(args.clients)} clients, batching on / offline batch {args.max_batch}): "
            + ", ".join(
                f"{r['served']:.2f} / {r['offline']:.2f} = {r['ratio']:.2f}" for r in results["rounds"]
            )
            + f"; median ratio {statistics.median(ratios):.2f}"
        )
    print(f"load average before {results['load_before']}, after {results['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
