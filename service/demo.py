"""The demo: synthetic chest radiographs -> a trained, calibrated demo model pair for every registered
architecture at a reduced input size (random-init backbones: no ImageNet weights can be fetched here) -> an
audit database with a fresh admin key. A second run verifies and reuses what is there.

``cxr-drift demo`` (cli/demo.py) runs this and then serves the API.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.dataset import load_index, load_split
from core.errors import ArtifactError, InputError
from core.manifest import UnsealedManifest, manifest_key_from_env, read_manifest, reseal, verify_manifest
from core.registry import get_arch, list_archs
from core.vocabulary import CHECKPOINTS, METHODS
from engine.calibrate import SUBSETS, calibrate_folder
from engine.predict import DEFAULT_TOPK
from engine.report import score_name
from engine.severity import calibration_for
from service.app.keys import create_key
from service.audit.db import make_engine, upgrade
from training.config import TrainConfig
from training.pipeline import train_pair
from training.synth import generate_dataset

log = logging.getLogger(__name__)

__all__ = [
    "DEMO_EPOCHS_FINETUNE",
    "DEMO_IMAGE_SIZE",
    "DEMO_INPUT_SIZE",
    "DEMO_N",
    "DEMO_TRAIN_MINUTES",
    "create_demo_key",
    "demo_archs",
    "demo_train_config",
    "pair_is_usable",
    "prepare_data",
    "prepare_demo",
    "prepare_pair",
]

# Reduced input sizes that keep the demo to minutes on 2 CPU cores; Inception-v3 needs >= 139 px for a
# 3x3 feature grid (its native size is 299). With random-init backbones, train's --pretrained none defaults
# apply (stage 2 from scratch: LR 1e-3, no augmentation, precise BatchNorm statistics).
DEMO_INPUT_SIZE = {"densenet201": 128, "resnet50v2": 128, "inceptionv3": 160}
# 600 images (420 train / 90 val / 90 test): stage 2 from scratch needs the training images more than it
# needs epochs; 160 px sources already exceed every demo input size.
DEMO_N = 600
DEMO_IMAGE_SIZE = 160
# Fine-tune epochs of a demo pair when ``--epochs-finetune`` is not given (else train's default, 4). The
# pair the demo first answers with (the quickest, InceptionV3) fine-tunes for 2 epochs: its fine-tuning was
# ~290 s of the ~430 s to the first answer on 2 cores (BENCHMARKS.md, "The demo").
DEMO_EPOCHS_FINETUNE = {"inceptionv3": 2}
# Training time of each demo pair on 2 quiet CPU cores (minutes; README): the quickest trains first, so the
# demo serves as soon as possible. Measured with 4 fine-tune epochs; InceptionV3's is that less its 2 fewer
# epochs (~72 s each).
DEMO_TRAIN_MINUTES = {"inceptionv3": 2.2, "resnet50v2": 4.8, "densenet201": 6.5}
# The demo calibrates on its 90 validation images: fewer than a p99 wants (engine.calibrate.MIN_REFERENCE).
DEMO_MIN_REFERENCE = 30


def demo_archs(choice: str) -> list[str]:
    """``all`` or a comma-separated list of architectures, by canonical name (an unknown one fails here)."""
    if choice == "all":
        return list_archs()
    return [get_arch(name.strip()).name for name in choice.split(",") if name.strip()]


def _trained(folder: Path) -> tuple[bool, str]:
    if not (folder / "manifest.json").is_file():
        return False, "not trained yet"
    try:
        verify_manifest(folder, read_manifest(folder), key=manifest_key_from_env())
    except (ArtifactError, OSError) as exc:
        return False, str(exc)
    return True, "ok"


def _reseal_own_artifact(folder: Path, *, say: Callable[[str], None]) -> None:
    """A demo pair written before manifests were sealed is the demo's own output: seal it (its files are
    checked against their hashes first) instead of retraining. An edited (sealed, mismatching) one is not."""
    if not (folder / "manifest.json").is_file():
        return
    key = manifest_key_from_env()
    try:
        verify_manifest(folder, read_manifest(folder), key=key)
    except UnsealedManifest:
        try:
            reseal(folder, key=key)
        except (ArtifactError, OSError) as exc:
            say(f"[demo] {folder.name}: cannot seal the earlier demo pair: {exc}")
            return
        say(f"[demo] {folder.name}: sealed the manifest of the earlier demo pair (files verified)")
    except (ArtifactError, OSError):
        return  # _trained says why


def _calibrated(folder: Path) -> bool:
    """Whether the manifest's calibration is one the report will use (engine.severity.calibration_for)."""
    summary, _ = calibration_for(
        read_manifest(folder).get("drift_calibration"),
        methods=METHODS,
        topk_percent=DEFAULT_TOPK,
        score=score_name(DEFAULT_TOPK),
    )
    return bool(summary["calibrated"])


def pair_is_usable(folder: Path) -> tuple[bool, str]:
    """Whether ``folder`` holds a verified model pair with a current drift calibration, and if not, why."""
    trained, why = _trained(folder)
    if not trained:
        return False, why
    if not _calibrated(folder):
        return False, "drift not calibrated (or calibrated by an older version)"
    return True, "ok"


def calibrate_demo_pair(folder: Path, data: Path, *, say: Callable[[str], None]) -> dict[str, Any]:
    """Calibrate on the validation split: both checkpoints right if at least :data:`DEMO_MIN_REFERENCE`
    images (or the whole split, when smaller) qualify, else the next sensitivity subset, said out loud (a
    demo's 90 validation images and its weak random-init transfer checkpoints can leave too few)."""
    n_val = len(load_split(data, class_names=read_manifest(folder)["class_names"], split="val")[0])
    minimum = min(DEMO_MIN_REFERENCE, n_val)
    for subset in SUBSETS:
        try:
            return calibrate_folder(
                folder,
                data,
                split="val",
                subset=subset,
                min_reference=minimum,
                manifest_key=manifest_key_from_env(),
            )
        except InputError as exc:
            if subset == SUBSETS[-1]:
                raise
            say(f"[demo] {folder.name}: {exc.args[0].split(';')[0]}; trying the next subset")
    raise AssertionError("unreachable: the last subset raises")


def prepare_data(
    root: Path,
    *,
    n: int = DEMO_N,
    image_size: int = DEMO_IMAGE_SIZE,
    seed: int = 0,
    say: Callable[[str], None] = log.info,
) -> tuple[Path, Path]:
    """The synthetic dataset under ``root/data`` (generated once) and a sample image: (data, sample)."""
    data = root / "data"
    manifest_csv = data / "manifest.csv"
    if not manifest_csv.is_file():
        say(f"[demo] generating {n} synthetic chest radiographs in {data} ...")
        generate_dataset(data, n=n, size=image_size, seed=seed, overwrite=True, progress=True)
    else:
        say(f"[demo] reusing synthetic data in {data}")
    sample = root / "sample.png"
    if not sample.is_file():
        index = load_index(data)
        test = index.split("test")
        chosen = next((s for s in test if index.class_names[s.label] != "normal"), test[0])
        shutil.copyfile(chosen.path, sample)
    return data, sample


def demo_train_config(
    root: Path,
    arch: str,
    *,
    seed: int = 0,
    epochs_transfer: int | None = None,
    epochs_finetune: int | None = None,
) -> TrainConfig:
    """The training run of the demo pair of ``arch``: data ``root/data``, output ``root/staging/<arch>``, its
    reduced input size, random init on the CPU; epochs given here win over the demo's and train's defaults."""
    overrides: dict[str, Any] = {}
    if epochs_transfer is not None:
        overrides["epochs_transfer"] = epochs_transfer
    if epochs_finetune is None:
        epochs_finetune = DEMO_EPOCHS_FINETUNE.get(arch)
    if epochs_finetune is not None:
        overrides["epochs_finetune"] = epochs_finetune
    return TrainConfig(
        arch=arch,
        data=str(root / "data"),
        out=str(root / "staging" / arch),
        input_size=DEMO_INPUT_SIZE.get(arch),
        pretrained="none",
        seed=seed,
        device="cpu",
        **overrides,
    )


def prepare_pair(
    root: Path,
    arch: str,
    *,
    seed: int = 0,
    epochs_transfer: int | None = None,
    epochs_finetune: int | None = None,
    retrain: bool = False,
    say: Callable[[str], None] = log.info,
) -> Path:
    """A trained, calibrated, verified pair of ``arch`` in ``root/artifacts/<arch>`` (reused when usable).

    Training and calibration happen in ``root/staging/<arch>``; the finished folder is then moved into the
    artifacts folder in one rename, so a service reloading that folder never sees a half-made pair.
    """
    data = root / "data"
    folder = root / "artifacts" / arch
    if not retrain:
        _reseal_own_artifact(folder, say=say)
    usable, why = (False, "--retrain") if retrain else pair_is_usable(folder)
    if usable:
        say(f"[demo] {arch}: reusing verified model pair in {folder}")
        return folder
    if not retrain and _trained(folder)[0]:
        calibration = calibrate_demo_pair(folder, data, say=say)
        say(f"[demo] {arch}: recalibrated on {calibration['n']} validation images ({calibration['subset']})")
        return folder
    say(f"[demo] {arch}: training a demo model pair ({why}) ...")
    started = time.perf_counter()
    staging = root / "staging" / arch
    if staging.exists():
        shutil.rmtree(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    config = demo_train_config(
        root, arch, seed=seed, epochs_transfer=epochs_transfer, epochs_finetune=epochs_finetune
    )
    train_pair(config)
    calibration = calibrate_demo_pair(staging, data, say=say)
    manifest = json.loads((staging / "manifest.json").read_text())
    stages = json.loads((staging / "train" / "metrics.json").read_text())
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    accs = {
        name: float(manifest["checkpoints"][name]["metrics"].get("accuracy", float("nan")))
        for name in CHECKPOINTS
    }
    say(
        f"[demo] {arch}: done in {time.perf_counter() - started:.0f} s (transfer "
        f"{stages['transfer']['seconds']:.0f} s, fine-tuning {config.epochs_finetune} epochs "
        f"{stages['finetuned']['seconds']:.0f} s); test accuracy "
        f"transfer {accs['transfer']:.3f}, fine-tuned {accs['finetuned']:.3f}; drift calibrated on "
        f"{calibration['n']} validation images ({calibration['subset']})"
    )
    return folder


def prepare_demo(
    root: Path,
    *,
    archs: Sequence[str],
    n: int = DEMO_N,
    image_size: int = DEMO_IMAGE_SIZE,
    seed: int = 0,
    epochs_transfer: int | None = None,
    epochs_finetune: int | None = None,
    retrain: bool = False,
    say: Callable[[str], None] = log.info,
) -> tuple[Path, Path, Path]:
    """Make sure data and trained, calibrated pairs of ``archs`` exist under ``root``; return (data, artifacts,
    sample image). ``say`` receives one progress line per step."""
    data, sample = prepare_data(root, n=n, image_size=image_size, seed=seed, say=say)
    for arch in archs:
        prepare_pair(
            root,
            arch,
            seed=seed,
            epochs_transfer=epochs_transfer,
            epochs_finetune=epochs_finetune,
            retrain=retrain,
            say=say,
        )
    return data, root / "artifacts", sample


def create_demo_key(root: Path) -> tuple[str, str]:
    """Migrate the demo's SQLite audit database under ``root`` and create an admin key: (URL, key)."""
    database_url = f"sqlite:///{(root / 'audit.db').resolve()}"
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        return database_url, create_key(engine, name=f"demo-{stamp}", role="admin")
    finally:
        engine.dispose()
