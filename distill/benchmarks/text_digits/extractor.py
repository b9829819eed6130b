"""FD-text-digits and prompt accuracy: the shipped colored-digits classifier as a feature extractor and judge.

``get_extractor("text-digits")`` gives FD in the 64-d penultimate features of the classifier of
:mod:`distill.benchmarks.text_digits.judge` (digit and color heads; not Inception), and ``predict(images)`` its reading of
each image's digit and color, which the harness compares with the prompt's to score prompt accuracy.
``get_extractor("text-digits", folder="text-digits-features-b")`` (protocol ``text-digits-b``) is the same with the
second, independently trained network: its own metric, FD-text-digits-b, and its own judge.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.eval.features import FeatureExtractor
from distill.benchmarks.text_digits.judge import DEFAULT_FOLDER, load_text_digits_net, resolve_folder

__all__ = ["TextDigitsExtractor"]


class TextDigitsExtractor(FeatureExtractor):
    """FD-text-digits: the shipped 32x32 colored-digits classifier's 64-d penultimate features.

    Args:
        folder: a saved TextDigitsNet folder, or a shipped one's name (``text-digits-features-b``, whose metric is
            FD-text-digits-b); default the shipped ``distill/assets/text-digits-features``.
        device: where the net runs.
        batch_size: images per forward pass.
    """

    name = "text-digits-net"
    metric = "FD-text-digits"

    def __init__(self, folder: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 1024) -> None:
        self.device = torch.device(device)
        self.net = load_text_digits_net(folder).to(self.device).eval()
        self.batch_size = int(batch_size)
        # a second, independently trained net (a shipped folder name such as text-digits-features-b) is its own metric
        other = folder is not None and resolve_folder(folder).resolve() != DEFAULT_FOLDER.resolve()
        tag = Path(folder).name.removeprefix("text-digits-features-") if other else ""
        self.name = f"text-digits-net-{tag}" if other else "text-digits-net"
        self.metric = f"FD-text-digits-{tag}" if other else "FD-text-digits"

    @property
    def dim(self) -> int:
        return self.net.num_features

    def weights_hash(self) -> str:
        from distill.tensors import weights_hash

        return weights_hash(self.net)

    def _extract(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images.clamp(-1, 1).to(self.device))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The classifier's reading of images (N, 3, 32, 32) in [-1, 1]: ``{"digit": (N,), "color": (N,)}``."""
        out: dict[str, list[torch.Tensor]] = {"digit": [], "color": []}
        for lo in range(0, len(images), self.batch_size):
            d, c = self.net(images[lo : lo + self.batch_size].clamp(-1, 1).to(self.device))
            out["digit"].append(d.argmax(1).cpu())
            out["color"].append(c.argmax(1).cpu())
        return {k: torch.cat(v) for k, v in out.items()}
