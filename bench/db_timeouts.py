"""Database time limits: what they cost per append, and how fast a frozen PostgreSQL gives an answer.

A throwaway PostgreSQL cluster (``tests.pg_cluster``: initdb in a temp folder, a free port; needs the
PostgreSQL binaries and, as root, the ``postgres`` OS user) is migrated; ``--blocks`` blocks of ``--n``
appends alternate between an engine without limits and one with the service's (``DbTimeouts()``: 5 s), side
by side. Then the cluster is frozen (SIGSTOP, as a partition) and one append and one readiness check are
timed until they fail with DatabaseUnavailable.

    python bench/db_timeouts.py [--n 50] [--blocks 10] [--timeout 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.audit import chain, db
from tests.db_fixtures import MODELS, make_entry
from tests.pg_cluster import throwaway_cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="appends per block")
    parser.add_argument("--blocks", type=int, default=10, help="blocks per engine, alternating")
    parser.add_argument("--timeout", type=float, default=5.0, help="db_timeout_s of the bounded engine")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with throwaway_cluster() as cluster:
        db.upgrade(cluster.url)
        engines = {
            "unbounded": db.make_engine(cluster.url),
            "bounded": db.make_engine(cluster.url, db.DbTimeouts(timeout_s=args.timeout)),
        }
        per_append: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.blocks):
            for name, engine in engines.items():
                entries = [make_entry(rng, models=MODELS[:1], methods=("layercam",)) for _ in range(args.n)]
                start = time.perf_counter()
                for entry in entries:
                    chain.append(engine, entry)
                per_append[name].append((time.perf_counter() - start) / args.n * 1000)
        for name, values in per_append.items():
            print(
                f"{name:>9}: median {np.median(values):.2f} ms/append over {args.blocks} blocks of {args.n}"
            )
        cluster.freeze()
        try:
            bounded = engines["bounded"]
            for what, call in (
                ("append", lambda: chain.append(bounded, make_entry(rng))),
                ("readiness check", lambda: db.check_writable(bounded)),
            ):
                start = time.monotonic()
                try:
                    call()
                    print(f"frozen: {what} succeeded?!")
                except db.DatabaseUnavailable:
                    print(f"frozen: {what} -> DatabaseUnavailable after {time.monotonic() - start:.2f} s")
        finally:
            cluster.thaw()
        for engine in engines.values():
            engine.dispose()


if __name__ == "__main__":
    main()
