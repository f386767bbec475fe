"""``cxr-drift demo``: the one-command tour: prepare the demo (service/demo.py), print a key, serve the API."""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path

import uvicorn

from service.app.main import create_app
from service.app.settings import Settings
from service.demo import DEMO_IMAGE_SIZE, DEMO_N, create_demo_key, demo_archs, prepare_demo

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
    p.add_argument("--epochs-finetune", type=int, default=None, help="stage-2 epochs (default: train's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="train again even if valid model pairs exist")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true", help="prepare everything, print the key, do not serve")


def run(args: argparse.Namespace) -> int:
    archs = demo_archs(args.archs)  # an unknown name fails here, before any work
    _, artifacts, sample = prepare_demo(
        args.dir,
        archs=archs,
        n=args.n,
        image_size=args.image_size,
        seed=args.seed,
        epochs_transfer=args.epochs_transfer,
        epochs_finetune=args.epochs_finetune,
        retrain=args.retrain,
        say=functools.partial(print, flush=True),
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    database_url, key = create_demo_key(args.dir)

    base = f"http://{args.host}:{args.port}"
    print(
        "\n[demo] ready. API key (role admin, shown once):\n"
        f"  {key}\n\n"
        "Try it:\n"
        f"  curl -s -H 'X-API-Key: {key}' -F file=@{sample} {base}/predict\n"
        f"  curl -s -H 'X-API-Key: {key}' '{base}/audit/summary?group_by=model&group_by=method'\n"
        f"  curl -s -H 'X-API-Key: {key}' {base}/audit/verify\n"
        f"  open {base}/docs\n\n"
        f"Dashboard (sign in with the key above): {base}/dashboard\n",
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
    )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0
