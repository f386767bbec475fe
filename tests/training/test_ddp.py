"""DDP on CPU: ``torchrun`` with 2 gloo processes trains a tiny run to completion on disjoint shards and ends
with identical weights on both ranks (the ranks' SHA-256 of their final state dicts, gathered by rank 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.images import write_image_folder


@pytest.mark.slow
def test_torchrun_two_cpu_ranks(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", classes=3, per_class=10, size=64)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CXR_DRIFT_DEBUG": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "cli.main", "train",
        "--arch", "resnet50v2", "--data", str(data), "--out", str(out), "--input-size", "64",
        "--pretrained", "none", "--epochs-transfer", "2", "--epochs-finetune", "1", "--batch-size", "3",
        "--device", "cpu", "--no-export", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ddp = json.loads((out / "train" / "ddp.json").read_text())
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    ranks = ddp["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    config = json.loads((out / "train" / "config.json").read_text())
    # feature extraction was sharded without padding: the per-rank counts add up to the train split
    per_rank = ddp["transfer_feature_samples"]["train"]
    n_train = sum(per_rank)
    assert len(per_rank) == 2 and all(n > 0 for n in per_rank)
    # every rank fine-tuned on its own shard (DistributedSampler: equal counts, padded by at most one round)
    counts = [r["samples"] for r in ranks]
    assert counts[0] == counts[1] == -(-n_train // 2)
    shards = [set(r["indices"]) for r in ranks]
    assert shards[0] | shards[1] == set(range(n_train))
    assert len(shards[0] & shards[1]) <= 2 * counts[0] - n_train
    # both ranks ended with the same weights
    assert len(ddp["finetuned_sha256"]) == 2 and ddp["finetuned_sha256"][0] == ddp["finetuned_sha256"][1]
    assert config["world_size"] == 2
    assert load_file(str(out / "finetuned.safetensors"))
