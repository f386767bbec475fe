"""Two-stage training: the loops on small real models, resume determinism, config, and the CLI's error paths.

Fast tests use a tiny real backbone (conv -> BatchNorm -> ReLU) inside the project's ``CxrClassifier``; the
full pipeline on a registry architecture is marked slow.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cli.main as cli
from cli.train import configure_parser
from core.registry import get_arch
from tests.images import write_image_folder
from training.config import TrainConfig, config_differences
from training.distributed import DistContext
from training.loaders import IndexedDataset, limit_per_split, shard_loader
from training.models import CxrClassifier
from training.passes import evaluate, extract_features, recalibrate_batchnorm
from training.stage1 import HeadFit, fit_head
from training.stage2 import run_stage, warmup_cosine

NUM_CLASSES = 3


class TinyBackbone(nn.Module):
    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act(self.norm(self.conv(x)))
        return out


def _buffer(model: CxrClassifier, name: str) -> torch.Tensor:
    value = getattr(model.backbone.norm, name)
    assert isinstance(value, torch.Tensor)
    return value


def tiny_model(seed: int = 0) -> CxrClassifier:
    torch.manual_seed(seed)
    spec = dataclasses.replace(get_arch("resnet50v2"), num_features=8)
    return CxrClassifier(spec, TinyBackbone(8), NUM_CLASSES, drop_rate=0.2)


def tensor_data(n: int = 36, size: int = 16, seed: int = 0) -> IndexedDataset:
    """Images whose class is a bright patch in one colour channel: learnable after global pooling."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 0.3
    y = torch.arange(n) % NUM_CLASSES
    for i in range(n):
        c = int(y[i])
        x[i, c, 2:14, 2:14] += 2.0
    return IndexedDataset(TensorDataset(x, y))


def small_config(tmp_path: Path, **overrides: object) -> TrainConfig:
    base = {
        "arch": "resnet50v2",
        "data": str(tmp_path / "data"),
        "out": str(tmp_path / "out"),
        "epochs_finetune": 3,
        "lr_finetune": 1e-2,
        "batch_size": 8,
        "progress": False,
        "augment": False,
    }
    base.update(overrides)
    return TrainConfig(**base)  # type: ignore[arg-type]


# -- stage 1 ---------------------------------------------------------------------------------------------


def _separable_features(n: int = 90, k: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % NUM_CLASSES
    centres = rng.normal(0, 1, size=(NUM_CLASSES, k))
    f = np.maximum(centres[y] + rng.normal(0, 0.3, size=(n, k)), 0).astype(np.float32)
    return f, y.astype(np.int64)


def _fit(
    train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray] | None, epochs: int = 20
) -> HeadFit:
    return fit_head(
        train,
        val,
        num_classes=NUM_CLASSES,
        class_names=["a", "b", "c"],
        epochs=epochs,
        lr=1e-2,
        weight_decay=1e-4,
        batch_size=16,
        drop_rate=0.0,
        seed=0,
    )


def test_head_learns_whatever_the_feature_scale() -> None:
    f, y = _separable_features()
    fits = [_fit((f * scale, y), (f * scale, y)) for scale in (1e-4, 1.0, 1e3)]
    logits = [
        (f * s) @ fit.weight.numpy().T + fit.bias.numpy()
        for s, fit in zip((1e-4, 1.0, 1e3), fits, strict=True)
    ]
    for out in logits:
        assert (out.argmax(1) == y).mean() > 0.95
    # standardization is folded into the head: same logits from any feature scale
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(logits[2], logits[1], rtol=1e-3, atol=1e-3)


def test_head_keeps_best_validation_epoch_and_resumes_identically() -> None:
    f, y = _separable_features()
    states: list[dict[str, Any]] = []
    full = fit_head(
        (f, y), (f[:30], y[:30]), num_classes=3, class_names=["a", "b", "c"], epochs=6, lr=1e-2,
        weight_decay=0.0, batch_size=16, drop_rate=0.5, seed=1, on_epoch=lambda s: states.append(copy.deepcopy(s)),
    )  # fmt: skip
    assert len(full.history) == 6 and 0 <= full.best_epoch < 6
    keys = [(h["val_macro_f1"], -h["val_loss"]) for h in full.history]
    assert keys[full.best_epoch] == max(keys)
    resumed = fit_head(
        (f, y), (f[:30], y[:30]), num_classes=3, class_names=["a", "b", "c"], epochs=6, lr=1e-2,
        weight_decay=0.0, batch_size=16, drop_rate=0.5, seed=1, state=states[2],
    )  # fmt: skip
    assert resumed.history == full.history
    assert torch.equal(resumed.weight, full.weight) and torch.equal(resumed.bias, full.bias)


def test_cached_features_path_equals_full_forward() -> None:
    model = tiny_model()
    data = tensor_data()
    loader = DataLoader(data, batch_size=8)
    recalibrate_batchnorm(model.backbone, loader, device=torch.device("cpu"), ctx=DistContext())
    assert not torch.equal(_buffer(model, "running_var"), torch.ones(8))  # statistics of the data now
    model.freeze_backbone(True)
    f, y, idx = extract_features(model, loader, device=torch.device("cpu"))
    logits, y2, idx2 = evaluate(model, loader, device=torch.device("cpu"))
    head = (f @ model.head.weight.detach().numpy().T) + model.head.bias.detach().numpy()
    np.testing.assert_allclose(head, logits, rtol=1e-5, atol=1e-5)
    assert np.array_equal(y, y2) and np.array_equal(idx, np.arange(len(data))) and np.array_equal(idx2, idx)


def test_frozen_backbone_keeps_batchnorm_statistics() -> None:
    model = tiny_model()
    model.freeze_backbone(True)
    model.train()
    before = _buffer(model, "running_mean").clone()
    model(torch.randn(4, 3, 16, 16) + 3)
    assert torch.equal(_buffer(model, "running_mean"), before)
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_shards_are_disjoint_and_cover_the_split() -> None:
    data = tensor_data(n=11)
    seen = []
    for rank in range(3):
        loader = shard_loader(data, batch_size=4, workers=0, ctx=DistContext(rank=rank, world_size=3))
        seen.append([int(i) for _, _, idx in loader for i in idx])
    assert sorted(i for shard in seen for i in shard) == list(range(11))
    assert all(set(a).isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1 :])


# -- stage 2 ---------------------------------------------------------------------------------------------


def test_finetune_learns_and_resume_is_bit_identical(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    train, val = tensor_data(seed=0), tensor_data(n=12, seed=1)
    saved: list[dict[str, Any]] = []

    def save(state: dict[str, Any]) -> None:
        path = tmp_path / f"state{state['epoch']}.pt"
        torch.save(state, path)
        saved.append(torch.load(path, weights_only=True))  # only tensors and primitive containers

    model = tiny_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    best, record = run_stage(
        model, train_set=train, val_set=val, config=config, class_names=["a", "b", "c"],
        device=torch.device("cpu"), ctx=DistContext(), on_epoch=save,
    )  # fmt: skip
    assert [h["epoch"] for h in record["history"]] == [0, 1, 2]
    assert record["history"][-1]["train_loss"] < record["history"][0]["train_loss"]
    assert any(not torch.equal(best[k], initial[k]) for k in initial)
    keys = [(h["val_macro_f1"], -h["val_loss"]) for h in record["history"]]
    assert keys[record["best_epoch"]] == max(keys)
    assert record["shards"][0]["samples"] == len(train)

    resumed_model = tiny_model(seed=123)  # different init: everything must come from the state
    best2, record2 = run_stage(
        resumed_model, train_set=train, val_set=val, config=config, class_names=["a", "b", "c"],
        device=torch.device("cpu"), ctx=DistContext(), state=saved[0],
    )  # fmt: skip
    assert record2["history"] == record["history"][:1] + record2["history"][1:]
    for k in best:
        assert torch.equal(best[k], best2[k]), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed_model.state_dict()[k]), k


def _bn_stats(model: CxrClassifier) -> tuple[torch.Tensor, torch.Tensor]:
    return _buffer(model, "running_mean").clone(), _buffer(model, "running_var").clone()


@pytest.mark.parametrize("precise", [True, False])
def test_finetune_precise_batchnorm_matches_a_fresh_recomputation(tmp_path: Path, precise: bool) -> None:
    """With precise BN the statistics the stage ends with (and evaluates with) are those of the final weights
    on the unaugmented train split; without it, train mode's lagging running averages are not."""
    config = small_config(tmp_path, epochs_finetune=2, precise_bn_images=10_000 if precise else 0)
    train, val = tensor_data(seed=0), tensor_data(n=12, seed=1)
    plain = tensor_data(seed=0)  # what bn_set is in train_pair: the same images, no augmentation
    model = tiny_model()
    run_stage(
        model, train_set=train, val_set=val, config=config, class_names=["a", "b", "c"],
        device=torch.device("cpu"), ctx=DistContext(), bn_set=plain,
    )  # fmt: skip
    fresh = copy.deepcopy(model)
    recalibrate_batchnorm(
        fresh.backbone,
        DataLoader(plain, batch_size=config.batch_size),
        device=torch.device("cpu"),
        ctx=DistContext(),
    )
    (mean, var), (fresh_mean, fresh_var) = _bn_stats(model), _bn_stats(fresh)
    loader = DataLoader(val, batch_size=8)
    logits, _, _ = evaluate(model, loader, device=torch.device("cpu"))
    fresh_logits, _, _ = evaluate(fresh, loader, device=torch.device("cpu"))
    if precise:
        torch.testing.assert_close(mean, fresh_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var, fresh_var, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(logits, fresh_logits, rtol=1e-4, atol=1e-4)
    else:
        assert not torch.allclose(mean, fresh_mean, rtol=1e-3, atol=1e-3)


def test_warmup_cosine_schedule() -> None:
    f = warmup_cosine(100, 10, floor=0.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert f(100) == pytest.approx(0.0, abs=1e-12) and f(55) == pytest.approx(0.5)


def test_limit_per_split_keeps_every_class() -> None:
    @dataclasses.dataclass
    class S:
        label: int

    samples = [S(label=i % 4) for i in range(40)]
    picked = limit_per_split(samples, 6, seed=0)
    assert len(picked) == 6 and {s.label for s in picked} == {0, 1, 2, 3}
    assert limit_per_split(samples, 6, seed=0) == picked
    assert limit_per_split(samples, None, seed=0) == samples


# -- config ----------------------------------------------------------------------------------------------


def test_config_round_trip_and_resume_differences(tmp_path: Path) -> None:
    config = small_config(tmp_path, input_size=64, limit=5)
    path = config.save(tmp_path / "config.json", class_names=["a", "b"])
    assert json.loads(path.read_text())["class_names"] == ["a", "b"]
    loaded = TrainConfig.load(path)
    assert loaded == config
    changed = dataclasses.replace(config, lr_finetune=1.0, device="cpu", workers=2)
    assert config_differences(config, changed) == {"lr_finetune": (config.lr_finetune, 1.0)}


def test_config_stage2_defaults_follow_pretrained(tmp_path: Path) -> None:
    """From a random init stage 2 trains from scratch (higher LR, no augmentation); explicit values win; the
    resolved values are what config.json stores, so --resume compares like with like."""
    base = {"arch": "resnet50v2", "data": "d", "out": "o"}
    scratch = TrainConfig(**base, pretrained="none")  # type: ignore[arg-type]
    assert (scratch.lr_finetune, scratch.augment) == (1e-3, False)
    pretrained = TrainConfig(**base, pretrained="imagenet")  # type: ignore[arg-type]
    assert (pretrained.lr_finetune, pretrained.augment) == (3e-4, True)
    explicit = TrainConfig(**base, pretrained="none", lr_finetune=5e-4, augment=True)  # type: ignore[arg-type]
    assert (explicit.lr_finetune, explicit.augment) == (5e-4, True)
    assert TrainConfig.load(scratch.save(tmp_path / "config.json")) == scratch
    assert scratch.precise_bn_images > 0
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--arch", "resnet50v2", "--data", "d", "--out", "o"])
    assert args.lr_finetune is None and args.augment is None  # resolved by TrainConfig
    assert parser.parse_args(["--arch", "a", "--data", "d", "--out", "o", "--augment"]).augment is True
    assert parser.parse_args(["--arch", "a", "--data", "d", "--out", "o", "--no-augment"]).augment is False


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch_size", 0, "batch_size"),
        ("device", "tpu", "valid options: auto, cpu, cuda"),
        ("limit", 0, "limit"),
        ("precise_bn_images", -1, "precise_bn_images"),
        ("lr_finetune", 0.0, "lr_finetune"),
    ],
)
def test_config_rejects_bad_values(tmp_path: Path, field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path, **{field: value})


# -- the CLI ---------------------------------------------------------------------------------------------


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("cxr-drift: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--arch", "resnet50v2", "--data", str(data), "--out", str(out), "--input-size", "64",
            "--pretrained", "none", "--epochs-transfer", "1", "--epochs-finetune", "1", "--no-progress",
            "--no-export", *extra]  # fmt: skip


def test_cli_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _cli_error(capsys, _train_args(tmp_path / "nowhere", tmp_path / "out"))
    assert "nowhere" in line and "not" in line


def test_cli_empty_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_image_folder(tmp_path / "data", classes=3, per_class=3, size=32)
    (data / "empty_class").mkdir()
    line = _cli_error(capsys, _train_args(data, tmp_path / "out"))
    assert "empty_class" in line


def test_cli_corrupt_image_with_on_error_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_image_folder(tmp_path / "data", classes=3, per_class=3, size=32)
    (data / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    line = _cli_error(capsys, _train_args(data, tmp_path / "out", "--on-error", "fail"))
    assert "broken.png" in line


def test_cli_unknown_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _train_args(tmp_path, tmp_path / "out")
    args[args.index("resnet50v2")] = "vgg16"
    line = _cli_error(capsys, args)
    assert "vgg16" in line and "densenet201" in line and "inceptionv3" in line


def test_cli_input_size_below_minimum(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _train_args(tmp_path, tmp_path / "out")
    args[args.index("resnet50v2")] = "inceptionv3"
    line = _cli_error(capsys, args)  # 64 px < 75 px
    assert "at least 75 px" in line and "64" in line


def test_cli_incompatible_pretrained_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_image_folder(tmp_path / "data", classes=3, per_class=3, size=32)
    weights = tmp_path / "other.safetensors"
    save_file({"stem.conv.weight": torch.zeros(5, 5, 1, 1)}, str(weights))
    args = _train_args(data, tmp_path / "out")
    args[args.index("none")] = str(weights)
    line = _cli_error(capsys, args)
    assert "do not fit" in line and "other.safetensors" in line


def test_cli_imagenet_offline_fails_fast(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    data = write_image_folder(tmp_path / "data", classes=3, per_class=3, size=32)
    args = _train_args(data, tmp_path / "out")
    args[args.index("none")] = "imagenet"
    line = _cli_error(capsys, args)
    assert "--pretrained PATH" in line


def test_cli_resume_with_nothing_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_image_folder(tmp_path / "data", classes=3, per_class=3, size=32)
    line = _cli_error(capsys, _train_args(data, tmp_path / "out", "--resume"))
    assert "nothing to resume" in line


def test_cli_resume_with_a_different_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_image_folder(tmp_path / "data", classes=3, per_class=3, size=32)
    out = tmp_path / "out"
    saved = small_config(tmp_path, data=str(data), out=str(out), input_size=64, pretrained="none")
    saved.save(out / "train" / "config.json", class_names=["class0", "class1", "class2"])
    torch.save({"done": False, "epoch": 0}, out / "train" / "transfer_state.pt")
    line = _cli_error(capsys, _train_args(data, out, "--resume"))
    assert "different config" in line and "epochs_finetune" in line


@pytest.mark.slow
def test_full_pipeline_resnet50v2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_image_folder(tmp_path / "data", classes=5, per_class=8, size=64)
    out = tmp_path / "out"
    args = [a for a in _train_args(data, out) if a != "--no-export"]
    assert cli.main(args) == 0
    assert "finetuned: test accuracy" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["class_names"] == [f"class{c}" for c in range(5)] and manifest["input_size"] == 64
    metrics = json.loads((out / "train" / "metrics.json").read_text())
    for stage in ("transfer", "finetuned"):
        for split in ("val", "test"):
            m = metrics[stage][split]
            assert m["n"] > 0 and 0 <= m["accuracy"] <= 1 and len(m["confusion_matrix"]) == 5
        assert manifest["checkpoints"][stage]["metrics"]["accuracy"] == metrics[stage]["test"]["accuracy"]
    config = json.loads((out / "train" / "config.json").read_text())
    assert config["input_size"] == 64 and config["arch"] == "resnet50v2"
    for name in ("transfer_state.pt", "finetune_state.pt", "transfer_features.pt"):
        torch.load(out / "train" / name, weights_only=True)
    transfer = load_file(str(out / "transfer.safetensors"))
    finetuned = load_file(str(out / "finetuned.safetensors"))
    # stage 1 only trained the head; stage 2 moved the backbone
    assert any(not torch.equal(transfer[k], finetuned[k]) for k in transfer if k.startswith("backbone."))
    assert not math.isnan(metrics["finetuned"]["test"]["macro_f1"])

    # resuming a finished run redoes nothing and gives the same weights
    assert cli.main([*args, "--resume", "--no-export"]) == 0
    again = load_file(str(out / "finetuned.safetensors"))
    assert all(torch.equal(again[k], finetuned[k]) for k in finetuned)
