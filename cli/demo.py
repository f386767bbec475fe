"""``cxr-drift demo``: the one-command tour: prepare the demo (service/demo.py), print a key, serve the API.

It serves as soon as one model pair is ready (those already trained, else the first architecture) and
trains the others in the background; each is loaded into the running service by the model registry's reload
when it is done (a ``load`` lifecycle record each). ``--no-serve`` prepares every pair first.
"""

from __future__ import annotations

import argparse
import functools
import logging
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from service.app.main import create_app
from service.app.settings import Settings
from service.demo import (
    DEMO_EPOCHS_FINETUNE,
    DEMO_IMAGE_SIZE,
    DEMO_N,
    DEMO_TRAIN_MINUTES,
    create_demo_key,
    demo_archs,
    pair_is_usable,
    prepare_data,
    prepare_pair,
)

__all__ = ["configure_parser", "run"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=Path("demo"), help="working folder (default ./demo)")
    p.add_argument("--n", type=int, default=DEMO_N, help=f"synthetic images to generate (default {DEMO_N})")
    p.add_argument(
        "--image-size",
        type=int,
        default=DEMO_IMAGE_SIZE,
        help=f"synthetic image size in px (default {DEMO_IMAGE_SIZE})",
    )
    p.add_argument("--archs", default="all", help="comma-separated architectures (default: all registered)")
    p.add_argument("--epochs-transfer", type=int, default=None, help="stage-1 epochs (default: train's)")
    p.add_argument(
        "--epochs-finetune",
        type=int,
        default=None,
        help="stage-2 epochs (default: "
        + ", ".join(f"{n} for {a}" for a, n in DEMO_EPOCHS_FINETUNE.items())
        + "; else train's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="train again even if valid model pairs exist")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true", help="prepare everything, print the key, do not serve")


def run(args: argparse.Namespace) -> int:
    archs = demo_archs(args.archs)  # an unknown name fails here, before any work
    say = functools.partial(print, flush=True)
    root = args.dir
    _, sample = prepare_data(root, n=args.n, image_size=args.image_size, seed=args.seed, say=say)
    options = {
        "seed": args.seed,
        "epochs_transfer": args.epochs_transfer,
        "epochs_finetune": args.epochs_finetune,
        "retrain": args.retrain,
        "say": say,
    }
    # Serve as soon as one pair is ready: the pairs already usable, or else the first one; the others train
    # in the background and are loaded with the registry's reload as each finishes (a lifecycle record each).
    usable = [a for a in archs if not args.retrain and pair_is_usable(root / "artifacts" / a)[0]]
    quickest = sorted(archs, key=lambda a: DEMO_TRAIN_MINUTES.get(a, float("inf")))
    first = usable or quickest[:1]
    rest = [a for a in quickest if a not in first]
    for arch in first if not args.no_serve else archs:
        prepare_pair(root, arch, **options)
    artifacts = root / "artifacts"
    logging.getLogger("alembic").setLevel(logging.WARNING)
    database_url, key = create_demo_key(root)

    base = f"http://{args.host}:{args.port}"
    later = (
        f"\n{len(rest)} more pair(s) ({', '.join(rest)}) train in the background; each is served as soon as it "
        f"is ready (see {base}/models, and the lifecycle records at {base}/audit/model-events).\n"
        if rest and not args.no_serve
        else ""
    )
    print(
        "\n[demo] ready. API key (role admin, shown once):\n"
        f"  {key}\n\n"
        "Try it:\n"
        f"  curl -s -H 'X-API-Key: {key}' -F file=@{sample} {base}/predict\n"
        f"  curl -s -H 'X-API-Key: {key}' '{base}/audit/summary?group_by=model&group_by=method'\n"
        f"  curl -s -H 'X-API-Key: {key}' {base}/audit/verify\n"
        f"  open {base}/docs\n\n"
        f"Dashboard (sign in with the key above): {base}/dashboard\n" + later,
        flush=True,
    )
    if args.no_serve:
        return 0
    settings = Settings(
        artifacts_dir=artifacts,
        database_url=database_url,
        host=args.host,
        port=args.port,
        migrate_on_start=False,
        strict_models=False,  # a pair still training is not a failure
    )
    app = create_app(settings)
    if rest:
        threading.Thread(
            target=_train_then_serve, args=(app, root, rest, options), name="demo-training", daemon=True
        ).start()
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0


def _train_then_serve(app: Any, root: Path, archs: list[str], options: dict[str, Any]) -> None:
    """Train each remaining pair, then have the running service load it (registry reload)."""
    say = options["say"]
    for arch in archs:
        try:
            prepare_pair(root, arch, **options)
        except Exception as exc:  # the demo keeps serving what it has
            say(f"[demo] {arch}: training failed: {type(exc).__name__}: {exc}")
            continue
        while getattr(app.state, "cxr", None) is None:  # the service is still starting
            time.sleep(0.5)
        report = app.state.cxr.registry.reload(reason=f"demo: {arch} trained")
        say(f"[demo] {arch}: now served (loaded {', '.join(report.loaded) or '-'})")
