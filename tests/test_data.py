"""Data: the embedded digits set, local image folders, hub names offline, deterministic resumable batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.config import DataConfig
from distill.data import ImageBatches, digits_dataset, load_dataset
from distill.errors import DistillError


def test_digits_dataset():
    ds = digits_dataset()
    assert len(ds) == 1797 and set(ds.column_names) == {"image", "label"}
    x = ds[:5]["image"]
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32
    all_x = ds[:]["image"]
    assert all_x.min() == -1.0 and all_x.max() == 1.0
    assert sorted(set(ds[:]["label"].tolist())) == list(range(10))


def test_imagefolder(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            arr = np.full((12, 10, 3), 40 * i, dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    cfg = DataConfig(name=str(tmp_path), resolution=8, channels=3)
    batches = ImageBatches(load_dataset(cfg), cfg, seed=0)
    assert batches.sample_shape == (3, 8, 8)
    b, _, _ = batches.batch(0, 0, 4)
    assert b["image"].shape == (4, 3, 8, 8) and b["image"].min() >= -1 and b["image"].max() <= 1
    assert b["label"].shape == (4,)


def test_hub_name_offline_and_missing_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DistillError, match="hub is offline"):
        load_dataset(DataConfig(name="someone/cifar10"))
    with pytest.raises(DistillError, match="does not exist"):
        load_dataset(DataConfig(name="./no/such/folder"))


def test_batches_are_deterministic_and_resumable():
    cfg = DataConfig()
    b = ImageBatches(digits_dataset(), cfg, seed=3)
    pos = (0, 0)
    seq = []
    for _ in range(20):  # 20 * 128 > 1797: crosses an epoch boundary
        batch, *pos = b.batch(*pos, 128)
        seq.append(batch["label"])
    # restarting from a saved position gives the same continuation
    b2 = ImageBatches(digits_dataset(), cfg, seed=3)
    pos2 = (0, 0)
    for _ in range(7):
        _, *pos2 = b2.batch(*pos2, 128)
    for i in range(7, 20):
        batch, *pos2 = b2.batch(*pos2, 128)
        assert torch.equal(batch["label"], seq[i])
    # each epoch visits every sample once
    first_epoch = torch.cat(seq)[:1797]
    assert len(set(b.permutation(0).tolist())) == 1797 and first_epoch.shape[0] == 1797
