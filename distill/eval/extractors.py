"""Feature extractors for Frechet distances: one interface, the registry of named extractors, and any nn.Module.

Every extractor maps images (N, C, H, W) float in [-1, 1] to features (N, D) and says what its distance is
called (``metric``) and which weights produced it (``weights_hash``, which keys cached reference statistics):

| ``get_extractor`` name  | class                 | ``name``                   | ``metric`` | D    |
|-------------------------|-----------------------|----------------------------|------------|------|
| ``digits``              | DigitsExtractor       | ``digits-net``             | FD-digits  | 64   |
| ``clean-fid``           | CleanFIDInception     | ``inception-clean``        | FID        | 2048 |
| ``torchmetrics``        | TorchmetricsInception | ``inception-torchmetrics`` | FID        | 2048 |
| ``pkg.module:callable`` | ModuleExtractor       | (chosen)                   | FD-<name>  | any  |

A dotted path may also name a file, ``path/to/file.py:callable``, as everywhere in distill.

Only the two Inception backends report "FID"; any other network's distance is "FD-<name>". FID is a Frechet
distance in one particular feature space (Inception-v3's pool3) and its values are read against published
ones; a Frechet distance in another network's features is on another scale, so calling it FID would invite
comparisons that do not hold. The two Inception backends do not agree with each other either (see
``distill.eval.inception``), so their names differ and result rows record which one was used.

This module holds the interface (``FeatureExtractor``), ``ModuleExtractor``, ``to_uint8``, the registry
(``EXTRACTORS``) and ``get_extractor``. ``DigitsExtractor`` lives in ``distill.eval.digits_extractor``; the two
Inception backends, with the lookup and download of their weights, in ``distill.eval.inception``. Those classes
subclass ``FeatureExtractor`` from here, so this module imports them on first use (a module ``__getattr__``)
rather than at import time, which would be an import cycle; ``from distill.eval.extractors import
CleanFIDInception`` and the like work as before.
"""

from __future__ import annotations

import abc
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distill.errors import DistillError
from distill.eval.digits_net import weights_hash as _state_dict_hash
from distill.plugins import load_object

if TYPE_CHECKING:  # for type checkers only; at run time these come from __getattr__ below
    from distill.eval.digits_extractor import DigitsExtractor
    from distill.eval.inception import (
        WEIGHTS_ENV,
        WEIGHTS_FLAG,
        CleanFIDInception,
        TorchmetricsInception,
    )

    EXTRACTORS: dict[str, type[FeatureExtractor]]

__all__ = [
    "EXTRACTORS",
    "WEIGHTS_ENV",
    "WEIGHTS_FLAG",
    "CleanFIDInception",
    "DigitsExtractor",
    "FeatureExtractor",
    "ModuleExtractor",
    "TorchmetricsInception",
    "get_extractor",
    "to_uint8",
]


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


# --------------------------------------------------------------------------------------------- registry

# Names defined in the concrete extractors' modules and re-exported here, imported on first use (see above).
_ELSEWHERE = {
    "DigitsExtractor": "distill.eval.digits_extractor",
    "TextDigitsExtractor": "distill.eval.text_digits_extractor",
    "CleanFIDInception": "distill.eval.inception",
    "TorchmetricsInception": "distill.eval.inception",
    "WEIGHTS_ENV": "distill.eval.inception",
    "WEIGHTS_FLAG": "distill.eval.inception",
}
# get_extractor name -> class; EXTRACTORS (built on first use from this) maps the same keys to the classes.
_BUILTINS = {"digits": "DigitsExtractor", "text-digits": "TextDigitsExtractor", "clean-fid": "CleanFIDInception",
             "torchmetrics": "TorchmetricsInception"}
# Each extractor's `name` is accepted too, so a name read back from a result row rebuilds the same extractor.
_ALIASES = {"digits-net": "digits", "text-digits-net": "text-digits", "inception-clean": "clean-fid",
            "inception-torchmetrics": "torchmetrics"}

_MODULE_EXTRACTOR_KWARGS = ("name", "metric", "preprocess", "dim", "device", "batch_size")


def __getattr__(name: str) -> Any:
    if name == "EXTRACTORS":
        value: Any = {key: __getattr__(cls) for key, cls in _BUILTINS.items()}
    elif name in _ELSEWHERE:
        value = getattr(importlib.import_module(_ELSEWHERE[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups find it directly; EXTRACTORS stays the one dict callers may extend
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _registry() -> dict[str, type[FeatureExtractor]]:
    """EXTRACTORS, built on first use."""
    return sys.modules[__name__].EXTRACTORS


def _choices() -> str:
    return (", ".join(repr(k) for k in _registry())
            + ", or a dotted path 'package.module:callable' (or 'path/to/file.py:callable')")


def _check_kwargs(cls: type, kwargs: dict[str, Any], label: str) -> None:
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise DistillError(f"feature extractor {label!r} does not take {', '.join(unknown)}; "
                           f"it takes {', '.join(accepted)}.")


def get_extractor(name: str, /, **kwargs: Any) -> FeatureExtractor:
    """Build a feature extractor by name.

    Args:
        name: "digits", "clean-fid", "torchmetrics" (or the extractors' own names "digits-net",
            "inception-clean", "inception-torchmetrics"), or "package.module:callable" /
            "path/to/file.py:callable" (see ``distill.plugins.load_object``) where the callable returns an
            nn.Module (or a FeatureExtractor), or is itself an nn.Module instance.
        **kwargs: the chosen class's arguments (e.g. ``weights_path``, ``device``, ``batch_size``). For a dotted
            path: ModuleExtractor's ``name`` (default: the callable's name), ``metric``, ``preprocess``, ``dim``,
            ``device``, ``batch_size``; anything else is passed to the callable.

    Raises:
        DistillError: unknown name (listing the choices), bad arguments, or a dotted path that cannot be loaded.
    """
    if not isinstance(name, str) or not name.strip():
        raise DistillError(f"feature extractor name must be a non-empty string; choose {_choices()}.")
    key = _ALIASES.get(name.strip(), name.strip())
    registry = _registry()
    if key in registry:
        cls = registry[key]
        _check_kwargs(cls, kwargs, key)
        return cls(**kwargs)
    if ":" not in key:
        raise DistillError(f"unknown feature extractor {name!r}; choose {_choices()}.")

    target = load_object(key, "feature extractor")
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
        extra = sorted(k for k in wrap_kwargs if k != "device")  # the harness always says where to run
        if extra:
            raise DistillError(f"{key!r} returned a ready FeatureExtractor; it takes no {extra}.")
        return built
    if not isinstance(built, nn.Module):
        raise DistillError(f"{key!r} returned a {type(built).__name__}; a feature network must be a torch.nn.Module.")
    wrap_kwargs.setdefault("name", key.rpartition(":")[2])
    return ModuleExtractor(built, **wrap_kwargs)
