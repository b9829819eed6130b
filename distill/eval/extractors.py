"""Feature extractors for Frechet distances: one interface over the digits net, any module, and Inception.

Every extractor maps images (N, C, H, W) float in [-1, 1] to features (N, D) and says what its distance is
called (``metric``) and which weights produced it (``weights_hash``, which keys cached reference statistics):

| ``get_extractor`` name | class                   | ``name``                 | ``metric``  | D    |
|------------------------|-------------------------|--------------------------|-------------|------|
| ``digits``             | DigitsExtractor         | ``digits-net``           | FD-digits   | 64   |
| ``clean-fid``          | CleanFIDInception       | ``inception-clean``      | FID         | 2048 |
| ``torchmetrics``       | TorchmetricsInception   | ``inception-torchmetrics`` | FID       | 2048 |
| ``pkg.module:callable``| ModuleExtractor         | (chosen)                 | FD-<name>   | any  |

Only the two Inception backends report "FID"; any other network's distance is "FD-<name>", because its numbers
are not comparable to FID (DESIGN.md, "The embedded benchmark"). The two Inception backends do not agree with
each other either (clean-fid resizes with PIL bicubic on the CPU; torchmetrics with torch's antialiased bilinear
inside the network), so their names differ and result rows record which one was used.

Inception weights are never bundled. They are found, in order, at the ``weights_path`` argument (CLI:
``--inception-weights``), at the path in the ``DISTILL_INCEPTION_WEIGHTS`` environment variable (the file, or a
folder holding it), then in the cache of the backing library. When none has them they are downloaded from the
library's own URL, unless the machine is offline (``HF_HUB_OFFLINE=1``, or ``download=False``): then a
DistillError says which file is needed, where it comes from and how to pass it.
"""

from __future__ import annotations

import abc
import importlib
import inspect
import os
import platform
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from distill.errors import DistillError
from distill.eval.digits_net import DEFAULT_FOLDER, load_digits_net, resolve_folder
from distill.eval.digits_net import weights_hash as _state_dict_hash

__all__ = [
    "WEIGHTS_ENV",
    "WEIGHTS_FLAG",
    "FeatureExtractor",
    "DigitsExtractor",
    "ModuleExtractor",
    "CleanFIDInception",
    "TorchmetricsInception",
    "EXTRACTORS",
    "get_extractor",
    "to_uint8",
]

WEIGHTS_ENV = "DISTILL_INCEPTION_WEIGHTS"
WEIGHTS_FLAG = "--inception-weights"

# clean-fid 0.1.35 (cleanfid/inception_torchscript.py, cleanfid/downloads_helper.py): InceptionV3W loads this
# TorchScript file (NVIDIA's port of the TF 2015-12-05 graph, as used by StyleGAN2-ADA) from a folder.
CLEANFID_WEIGHTS_FILE = "inception-2015-12-05.pt"
# torch-fidelity 0.4 (feature_extractor_inceptionv3.URL_INCEPTION_V3), which torchmetrics' FID builds on: a
# plain state dict converted from the same TF graph. The 6726825d suffix is torch.hub's sha256-prefix naming.
TORCHMETRICS_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
_TORCHMETRICS_HASH_PREFIX = "6726825d"
_KNOWN_WEIGHTS_FILES = (CLEANFID_WEIGHTS_FILE, TORCHMETRICS_WEIGHTS_FILE)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantize images in [-1, 1] to uint8 the way a sample is written to a PNG file.

    ``floor(x * 127.5 + 128)`` clipped to 0..255 (the EDM / StyleGAN convention). Reference images are uint8
    files, so generated images must go through the same quantization to be compared fairly (Parmar et al.
    2022); and a uint8 image u mapped to [-1, 1] by ``u / 127.5 - 1`` comes back as exactly u.

    Args:
        images: (N, C, H, W) float, nominally in [-1, 1]; values outside are clipped.

    Returns:
        (N, C, H, W) uint8.
    """
    return torch.floor(images.float() * 127.5 + 128.0).clamp_(0, 255).to(torch.uint8)


def _to_rgb(images: torch.Tensor, who: str) -> torch.Tensor:
    """(N, 1 or 3, H, W) -> (N, 3, H, W); Inception is an RGB network, so grey images are repeated."""
    c = images.shape[1]
    if c == 3:
        return images
    if c == 1:
        return images.expand(-1, 3, -1, -1)
    raise DistillError(f"{who} takes grayscale (C=1) or RGB (C=3) images, got {c} channels; "
                       "convert the images to RGB first.")


class FeatureExtractor(abc.ABC):
    """Images (N, C, H, W) in [-1, 1] -> features (N, D), processed ``batch_size`` images at a time.

    Attributes:
        name: identifies the network and its preprocessing (recorded in result rows, keys reference stats).
        metric: display name of the Frechet distance in this feature space ("FID" only for Inception).
        batch_size: images per forward pass; features do not depend on it.
        device: where the network runs; features are returned on the CPU.
    """

    name: str
    metric: str
    batch_size: int
    device: torch.device

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Feature dimension D."""

    @abc.abstractmethod
    def weights_hash(self) -> str:
        """Hex sha256 prefix over the network's weights; any weight change changes it."""

    @abc.abstractmethod
    def _extract(self, images: torch.Tensor) -> torch.Tensor:
        """One batch: (B, C, H, W) float in [-1, 1] on the CPU -> (B, D) features on any device."""

    def describe(self) -> dict[str, Any]:
        """What a result row records about the feature space: name, metric, dim and weights hash."""
        return {"name": self.name, "metric": self.metric, "dim": self.dim, "weights_hash": self.weights_hash()}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a set of images.

        Args:
            images: (N, C, H, W) float in [-1, 1], on any device.

        Returns:
            (N, D) float32 features on the CPU, row i from image i alone.
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DistillError(f"{self.name} takes images of shape (N, C, H, W), got {shape}.")
        if not images.is_floating_point():
            # A uint8 image in 0..255 would be clipped to [-1, 1] into near-black noise without any error.
            raise DistillError(f"{self.name} takes float images in [-1, 1], got dtype {images.dtype}; "
                               "map uint8 images with x / 127.5 - 1 first.")
        if len(images) == 0:
            raise DistillError(f"{self.name} got no images (N = 0).")
        if self.batch_size < 1:
            raise DistillError(f"batch_size must be >= 1, got {self.batch_size}.")
        out = []
        for lo in range(0, len(images), self.batch_size):
            batch = images[lo : lo + self.batch_size].detach().to("cpu", torch.float32)
            if not torch.isfinite(batch).all():
                raise DistillError(f"images {lo}..{lo + len(batch) - 1} contain NaN or inf values; "
                                   "the sampler or the model diverged.")
            feats = self._extract(batch)
            out.append(feats.reshape(len(batch), -1).to("cpu", torch.float32))
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, metric={self.metric!r})"


class DigitsExtractor(FeatureExtractor):
    """FD-digits: the shipped 8x8 digits classifier's 64-d penultimate features (not Inception).

    Args:
        folder: a saved DigitsNet folder; default the shipped ``distill/assets/digits-features``.
        device: where the net runs.
        batch_size: images per forward pass.
    """

    def __init__(self, folder: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 2048) -> None:
        self.device = torch.device(device)
        self.net = load_digits_net(folder).to(self.device)
        self.batch_size = int(batch_size)
        # a second, independently trained net (a shipped folder name such as digits-features-b) is its own metric
        other = folder is not None and resolve_folder(folder).resolve() != DEFAULT_FOLDER.resolve()
        tag = Path(folder).name.removeprefix("digits-features-") if other else ""
        self.name = f"digits-net-{tag}" if other else "digits-net"
        self.metric = f"FD-digits-{tag}" if other else "FD-digits"

    @property
    def dim(self) -> int:
        return self.net.feature_dim

    def weights_hash(self) -> str:
        return _state_dict_hash(self.net)

    def _extract(self, images: torch.Tensor) -> torch.Tensor:
        # The net was trained on [-1, 1]; samplers can overshoot, and out-of-range ink is not a digit feature.
        return self.net.features(images.clamp(-1, 1).to(self.device))


class ModuleExtractor(FeatureExtractor):
    """Any ``torch.nn.Module`` as a feature network: ``module.features(x)`` if it has one, else ``module(x)``.

    The module is put in eval mode. Its output (B, ...) is flattened to (B, D). Note that a module whose
    ``features`` is a submodule (torchvision's VGG / AlexNet trunks) runs only that submodule.

    Args:
        module: the network; it sees (B, C, H, W) images in [-1, 1] after ``preprocess``.
        name: short name of the feature space (keys cached statistics; the metric is ``FD-<name>``).
        metric: display name; default ``FD-<name>``. "FID" is refused: only Inception features make an FID.
        preprocess: optional (B, C, H, W) -> tensor applied to each batch before the module (resize, ...).
        dim: feature dimension, if known; otherwise taken from ``module.num_features`` / ``feature_dim`` or
            from the first ``features`` call.
        device: where the module runs (it is moved there).
        batch_size: images per forward pass.
    """

    def __init__(self, module: nn.Module, name: str, metric: str | None = None,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None, *, dim: int | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 256) -> None:
        if not isinstance(module, nn.Module):
            raise DistillError(f"ModuleExtractor needs a torch.nn.Module, got {type(module).__name__}.")
        if not name or not isinstance(name, str):
            raise DistillError("ModuleExtractor needs a non-empty name for its feature space (e.g. name='my-net').")
        metric = metric if metric is not None else f"FD-{name}"
        if metric.strip().upper().startswith("FID"):
            raise DistillError(f"metric {metric!r} for feature space {name!r}: only Inception features make an FID; "
                               f"call it FD-{name} (the default), or use get_extractor('clean-fid') for FID.")
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.name = name
        self.metric = metric
        self.preprocess = preprocess
        self.batch_size = int(batch_size)
        self._dim = dim if dim is not None else self._declared_dim(module)

    @staticmethod
    def _declared_dim(module: nn.Module) -> int | None:
        for attr in ("num_features", "feature_dim"):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                return value
        return None

    @property
    def dim(self) -> int:
        if self._dim is None:
            raise DistillError(f"the feature dimension of {self.name!r} is not known before features() has run "
                               "once; pass dim= to ModuleExtractor.")
        return self._dim

    def weights_hash(self) -> str:
        return _state_dict_hash(self.module)

    def _extract(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device)
        if self.preprocess is not None:
            x = self.preprocess(x)
        fn = getattr(self.module, "features", None)
        out = fn(x) if callable(fn) else self.module(x)
        if not isinstance(out, torch.Tensor):
            raise DistillError(f"feature network {self.name!r} returned {type(out).__name__}, not a tensor; "
                               "wrap it so that it returns a (B, D) tensor.")
        out = out.reshape(len(images), -1)
        if self._dim is None:
            self._dim = int(out.shape[1])
        return out


# --------------------------------------------------------------------------------------------- Inception


def _offline() -> bool:
    """True when the environment forbids downloads (the same switch the hub loaders in distill honour)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _cleanfid_cache_dir() -> Path:
    """Where clean-fid itself keeps the Inception file: ``cleanfid.features.feature_extractor`` hard-codes
    "/tmp" ("./" on Windows). A module-level function so tests can point it elsewhere."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def _torchmetrics_cache_dir() -> Path:
    """Where torch-fidelity's ``load_state_dict_from_url`` caches its weights: ``<torch hub dir>/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _cleanfid_url() -> str:
    from cleanfid.downloads_helper import inception_url

    return str(inception_url)


def _torchmetrics_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return str(URL_INCEPTION_V3)


def _missing_weights_message(backend: str, filename: str, url: str, looked: list[str], why: str) -> str:
    places = "; ".join(looked) if looked else "nowhere"
    return (f"{backend} needs the Inception weights file {filename}, which was not found ({places}) and "
            f"{why}. Download it from {url} on a machine with internet access, then pass its path with "
            f"{WEIGHTS_FLAG} PATH (weights_path=PATH in Python) or set {WEIGHTS_ENV}=PATH, where PATH is the "
            "file or the folder holding it.")


def _resolve_weights(backend: str, filename: str, url: str, weights_path: str | Path | None, cache_dir: Path,
                     download: bool | None, hash_prefix: str | None = None) -> Path:
    """Find (or, when allowed, download) the weights file of an Inception backend.

    Order: ``weights_path``, ``$DISTILL_INCEPTION_WEIGHTS``, ``cache_dir/filename``, then a download into
    ``cache_dir`` unless offline. An explicit ``weights_path`` that lacks the file is an error rather than a
    fall-through, since the caller asked for that file. The environment variable may name a folder that
    holds only the other backend's file, so a folder without ours is passed over.
    """
    looked: list[str] = []

    def missing(why: str) -> DistillError:
        return DistillError(_missing_weights_message(backend, filename, url, looked, why))

    if weights_path is not None:
        p = Path(weights_path).expanduser()
        if p.is_file():
            return p
        if p.is_dir() and (p / filename).is_file():
            return p / filename
        looked.append(f"weights_path {p} {'has no ' + filename if p.is_dir() else 'does not exist'}")
        raise missing("the given weights_path does not hold it")

    env = os.environ.get(WEIGHTS_ENV, "").strip()
    if env:
        p = Path(env).expanduser()
        # A file named after the other backend's weights is skipped, so one variable can serve both backends
        # when it points to a folder; any other file name is the user's choice.
        if p.is_file() and (p.name == filename or p.name not in _KNOWN_WEIGHTS_FILES):
            return p
        if p.is_dir() and (p / filename).is_file():
            return p / filename
        if not p.exists():
            looked.append(f"{WEIGHTS_ENV}={env} does not exist")
            raise missing(f"{WEIGHTS_ENV} points to a missing path")
        looked.append(f"{WEIGHTS_ENV}={env} " + ("has no " + filename if p.is_dir() else "is another backend's file"))

    cached = cache_dir / filename
    if cached.is_file():
        return cached
    looked.append(f"not in {cache_dir}")

    if download is False:
        raise missing("downloading was turned off (download=False)")
    if download is None and _offline():
        raise missing("this machine is offline (HF_HUB_OFFLINE=1), so it is not downloaded")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # download_url_to_file writes a temporary file and renames it, so an interrupted download never
        # leaves a truncated file where the next run would take it for the weights.
        torch.hub.download_url_to_file(url, str(cached), hash_prefix=hash_prefix, progress=False)
    except Exception as e:  # urllib raises URLError / HTTPError / OSError / RuntimeError (bad hash)
        raise missing(f"downloading it failed ({type(e).__name__}: {e})") from e
    return cached


def _is_torchscript_archive(path: Path) -> bool:
    """True for a zip written by ``torch.jit.save``: unlike ``torch.save`` archives it holds compiled code."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _quiet_jit_load(fn: Callable[[], nn.Module]) -> nn.Module:
    """Run ``fn`` without torch's FutureWarning that torch.jit is deprecated: clean-fid's weights only exist
    as TorchScript, so the warning tells the user nothing they can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
        return fn()


def _cleanfid_model(path: Path) -> nn.Module:
    """clean-fid's InceptionV3W (clean mode: resize outside the network) on the TorchScript file ``path``.

    InceptionV3W only takes a folder and appends the fixed file name; for a file under another name the same
    class is used with its constructor's file lookup replaced, so forward (the normalisation and the call into
    the scripted graph) stays clean-fid's own.
    """
    from cleanfid.inception_torchscript import InceptionV3W

    if path.name == CLEANFID_WEIGHTS_FILE:
        # download=False: clean-fid would otherwise fetch the file itself, ignoring the offline switch.
        return _quiet_jit_load(lambda: InceptionV3W(str(path.parent), download=False, resize_inside=False))

    class _FromFile(InceptionV3W):
        def __init__(self, file: Path) -> None:
            nn.Module.__init__(self)
            # The same three attributes InceptionV3W.__init__ sets; its forward reads only these.
            self.base = torch.jit.load(str(file), map_location="cpu").eval()
            self.layers = self.base.layers
            self.resize_inside = False

    return _quiet_jit_load(lambda: _FromFile(path))


class CleanFIDInception(FeatureExtractor):
    """FID features exactly as clean-fid 0.1.35 computes them in "clean" mode (Parmar et al., CVPR 2022).

    Per batch: [-1, 1] -> uint8 (``to_uint8``, as if saved to PNG) -> grey repeated to RGB -> each channel
    resized to 299x299 by clean-fid's own resizer (``cleanfid.resize.build_resizer("clean")``: PIL bicubic on
    float pixels, no re-quantization) -> clean-fid's ``InceptionV3W`` ((x - 128) / 128, then the TorchScript
    Inception graph up to pool3) -> (B, 2048).

    Weights: ``inception-2015-12-05.pt`` (TorchScript, ~95 MB) from clean-fid's URL
    https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt ;
    see the module docstring for where it is looked for. The file is a TorchScript archive (loaded with
    ``torch.jit.load``, as clean-fid does): only use the official file.

    Args:
        weights_path: the .pt file or a folder holding it.
        device: where Inception runs; resizing always runs on the CPU (PIL).
        batch_size: images per forward pass.
        download: None downloads into clean-fid's cache unless HF_HUB_OFFLINE=1; False never downloads.
    """

    name = "inception-clean"
    metric = "FID"
    weights_file = CLEANFID_WEIGHTS_FILE

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64, download: bool | None = None) -> None:
        try:
            from cleanfid.resize import build_resizer
        except ImportError as e:  # pragma: no cover - clean-fid is a dependency
            raise DistillError(f"the clean-fid backend needs the clean-fid package ({e}); pip install clean-fid") from e
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.weights_path = _resolve_weights("clean-fid's Inception (FID)", CLEANFID_WEIGHTS_FILE, _cleanfid_url(),
                                             weights_path, _cleanfid_cache_dir(), download)
        try:
            model = _cleanfid_model(self.weights_path)
        except (RuntimeError, ValueError, OSError, AttributeError) as e:
            raise DistillError(f"{self.weights_path} is not clean-fid's TorchScript Inception ({type(e).__name__}: "
                               f"{e}); download {CLEANFID_WEIGHTS_FILE} again from {_cleanfid_url()}.") from e
        self.model = model.to(self.device).eval()
        self._resize = build_resizer("clean")

    @property
    def dim(self) -> int:
        return 2048

    def weights_hash(self) -> str:
        # Over the scripted graph's own tensors: the wrapper registers `layers` twice (base.layers and layers).
        return _state_dict_hash(self.model.base)

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {**super().describe(), "weights_file": self.weights_path.name, "clean-fid": version("clean-fid")}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """What the network is fed, before its (x - 128) / 128 normalisation.

        Args:
            images: (B, 1 or 3, H, W) float in [-1, 1].

        Returns:
            (B, 3, 299, 299) float32 in [0, 255] on the CPU.
        """
        rgb = _to_rgb(to_uint8(images.detach().cpu()), self.name)
        # clean-fid's resizer takes one (H, W, 3) numpy image at a time, as in cleanfid.fid.get_model_features.
        hwc = rgb.permute(0, 2, 3, 1).contiguous().numpy()
        return torch.stack([torch.from_numpy(self._resize(img).transpose(2, 0, 1).copy()) for img in hwc])

    def _extract(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(images).to(self.device))


class TorchmetricsInception(FeatureExtractor):
    """FID features as torchmetrics' ``FrechetInceptionDistance(feature=2048)`` computes them.

    Per batch: [-1, 1] -> uint8 (``to_uint8``; the uint8 input torchmetrics expects by default) -> grey
    repeated to RGB -> torchmetrics' ``NoTrainInceptionV3`` built with the arguments its FID passes
    (``name="inception-v3-compat"``, features ``["2048"]``, ``antialias=True``): antialiased bilinear resize to
    299x299 inside the network, (x - 128) / 128, torch-fidelity's Inception up to pool3 -> (B, 2048).

    Needs the ``torch-fidelity`` package. Weights: ``weights-inception-2015-12-05-6726825d.pth`` (a state dict,
    ~91 MB) from torch-fidelity's URL
    https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth ;
    its default cache is ``<torch hub dir>/checkpoints`` (``$TORCH_HOME/hub/checkpoints``). torch-fidelity
    unpickles the file with ``weights_only=False``, so it is first opened here with ``weights_only=True``, which
    refuses anything but tensors and plain containers (DESIGN.md convention 5).

    Args:
        weights_path: the .pth file or a folder holding it.
        device: where Inception runs.
        batch_size: images per forward pass.
        download: None downloads into the torch hub cache unless HF_HUB_OFFLINE=1; False never downloads.
    """

    name = "inception-torchmetrics"
    metric = "FID"
    weights_file = TORCHMETRICS_WEIGHTS_FILE

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64, download: bool | None = None) -> None:
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
        except ImportError as e:  # pragma: no cover - torchmetrics is a dependency
            raise DistillError(f"the torchmetrics backend needs torchmetrics ({e}); pip install torchmetrics") from e
        if not _TORCH_FIDELITY_AVAILABLE:
            raise DistillError("the torchmetrics FID backend needs the torch-fidelity package for its Inception; "
                               "pip install torch-fidelity (or use the clean-fid backend).")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        url = _torchmetrics_url()
        self.weights_path = _resolve_weights("torchmetrics' Inception (FID)", TORCHMETRICS_WEIGHTS_FILE, url,
                                             weights_path, _torchmetrics_cache_dir(), download,
                                             hash_prefix=_TORCHMETRICS_HASH_PREFIX)
        bad = f"download {TORCHMETRICS_WEIGHTS_FILE} again from {url}"
        if _is_torchscript_archive(self.weights_path):
            # torch.load would hand a TorchScript archive to torch.jit.load, even with weights_only=True.
            raise DistillError(f"{self.weights_path} is a TorchScript archive (clean-fid's kind of file), not a "
                               f"plain state dict of tensors; {bad}, or use the clean-fid backend for this file.")
        try:
            state = torch.load(str(self.weights_path), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for unsafe or TorchScript files, RuntimeError for corrupt zips
            raise DistillError(f"{self.weights_path} is not a plain PyTorch state dict of tensors "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {bad}.") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise DistillError(f"{self.weights_path} does not hold a state dict of tensors; {bad}.")
        del state
        try:
            model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                       feature_extractor_weights_path=str(self.weights_path), antialias=True)
        except (RuntimeError, KeyError, ValueError) as e:
            raise DistillError(f"{self.weights_path} does not match torch-fidelity's Inception "
                               f"({type(e).__name__}: {str(e).splitlines()[0]}); {bad}.") from e
        self.model = model.to(self.device)

    @property
    def dim(self) -> int:
        return 2048

    def weights_hash(self) -> str:
        return _state_dict_hash(self.model)

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {**super().describe(), "weights_file": self.weights_path.name,
                "torchmetrics": version("torchmetrics"), "torch-fidelity": version("torch-fidelity")}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) float in [-1, 1] -> (B, 3, H, W) uint8, the input torchmetrics' Inception takes."""
        return _to_rgb(to_uint8(images.detach().cpu()), self.name).contiguous()

    def _extract(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(images).to(self.device))


# --------------------------------------------------------------------------------------------- registry

EXTRACTORS: dict[str, type[FeatureExtractor]] = {
    "digits": DigitsExtractor,
    "clean-fid": CleanFIDInception,
    "torchmetrics": TorchmetricsInception,
}
# Each extractor's `name` is accepted too, so a name read back from a result row rebuilds the same extractor.
_ALIASES = {"digits-net": "digits", "inception-clean": "clean-fid", "inception-torchmetrics": "torchmetrics"}

_MODULE_EXTRACTOR_KWARGS = ("name", "metric", "preprocess", "dim", "device", "batch_size")


def _choices() -> str:
    return ", ".join(repr(k) for k in EXTRACTORS) + ", or a dotted path 'package.module:callable'"


def _check_kwargs(cls: type, kwargs: dict[str, Any], label: str) -> None:
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise DistillError(f"feature extractor {label!r} does not take {', '.join(unknown)}; "
                           f"it takes {', '.join(accepted)}.")


def _load_dotted(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise DistillError(f"unknown feature extractor {spec!r}; choose {_choices()}.")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise DistillError(f"cannot import {module_name!r} for feature extractor {spec!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise DistillError(f"{module_name!r} has no attribute {attr!r} (feature extractor {spec!r}).") from e
    return obj


def get_extractor(name: str, /, **kwargs: Any) -> FeatureExtractor:
    """Build a feature extractor by name.

    Args:
        name: "digits", "clean-fid", "torchmetrics" (or the extractors' own names "digits-net",
            "inception-clean", "inception-torchmetrics"), or "package.module:callable" where the callable
            returns an nn.Module (or a FeatureExtractor), or is itself an nn.Module instance.
        **kwargs: the chosen class's arguments (e.g. ``weights_path``, ``device``, ``batch_size``). For a dotted
            path: ModuleExtractor's ``name`` (default: the callable's name), ``metric``, ``preprocess``, ``dim``,
            ``device``, ``batch_size``; anything else is passed to the callable.

    Raises:
        DistillError: unknown name (listing the choices), bad arguments, or a dotted path that cannot be loaded.
    """
    if not isinstance(name, str) or not name.strip():
        raise DistillError(f"feature extractor name must be a non-empty string; choose {_choices()}.")
    key = _ALIASES.get(name.strip(), name.strip())
    if key in EXTRACTORS:
        cls = EXTRACTORS[key]
        _check_kwargs(cls, kwargs, key)
        return cls(**kwargs)
    if ":" not in key:
        raise DistillError(f"unknown feature extractor {name!r}; choose {_choices()}.")

    target = _load_dotted(key)
    wrap_kwargs = {k: kwargs.pop(k) for k in _MODULE_EXTRACTOR_KWARGS if k in kwargs}
    if isinstance(target, (nn.Module, FeatureExtractor)):
        if kwargs:
            raise DistillError(f"{key!r} is an object, not a factory; it takes no arguments {sorted(kwargs)}.")
        built = target
    elif callable(target):
        try:
            built = target(**kwargs)
        except TypeError as e:
            raise DistillError(f"calling {key!r} with {sorted(kwargs) or 'no arguments'} failed: {e}") from e
    else:
        raise DistillError(f"{key!r} is a {type(target).__name__}, not an nn.Module or a callable returning one.")
    if isinstance(built, FeatureExtractor):
        if wrap_kwargs:
            raise DistillError(f"{key!r} returned a ready FeatureExtractor; it takes no {sorted(wrap_kwargs)}.")
        return built
    if not isinstance(built, nn.Module):
        raise DistillError(f"{key!r} returned a {type(built).__name__}; a feature network must be a torch.nn.Module.")
    wrap_kwargs.setdefault("name", key.rpartition(":")[2].rpartition(".")[2])
    return ModuleExtractor(built, **wrap_kwargs)
