"""The two Inception backends of FID (``get_extractor("clean-fid")``, ``get_extractor("torchmetrics")``) and
where their weights come from.

``CleanFIDInception`` computes features exactly as clean-fid does in its "clean" mode, and
``TorchmetricsInception`` as torchmetrics' ``FrechetInceptionDistance`` does. The two do not agree with each
other (clean-fid resizes with PIL bicubic on the CPU; torchmetrics with torch's antialiased bilinear inside the
network), so their names differ and result rows record which one was used.

Inception weights are never bundled. They are found, in order, at the ``weights_path`` argument (CLI:
``--inception-weights``), at the path in the ``DISTILL_INCEPTION_WEIGHTS`` environment variable (the file, or a
folder holding it), then in the cache of the backing library. When none has them they are downloaded from the
library's own URL, unless downloads are off (``HF_HUB_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1``, as everywhere
in distill, or ``download=False``): then a DistillError says which file is needed, where it comes from and how
to pass it.
"""

from __future__ import annotations

import os
import platform
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import DistillError
from distill.tensors import weights_hash as _state_dict_hash
from distill.eval.features import FeatureExtractor, to_uint8
from distill.hub import hub_offline

__all__ = [
    "CLEANFID_WEIGHTS_FILE",
    "TORCHMETRICS_WEIGHTS_FILE",
    "WEIGHTS_ENV",
    "WEIGHTS_FLAG",
    "CleanFIDInception",
    "TorchmetricsInception",
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


def _to_rgb(images: torch.Tensor, who: str) -> torch.Tensor:
    """(N, 1 or 3, H, W) -> (N, 3, H, W); Inception is an RGB network, so grey images are repeated."""
    c = images.shape[1]
    if c == 3:
        return images
    if c == 1:
        return images.expand(-1, 3, -1, -1)
    raise DistillError(f"{who} takes grayscale (C=1) or RGB (C=3) images, got {c} channels; "
                       "convert the images to RGB first.")


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
    if download is None and hub_offline():
        raise missing("this machine is offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set), so it was not "
                      "downloaded")
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
        download: None downloads into clean-fid's cache unless HF_HUB_OFFLINE or
            HF_DATASETS_OFFLINE is set; False never downloads.
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
    refuses anything but tensors and plain containers: a pickle could otherwise run arbitrary code.

    Args:
        weights_path: the .pth file or a folder holding it.
        device: where Inception runs.
        batch_size: images per forward pass.
        download: None downloads into the torch hub cache unless HF_HUB_OFFLINE or
            HF_DATASETS_OFFLINE is set; False never downloads.
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

