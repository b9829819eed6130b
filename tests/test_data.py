"""Data: the embedded digits set, local image folders, hub names offline, deterministic resumable batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.config import DataConfig
from distill.benchmarks.digits.data import digits_dataset
from distill.data import ImageBatches, load_dataset
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


def test_lazily_read_data_with_workers_gives_the_same_batches_and_resumes_exactly(tmp_path, tiny_teacher):
    """Data read batch by batch by 2 worker processes: the same batches as in memory, and a run stopped half-way
    and resumed ends bitwise where an uninterrupted one does."""
    from distill.recipe import load_recipe
    from distill.trainer import Trainer

    folder = tmp_path / "digits"
    digits_dataset().save_to_disk(str(folder))
    lazy_cfg = DataConfig(name=str(folder), in_memory=False, workers=2)
    lazy = ImageBatches(load_dataset(lazy_cfg), lazy_cfg, seed=5)
    memory = ImageBatches(digits_dataset(), DataConfig(), seed=5)
    assert not lazy.in_memory and memory.in_memory
    got = [b for b, _ in zip(lazy.stream(0, 1700, 64), range(4))]  # crosses an epoch boundary
    pos = (0, 1700)
    for b, *after in got:
        want, *pos = memory.batch(*pos, 64)
        assert torch.equal(b["image"], want["image"]) and torch.equal(b["label"], want["label"])
        assert tuple(after) == tuple(pos)

    recipe = "recipes/digits/consistency.yaml"
    over = [f"teacher={tiny_teacher}", f"data.name={folder}", "data.in_memory=false", "data.workers=2",
            "method.iters=4", "method.num_steps=10", "method.sample_steps=[1]", "trainer.batch_size=700",
            "trainer.checkpoint_every=2", "eval.protocol=null", "trainer.progress=false", "trainer.threads=1"]
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    a = Trainer(load_recipe(root / recipe, over), tmp_path / "a")
    a.fit()
    b = Trainer(load_recipe(root / recipe, over), tmp_path / "b")
    b.tc.max_steps = 2
    b.fit()
    b2 = Trainer(load_recipe(root / recipe, over), tmp_path / "b")
    b2.fit()
    assert (a.epoch, a.offset) == (b2.epoch, b2.offset) == (1, 1003)  # 4 x 700 samples: into the second epoch
    for (k, va), vb in zip(a.method.student.state_dict().items(), b2.method.student.state_dict().values()):
        assert torch.equal(va, vb), k
