"""The FD-digits feature network: the shipped asset, save/load, hashing, data helpers and a training smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill.errors import DistillError
from distill.benchmarks.digits.judge import (
    DEFAULT_FOLDER,
    DigitsNet,
    accuracy,
    digits_array,
    digits_split,
    load_digits_config,
    load_digits_net,
    main,
    save_digits_net,
    shift_augment,
    train_digits_net,
    weights_hash,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_array()
    return torch.from_numpy(x), torch.from_numpy(y)


def _random_net(seed: int = 0) -> DigitsNet:
    torch.manual_seed(seed)
    return DigitsNet().eval()


def test_digits_array():
    x, y = digits_array()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))


def test_split_is_stratified_disjoint_and_deterministic():
    _, y = digits_array()
    tr, te = digits_split(y, seed=0)
    assert len(tr) + len(te) == len(y) and len(np.intersect1d(tr, te)) == 0
    assert len(te) == 360
    # Every class is held out in (about) the same share.
    share = np.bincount(y[te], minlength=10) / np.bincount(y, minlength=10)
    assert np.all(np.abs(share - 0.2) < 0.02)
    tr2, te2 = digits_split(y, seed=0)
    np.testing.assert_array_equal(te, te2)
    assert not np.array_equal(te, digits_split(y, seed=1)[1])


def test_shipped_asset_is_accurate_on_held_out_split(digits):
    x, y = digits
    net = load_digits_net()
    assert not net.training
    cfg = load_digits_config()
    train = cfg["training"]
    _, te = digits_split(y.numpy(), seed=train["split_seed"], test_fraction=train["test_fraction"])
    assert len(te) == train["n_test"]
    acc = accuracy(net, x[te], y[te])
    assert acc >= 0.95
    assert acc == pytest.approx(train["heldout_accuracy"], abs=1e-9)
    assert cfg["weights_hash"] == weights_hash(net)
    assert sum(p.numel() for p in net.parameters()) == train["n_params"]


def test_features_shape_deterministic_and_batch_independent(digits):
    x, _ = digits
    net = load_digits_net()
    with torch.no_grad():
        f1 = net.features(x[:100])
        f2 = net.features(x[:100])
        single = torch.cat([net.features(x[i:i + 1]) for i in range(10)])
        logits = net(x[:100])
    assert f1.shape == (100, 64) and f1.dtype == torch.float32
    assert net.num_features == 64
    torch.testing.assert_close(f1, f2, rtol=0, atol=0)
    torch.testing.assert_close(single, f1[:10], rtol=1e-5, atol=1e-6)
    assert logits.shape == (100, 10)
    # Every feature varies over the data: a dead unit would waste a dimension and make the covariance singular.
    with torch.no_grad():
        assert bool((net.features(x).std(dim=0) > 1e-3).all())


def test_features_reject_wrong_shape():
    with pytest.raises(DistillError, match=r"\(B, 1, 8, 8\)"):
        _random_net().features(torch.zeros(2, 3, 8, 8))


def test_save_load_round_trip(tmp_path, digits):
    x, _ = digits
    net = _random_net(3)
    save_digits_net(net, tmp_path / "net", {"heldout_accuracy": 0.1})
    assert (tmp_path / "net" / "model.safetensors").is_file()
    cfg = json.loads((tmp_path / "net" / "config.json").read_text())
    assert cfg["training"]["heldout_accuracy"] == 0.1 and cfg["versions"]["torch"] == torch.__version__
    loaded = load_digits_net(tmp_path / "net")
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:50]), net(x[:50]), rtol=0, atol=0)
        torch.testing.assert_close(loaded.features(x[:50]), net.features(x[:50]), rtol=0, atol=0)
    assert weights_hash(loaded) == weights_hash(net)


def test_round_trip_keeps_non_default_architecture(tmp_path):
    torch.manual_seed(0)
    net = DigitsNet(channels=(8, 16), feature_dim=32).eval()
    save_digits_net(net, tmp_path)
    loaded = load_digits_net(tmp_path)
    assert loaded.channels == (8, 16) and loaded.feature_dim == 32
    assert weights_hash(loaded) == weights_hash(net)


def test_missing_folder_or_file_raises(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        load_digits_net(tmp_path / "nope")
    with pytest.raises(DistillError, match="no model.safetensors"):
        load_digits_net(tmp_path)
    save_digits_net(_random_net(), tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(DistillError, match="no config.json"):
        load_digits_net(tmp_path)


def test_mismatched_weights_raise(tmp_path):
    save_digits_net(_random_net(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architecture"]["feature_dim"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DistillError, match="does not match the architecture"):
        load_digits_net(tmp_path)


def test_weights_hash_tracks_every_weight():
    net = _random_net(0)
    h = weights_hash(net)
    assert len(h) == 16 and int(h, 16) >= 0
    assert weights_hash(_random_net(0)) == h
    with torch.no_grad():
        net.fc2.bias[3] += 1e-6
    assert weights_hash(net) != h
    with torch.no_grad():
        net.fc2.bias[3] -= 1e-6
        net.conv1.weight[0, 0, 0, 0] = -net.conv1.weight[0, 0, 0, 0]
    assert weights_hash(net) != h


def test_shift_augment():
    x = torch.rand(64, 1, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(0)
    out = shift_augment(x, generator=g)
    assert out.shape == x.shape
    for i in range(len(x)):
        # Each output is the input shifted by at most one pixel, with -1 filling the vacated border.
        padded = torch.nn.functional.pad(x[i], (1, 1, 1, 1), value=-1.0)
        assert any(torch.equal(out[i], padded[:, dy:dy + 8, dx:dx + 8]) for dy in range(3) for dx in range(3))
    assert not torch.equal(out, x)


def test_training_smoke_and_reproducible():
    state = torch.random.get_rng_state()
    net, report = train_digits_net(seed=0, epochs=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is untouched
    assert not net.training
    for key in ("heldout_accuracy", "n_train", "n_test", "seed", "split_seed", "train_seconds"):
        assert key in report
    assert report["n_train"] == 1437 and report["n_test"] == 360
    assert report["heldout_accuracy"] > 0.5  # three epochs are already far above chance (0.1)
    net2, _ = train_digits_net(seed=0, epochs=3)
    assert weights_hash(net2) == weights_hash(net)


def test_cli_writes_a_loadable_net(tmp_path, capsys):
    main(["--out", str(tmp_path / "fd"), "--epochs", "1", "--seed", "2"])
    assert "held-out accuracy" in capsys.readouterr().out
    cfg = load_digits_config(tmp_path / "fd")
    assert cfg["training"]["seed"] == 2
    assert cfg["weights_hash"] == weights_hash(load_digits_net(tmp_path / "fd"))


def test_default_folder_is_inside_the_package():
    assert DEFAULT_FOLDER.parts[-3:] == ("distill", "assets", "digits-features")
