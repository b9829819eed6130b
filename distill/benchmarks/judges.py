"""The skeleton the shipped benchmarks' judge networks share.

A judge network is an evaluation instrument of one benchmark: a small CNN classifier whose penultimate layer is the
feature space of the benchmark's Frechet distance, and whose heads read prompt accuracy. It never trains a model
(:func:`distill.registry.refuse_judges`). :class:`JudgeNet` is the part the digits and colored-digits judges have in
common: conv3x3 + ReLU + 2x2 max-pool stages, then a linear layer with SiLU as the features. Each subclass adds its
heads and its own ``forward``.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError
from distill.tensors import weights_hash

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
J = TypeVar("J", bound="JudgeNet")


class JudgeNet(nn.Module):
    """conv3x3+ReLU+maxpool stages ``conv1 .. convK`` over ``in_shape`` = (C, H, W) images in [-1, 1], then
    ``fc1`` + SiLU: the (B, feature_dim) features. ``dropout`` is applied by the subclasses' heads in training.

    The feature nonlinearity is SiLU, not ReLU: with ReLU many units are zero on every image, which wastes feature
    dimensions and makes the covariance the Frechet distance is built on singular. No batch norm, so in eval mode a
    sample's features do not depend on the other samples in its batch.
    """

    def __init__(self, in_shape: tuple[int, int, int], channels: Sequence[int], feature_dim: int,
                 dropout: float) -> None:
        super().__init__()
        c, h, w = in_shape
        self.in_shape = (int(c), int(h), int(w))
        self.channels = tuple(int(ch) for ch in channels)
        self.feature_dim = int(feature_dim)
        self.dropout_p = float(dropout)
        for i, (a, b) in enumerate(zip((self.in_shape[0], *self.channels), self.channels), start=1):
            self.add_module(f"conv{i}", nn.Conv2d(a, b, kernel_size=3, padding=1))
        shrink = 2 ** len(self.channels)
        self.fc1 = nn.Linear(self.channels[-1] * (h // shrink) * (w // shrink), self.feature_dim)
        self.dropout = nn.Dropout(self.dropout_p)

    @property
    def num_features(self) -> int:
        """Feature dimension D (the name torchmetrics looks for on a custom feature extractor)."""
        return self.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features: (B, C, H, W) images in [-1, 1] -> (B, feature_dim), after the SiLU."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.in_shape:
            c, h, w = self.in_shape
            raise DistillError(f"{type(self).__name__} expects images of shape (B, {c}, {h}, {w}), got "
                               f"{tuple(x.shape)}.")
        h = x
        for i in range(1, len(self.channels) + 1):
            h = F.max_pool2d(F.relu(getattr(self, f"conv{i}")(h)), 2)
        return F.silu(self.fc1(h.flatten(1)))


def save_judge(net: JudgeNet, folder: str | Path, about: dict[str, Any], report: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` to ``folder``: ``about``'s entries (name, input, ...) around
    the architecture, the weights hash, the training ``report`` and the versions that made it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"name": about["name"], "architecture": net.architecture(),
              **{k: v for k, v in about.items() if k != "name"},
              "weights_hash": weights_hash(net), "training": dict(report or {}),
              "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}}
    try:
        import sklearn

        config["versions"]["scikit-learn"] = sklearn.__version__
    except ImportError:  # pragma: no cover - sklearn is a dependency, but saving must not need it
        pass
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_judge_config(folder: Path, module: str) -> dict[str, Any]:
    """The config.json of a saved judge in ``folder``; ``module`` trains one (``python -m module --out folder``)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise DistillError(f"no {CONFIG_FILE} in {folder}; train one with `python -m {module} --out {folder}`.")
    return json.loads(path.read_text())


def load_judge(cls: type[J], folder: Path, what: str, module: str) -> J:
    """A ``cls`` judge from ``folder`` (its config.json's architecture, its safetensors weights; nothing is
    unpickled), in eval mode. ``what`` names it in errors; ``module`` trains one."""
    from safetensors.torch import load_file

    fix = f"train one with `python -m {module} --out {folder}`"
    if not folder.is_dir():
        raise DistillError(f"{what} folder {folder} does not exist; {fix}.")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise DistillError(f"no {WEIGHTS_FILE} in {folder}; {fix}.")
    arch = dict(load_judge_config(folder, module).get("architecture", {}))
    if "channels" in arch:
        arch["channels"] = tuple(arch["channels"])
    try:
        net = cls(**arch)
        net.load_state_dict(load_file(str(weights)), strict=True)
    except (TypeError, RuntimeError) as e:
        raise DistillError(f"{weights} does not match the architecture in {folder / CONFIG_FILE}: {e}") from e
    return net.eval()


def shipped_folder(folder: str | Path | None, default: Path) -> Path:
    """A judge's folder: ``default`` for None, else ``folder`` itself, or the shipped asset of that name beside
    ``default`` (``digits-features-b``, ``text-digits-features-b``) where no such path exists."""
    if folder is None:
        return default
    path = Path(folder)
    shipped = default.parent / str(folder)
    return shipped if not path.exists() and shipped.is_dir() else path
