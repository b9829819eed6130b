"""FD-digits: the shipped 8x8 digits classifier as a feature extractor (``get_extractor("digits")``).

The network itself (architecture, training, the shipped folders) lives in ``distill.benchmarks.digits.judge``; this
module only adapts it to the ``FeatureExtractor`` interface of ``distill.eval.extractors``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.benchmarks.digits.judge import DEFAULT_FOLDER, load_digits_net, resolve_folder
from distill.tensors import weights_hash as _state_dict_hash
from distill.eval.features import FeatureExtractor

__all__ = ["DigitsExtractor"]


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
