"""What the garbage collector costs a large summary in a process with a service-sized heap, and what
``gc.freeze()`` after start-up (as ``cxr-drift serve`` does) saves.

    PYTHONPATH=. python bench/summary_heap.py [--records 20000] [--repeats 9]

Seeds --records records over 365 days into a temporary SQLite file (bench/audit_scale.py's bulk path),
imports torch and onnxruntime and holds 300,000 small long-lived objects (what a running service holds), then
times a repeated day x model summary (1,095 groups, the largest typical answer) with the collector as it is,
and after ``gc.collect(); gc.freeze()``, side by side in one run: sorted wall times in ms.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.audit_scale import Writer, seed
from service.audit.db import upgrade
from service.audit.filters import AuditFilters
from service.audit.summary import summarize


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    import onnxruntime  # noqa: F401  (a service-sized heap: the service imports both)
    import torch  # noqa: F401

    folder = Path(tempfile.mkdtemp(prefix="summary_heap_"))
    url = f"sqlite:///{folder / 'audit.db'}"
    upgrade(url)
    writer = Writer(url)
    seed([writer], args.records, 365, 5000, 2)
    held = [{"i": i} for i in range(300_000)]  # long-lived objects
    options = {"filters": AuditFilters(), "group_by": ["day", "model"]}
    results = {}
    for label in ("collector as is", "after gc.freeze()", "collector as is (again)"):
        gc.unfreeze()
        if label == "after gc.freeze()":
            gc.collect()
            gc.freeze()
        summarize(writer.engine, **options)  # the reversal test and the rollup rows, kept
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            summarize(writer.engine, **options)
            times.append(1000 * (time.perf_counter() - t0))
        results[label] = times
        print(
            f"{label:26s} p50 {statistics.median(times):6.1f} ms, max {max(times):6.1f} ms:",
            sorted(round(t) for t in times),
        )
    del held
    writer.engine.dispose()
    for path in folder.glob("*"):
        path.unlink()
    folder.rmdir()


if __name__ == "__main__":
    main()
