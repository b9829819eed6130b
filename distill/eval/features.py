"""The feature-extractor interface: what every network that an FD is computed in looks like to the harness.

:class:`FeatureExtractor` maps images (N, C, H, W) float in [-1, 1] to features (N, D) and says what its distance is
called (``metric``) and which weights produced it (``weights_hash``, which keys cached reference statistics);
:class:`ModuleExtractor` wraps any ``nn.Module``; :func:`to_uint8` is the quantization every sample goes through
before it is scored. The named extractors (Inception backends here, judge networks in the benchmarks) subclass
this module's class; :mod:`distill.eval.extractors` finds them by name.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distill.errors import DistillError
from distill.tensors import weights_hash as _state_dict_hash

__all__ = ["FeatureExtractor", "ModuleExtractor", "to_uint8"]

_LAYOUTS = {3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, F, H, W)"}


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
    # the batch ranks it scores: 4 (N, C, H, W) images by default; None: any of images, video (5) and audio (3)
    sample_ranks: tuple[int, ...] | None = (4,)

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
        ranks = self.sample_ranks or (3, 4, 5)
        if not isinstance(images, torch.Tensor) or images.ndim not in ranks:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            layouts = " or ".join(_LAYOUTS[r] for r in sorted(ranks))
            raise DistillError(f"{self.name} takes samples of shape {layouts}, got {shape}.")
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

    sample_ranks = None  # the module decides what it reads: images, video or audio batches

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
