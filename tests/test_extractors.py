"""Feature extractors: the digits net, any module, and the two Inception backends, all offline.

No real Inception weights exist on these machines. The Inception tests check the plumbing (weight lookup,
the offline error, preprocessing, the call into the library's own network code) with stand-in weights;
they say nothing about the real Inception numbers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import types
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError
from distill.eval import extractors as ex
from distill.eval import inception as inc
from distill.benchmarks.digits.judge import DEFAULT_FOLDER, digits_array
from distill.benchmarks.digits.extractor import DigitsExtractor
from distill.eval.extractors import (
    CleanFIDInception,
    FeatureExtractor,
    ModuleExtractor,
    TorchmetricsInception,
    get_extractor,
    to_uint8,
)

# The two cores are shared; these sizes need one thread (the fixture restores the previous count afterwards).
pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, c: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    """(n, c, size, size) float images in [-1, 1]."""
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------- guards


@pytest.fixture
def no_network(monkeypatch):
    """Make every way out to the network raise, and record attempts (the test asserts there were none)."""
    calls: list[str] = []

    def refuse(what):
        def _raise(*args, **kwargs):
            calls.append(what)
            raise OSError(f"network access attempted in a test ({what})")

        return _raise

    monkeypatch.setattr(urllib.request, "urlopen", refuse("urllib.request.urlopen"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse("torch.hub.download_url_to_file"))
    try:
        import requests

        monkeypatch.setattr(requests, "get", refuse("requests.get"))
        monkeypatch.setattr(requests.Session, "request", refuse("requests.Session.request"))
    except ImportError:  # pragma: no cover
        pass
    return calls


@pytest.fixture
def empty_weights(monkeypatch, tmp_path):
    """Offline, no weights anywhere: the env var and both libraries' caches point at empty folders."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(empty))
    monkeypatch.setattr(inc, "_cleanfid_cache_dir", lambda: tmp_path / "cleanfid-cache")
    monkeypatch.setattr(inc, "_torchmetrics_cache_dir", lambda: tmp_path / "hub" / "checkpoints")
    return empty


# ------------------------------------------------------------------------------------------- digits


def test_digits_extractor_shape_metric_hash():
    ext = DigitsExtractor()
    x = _images(5)
    f = ext.features(x)
    assert isinstance(ext, FeatureExtractor)
    assert f.shape == (5, 64) and f.dtype == torch.float32 and ext.dim == 64
    assert torch.equal(f, ext.features(x))
    assert ext.metric == "FD-digits" and ext.name == "digits-net"
    shipped = json.loads((DEFAULT_FOLDER / "config.json").read_text())["weights_hash"]
    assert ext.weights_hash() == shipped
    assert ext.describe() == {"name": "digits-net", "metric": "FD-digits", "dim": 64, "weights_hash": shipped}


def test_second_digits_net_is_its_own_metric():
    """digits-features-b: an independently trained net (other seed, widths and feature size) for a second opinion."""
    a, b = DigitsExtractor(), DigitsExtractor(folder="digits-features-b")
    assert (a.name, a.metric, a.dim) == ("digits-net", "FD-digits", 64)
    assert (b.name, b.metric, b.dim) == ("digits-net-b", "FD-digits-b", 48)
    assert a.weights_hash() != b.weights_hash()
    x = torch.from_numpy(digits_array()[0][:300])
    fa, fb = a.features(x), b.features(x)
    assert fa.shape == (300, 64) and fb.shape == (300, 48)
    # the shipped folder name and its path are the same network
    assert DigitsExtractor(folder=DEFAULT_FOLDER.parent / "digits-features-b").weights_hash() == b.weights_hash()
    assert DigitsExtractor(folder=DEFAULT_FOLDER).name == "digits-net"


def test_digits_extractor_independent_of_batch_size_and_clamps():
    images, _ = digits_array()
    x = torch.from_numpy(images[:40])
    ext = DigitsExtractor(batch_size=40)
    full = ext.features(x)
    ext.batch_size = 7
    # Batched matmuls may sum in another order: equal up to float32 round-off, not bit for bit.
    assert torch.allclose(ext.features(x), full, atol=1e-5, rtol=1e-5)
    # Out-of-range samples are read as their clamped values.
    assert torch.equal(ext.features(x * 3), ext.features((x * 3).clamp(-1, 1)))


def test_features_rejects_bad_inputs():
    ext = DigitsExtractor()
    with pytest.raises(DistillError, match="float images"):
        ext.features(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(DistillError, match=r"\(N, C, H, W\)"):
        ext.features(torch.zeros(1, 8, 8))
    bad = _images(3)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(DistillError, match="NaN"):
        ext.features(bad)


def test_to_uint8_round_trips_uint8_images():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(to_uint8(u.float() / 127.5 - 1), u)
    assert to_uint8(torch.tensor([[[[-5.0, 5.0]]]])).tolist() == [[[[0, 255]]]]


# ------------------------------------------------------------------------------------------- any module


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))  # (B, 4, H, W): flattened by the extractor


class _WithFeatures(_TinyNet):
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (B, C)


def test_module_extractor_shapes_metric_and_hash():
    net = _TinyNet()
    ext = ModuleExtractor(net, name="tiny", batch_size=3)
    assert ext.metric == "FD-tiny" and "FID" not in ext.metric
    f = ext.features(_images(5))
    assert f.shape == (5, 4 * 8 * 8) and ext.dim == 4 * 8 * 8
    assert torch.allclose(f, ModuleExtractor(net, name="tiny", batch_size=5).features(_images(5)), atol=1e-6)
    before = ext.weights_hash()
    assert before == ext.weights_hash() and len(before) == 16
    with torch.no_grad():
        net.conv.weight[0, 0, 0, 0] += 1e-3
    assert ext.weights_hash() != before


def test_module_extractor_prefers_features_and_applies_preprocess():
    ext = ModuleExtractor(_WithFeatures(), name="means", preprocess=lambda x: x + 1, dim=1)
    x = _images(4)
    assert torch.allclose(ext.features(x), x.mean(dim=(2, 3)) + 1, atol=1e-6)
    assert ext.dim == 1


def test_module_extractor_refuses_fid_name():
    with pytest.raises(DistillError, match="only Inception"):
        ModuleExtractor(_TinyNet(), name="tiny", metric="FID")
    with pytest.raises(DistillError, match="dim="):
        _ = ModuleExtractor(_TinyNet(), name="tiny").dim


# ------------------------------------------------------------------------------------------- offline errors


@pytest.mark.parametrize("cls, filename, url_part", [
    (CleanFIDInception, inc.CLEANFID_WEIGHTS_FILE, "nvlabs-fi-cdn.nvidia.com"),
    (TorchmetricsInception, inc.TORCHMETRICS_WEIGHTS_FILE, "github.com/toshas/torch-fidelity"),
])
def test_inception_offline_without_weights_is_one_clear_error(cls, filename, url_part, empty_weights, no_network):
    with pytest.raises(DistillError) as info:
        cls()
    msg = str(info.value)
    for part in (filename, url_part, inc.WEIGHTS_ENV, inc.WEIGHTS_FLAG, "offline"):
        assert part in msg, (part, msg)
    # An explicit path without the file is an error too, never a fall-through to a download.
    with pytest.raises(DistillError, match=filename):
        cls(weights_path=empty_weights)
    with pytest.raises(DistillError, match="does not exist"):
        cls(weights_path=empty_weights / "nope.pt")
    assert no_network == []


def _go_online(monkeypatch) -> None:
    """Lift both offline switches that distill.hub.hub_offline honours (conftest sets them for the session)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")


def test_download_false_never_downloads_even_online(empty_weights, no_network, monkeypatch):
    _go_online(monkeypatch)
    with pytest.raises(DistillError, match="download=False"):
        CleanFIDInception(download=False)
    assert no_network == []


def test_failed_download_is_a_distill_error(empty_weights, no_network, monkeypatch):
    _go_online(monkeypatch)
    with pytest.raises(DistillError, match="downloading it failed"):
        CleanFIDInception()
    assert no_network == ["torch.hub.download_url_to_file"]  # the guard caught the one attempt


def test_hf_datasets_offline_also_stops_the_download(empty_weights, no_network, monkeypatch):
    """The project's one offline switch (distill.hub.hub_offline) honours HF_DATASETS_OFFLINE too."""
    _go_online(monkeypatch)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DistillError, match="offline"):
        TorchmetricsInception()
    assert no_network == []


# ------------------------------------------------------------------------------------------- clean-fid plumbing


class _StandInLayers(nn.Module):
    """Fixed random projection of an 8x8 average pool: deterministic (B, 2048, 1, 1) like Inception's pool3."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("proj", torch.randn(3 * 8 * 8, 2048, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.adaptive_avg_pool2d(x, 8).flatten(1) @ self.proj)[:, :, None, None]


class _StandInInception(nn.Module):
    """Same call interface as NVIDIA's TorchScript Inception that clean-fid's InceptionV3W drives:
    ``base.layers(x)`` on normalised 299x299 images (clean mode) and ``base(x, return_features=True)``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _StandInLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128).flatten(1)


def _save_stand_in(folder: Path, filename: str = inc.CLEANFID_WEIGHTS_FILE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch.jit is deprecated, but clean-fid's weights are TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_StandInInception()).save(str(folder / filename))
    return folder / filename


def _cleanfid_reference(images: torch.Tensor, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """clean-fid's own clean-mode path on the same images: uint8 (computed here independently), clean-fid's
    resizer per image, clean-fid's InceptionV3W. Returns ((N, 3, 299, 299) resized, (N, 2048) features)."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    u8 = np.clip(np.floor(images.numpy().astype(np.float64) * 127.5 + 128), 0, 255).astype(np.uint8)
    if u8.shape[1] == 1:
        u8 = np.repeat(u8, 3, axis=1)
    fn_resize = build_resizer("clean")
    resized = torch.stack([torch.tensor(fn_resize(img.transpose(1, 2, 0)).transpose(2, 0, 1)) for img in u8])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = InceptionV3W(str(folder), download=False, resize_inside=False).eval()
    with torch.no_grad():
        feats = model(resized)
    return resized, feats


def test_cleanfid_plumbing_with_stand_in_weights(tmp_path, empty_weights, no_network):
    """Plumbing only, NOT the real Inception weights: a stand-in TorchScript module with clean-fid's call
    interface checks that features come out (N, 2048), that the preprocessing is clean-fid's own
    (uint8, per-channel PIL bicubic to 299x299) and that the network is driven as clean-fid drives it."""
    folder = tmp_path / "weights"
    _save_stand_in(folder)
    ext = CleanFIDInception(weights_path=folder, batch_size=2)
    x = _images(3, c=1, seed=2)
    feats = ext.features(x)
    assert feats.shape == (3, 2048) and ext.dim == 2048
    assert ext.metric == "FID" and ext.name == "inception-clean"

    resized, ref = _cleanfid_reference(x, folder)
    pre = ext.preprocess(x)
    assert pre.shape == (3, 3, 299, 299) and pre.dtype == torch.float32
    assert torch.equal(pre, resized)
    assert torch.allclose(feats, ref, rtol=1e-5, atol=1e-4)

    ext.batch_size = 3
    assert torch.allclose(ext.features(x), feats, rtol=1e-5, atol=1e-4)
    # Grey images are the RGB images with three equal channels.
    assert torch.allclose(ext.features(x.expand(-1, 3, -1, -1)), feats, rtol=1e-5, atol=1e-4)
    with pytest.raises(DistillError, match="channels"):
        ext.features(_images(2, c=2))

    h = ext.weights_hash()
    assert len(h) == 16 and h == CleanFIDInception(weights_path=folder).weights_hash()
    assert ext.describe()["weights_file"] == inc.CLEANFID_WEIGHTS_FILE
    assert no_network == []


def test_cleanfid_weights_lookup_order(tmp_path, empty_weights, monkeypatch, no_network):
    """Plumbing only (stand-in weights): a renamed file, the env var, then clean-fid's cache folder."""
    x = _images(2, c=3, seed=3)
    renamed = _save_stand_in(tmp_path / "renamed", "my-inception.pt")
    want = CleanFIDInception(weights_path=_save_stand_in(tmp_path / "canonical").parent).features(x)
    assert torch.allclose(CleanFIDInception(weights_path=renamed).features(x), want, rtol=1e-5, atol=1e-4)

    monkeypatch.setenv(inc.WEIGHTS_ENV, str(tmp_path / "canonical"))
    assert CleanFIDInception().weights_path == tmp_path / "canonical" / inc.CLEANFID_WEIGHTS_FILE
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(renamed))
    assert CleanFIDInception().weights_path == renamed

    monkeypatch.setenv(inc.WEIGHTS_ENV, str(empty_weights))
    cache = _save_stand_in(tmp_path / "cleanfid-cache")
    assert CleanFIDInception().weights_path == cache
    assert no_network == []


def test_cleanfid_rejects_a_file_that_is_not_torchscript(tmp_path, empty_weights):
    bad = tmp_path / "bad" / inc.CLEANFID_WEIGHTS_FILE
    bad.parent.mkdir()
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(DistillError, match="TorchScript"):
        CleanFIDInception(weights_path=bad)


# ------------------------------------------------------------------------------------------- torchmetrics plumbing


def _random_fidelity_weights(path: Path) -> Path:
    """A randomly initialised state dict with torch-fidelity's Inception layout (stand-in for the real file)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _RandomInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    empty = path.parent / "empty-state.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    net = _RandomInit("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    torch.save(net.state_dict(), path)
    return path


def test_torchmetrics_plumbing_with_stand_in_weights(tmp_path, empty_weights, no_network):
    """Plumbing only, NOT the real Inception weights: random weights in torch-fidelity's layout check that
    features come out (N, 2048) and equal what torchmetrics' own FrechetInceptionDistance network gives on
    the same uint8 images."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    folder = tmp_path / "tm"
    folder.mkdir()
    weights = _random_fidelity_weights(folder / inc.TORCHMETRICS_WEIGHTS_FILE)
    ext = TorchmetricsInception(weights_path=folder, batch_size=1)
    x = _images(2, c=1, seed=4)
    feats = ext.features(x)
    assert feats.shape == (2, 2048) and ext.metric == "FID" and ext.name == "inception-torchmetrics"

    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        ref = fid.inception(to_uint8(x).expand(-1, 3, -1, -1).contiguous())
    assert torch.allclose(feats, ref, rtol=1e-4, atol=1e-4)
    assert len(ext.weights_hash()) == 16
    assert no_network == []


def test_torchmetrics_refuses_a_torchscript_file(tmp_path, empty_weights):
    script = _save_stand_in(tmp_path / "ts", inc.TORCHMETRICS_WEIGHTS_FILE)
    with pytest.raises(DistillError, match="TorchScript archive"):
        TorchmetricsInception(weights_path=script)
    junk = tmp_path / "junk.pth"
    torch.save({"not": "tensors"}, junk)
    with pytest.raises(DistillError, match="state dict of tensors"):
        TorchmetricsInception(weights_path=junk)


# ------------------------------------------------------------------------------------------- registry


def test_get_extractor_builtins_and_errors():
    assert isinstance(get_extractor("digits"), DigitsExtractor)
    assert isinstance(get_extractor("digits-net", batch_size=5), DigitsExtractor)
    with pytest.raises(DistillError) as info:
        get_extractor("inception")
    for choice in ("'digits'", "'clean-fid'", "'torchmetrics'", "package.module:callable"):
        assert choice in str(info.value)
    with pytest.raises(DistillError, match="does not take weights_path"):
        get_extractor("digits", weights_path="x")
    with pytest.raises(DistillError, match="cannot import"):
        get_extractor("no_such_pkg_for_distill.nets:build")
    with pytest.raises(DistillError, match="no attribute"):
        get_extractor("distill.eval.extractors:no_such_factory")
    with pytest.raises(DistillError, match="nn.Module"):
        get_extractor("distill.eval.extractors:WEIGHTS_ENV")


def test_get_extractor_dotted_path(monkeypatch):
    fake = types.ModuleType("distill_test_fake_nets")
    fake.build = lambda width=4: _TinyNet() if width == 4 else nn.Identity()
    fake.instance = _WithFeatures()
    fake.not_a_module = lambda: "hello"
    monkeypatch.setitem(sys.modules, "distill_test_fake_nets", fake)

    ext = get_extractor("distill_test_fake_nets:build", batch_size=2)
    assert isinstance(ext, ModuleExtractor) and ext.name == "build" and ext.metric == "FD-build"
    assert ext.features(_images(3)).shape == (3, 256)
    named = get_extractor("distill_test_fake_nets:build", name="mine", width=4)
    assert named.metric == "FD-mine"
    assert get_extractor("distill_test_fake_nets:instance").features(_images(2)).shape == (2, 1)
    with pytest.raises(DistillError, match="returned a str"):
        get_extractor("distill_test_fake_nets:not_a_module")
    with pytest.raises(DistillError, match="failed"):
        get_extractor("distill_test_fake_nets:build", depth=3)


def test_get_extractor_file_path(tmp_path):
    """A file path works as everywhere in distill (distill.plugins.load_object)."""
    nets = tmp_path / "my_nets.py"
    nets.write_text("from torch import nn\n\n\ndef build():\n    return nn.Flatten()\n")
    ext = get_extractor(f"{nets}:build", dim=64)
    assert isinstance(ext, ModuleExtractor) and ext.name == "build" and ext.metric == "FD-build"
    assert ext.features(_images(2)).shape == (2, 64)
    with pytest.raises(DistillError, match="no file"):
        get_extractor(f"{tmp_path / 'nope.py'}:build")
    with pytest.raises(DistillError, match="not a name like"):
        get_extractor("distill_test_fake_nets:")


# ------------------------------------------------------------------------------------------- module layout


def test_reexports_are_the_defining_modules_objects():
    from distill.eval import features

    assert ex.FeatureExtractor is features.FeatureExtractor and ex.ModuleExtractor is features.ModuleExtractor
    assert ex.CleanFIDInception is inc.CleanFIDInception and ex.TorchmetricsInception is inc.TorchmetricsInception
    assert (ex.WEIGHTS_ENV, ex.WEIGHTS_FLAG) == (inc.WEIGHTS_ENV, inc.WEIGHTS_FLAG)
    from distill.benchmarks.text_digits.extractor import TextDigitsExtractor

    # the core's own, then each benchmark's, found through the registry
    assert ex.EXTRACTORS == {"clean-fid": CleanFIDInception, "torchmetrics": TorchmetricsInception}
    assert ex.available() == {"clean-fid": CleanFIDInception, "torchmetrics": TorchmetricsInception,
                              "digits": DigitsExtractor, "text-digits": TextDigitsExtractor}
    assert type(get_extractor("digits-net")) is DigitsExtractor  # a row's recorded name finds it again
    assert set(ex.__all__) <= set(dir(ex))
    with pytest.raises(AttributeError):
        _ = ex.no_such_name


@pytest.mark.parametrize("first", ["distill.eval.inception", "distill.benchmarks.digits.extractor",
                                   "distill.benchmarks.text_digits.extractor"])
def test_each_extractor_module_can_be_imported_first(first):
    """No import cycle: a concrete extractor's module imported first, in a fresh interpreter, still works."""
    code = (f"import {first}\n"
            "from distill.benchmarks.digits.extractor import DigitsExtractor\n"
            "from distill.eval.extractors import CleanFIDInception, available\n"
            "found = available()\n"
            "assert list(found) == ['clean-fid', 'torchmetrics', 'digits', 'text-digits'], found\n"
            "assert found['clean-fid'] is CleanFIDInception and found['digits'] is DigitsExtractor\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
