"""Pure tensor losses and noise-level weightings. No modules, no state.

Weightings are functions of the VE noise level ``sigma`` (B,) returning ``lambda(sigma)`` (B,). With
``SNR = 1 / sigma^2`` (VE), an x0-space MSE weighted by ``SNR`` equals the eps-prediction MSE, by ``SNR + 1``
equals the v-prediction MSE (Salimans & Ho 2022, Sec. 4), and by 1 equals the x0 (``sample``) MSE. For a
rectified flow (``x_t = (1 - t) x0 + t eps``, ``t = sigma / (1 + sigma)``) the velocity error is the x0 error over
``t``, so ``flow`` = ``1 / t^2 = (1 + 1 / sigma)^2`` gives the flow-matching MSE (1 at ``sigma = inf``).
"""

from __future__ import annotations

from typing import Callable

import torch

from distill.errors import DistillError


def snr(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.pow(-2)


WEIGHTINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "uniform": lambda s: torch.ones_like(s),  # x0 MSE
    "snr": lambda s: snr(s),  # eps MSE
    "snr+1": lambda s: snr(s) + 1,  # v MSE ("SNR+1" of progressive distillation)
    "truncated_snr": lambda s: snr(s).clamp(min=1),  # max(SNR, 1), progressive distillation's "truncated SNR"
    "karras": lambda s: (s**2 + 0.25) / (0.5 * s) ** 2,  # EDM's lambda for sigma_data = 0.5
    "flow": lambda s: (1 + s.reciprocal()) ** 2,  # rectified flow's velocity MSE: 1 / t^2, t = sigma / (1 + sigma)
}


def weighting(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in WEIGHTINGS:
        raise DistillError(f"unknown weighting {name!r}; choose one of {', '.join(WEIGHTINGS)}.")
    return WEIGHTINGS[name]


def per_sample(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the first: (B, ...) -> (B,)."""
    return x.flatten(1).mean(1)


def l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, (B, ...) -> (B,)."""
    return per_sample((pred - target) ** 2)


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute error, (B, ...) -> (B,)."""
    return per_sample((pred - target).abs())


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float = 0.00054) -> torch.Tensor:
    """Pseudo-Huber distance of Song & Dhariwal 2023 (Sec. 3.3): ``sqrt(||x - y||^2 + c^2) - c`` per sample.

    ``||.||`` is the L2 norm over the whole sample; the paper sets ``c = 0.00054 * sqrt(d)`` for d dims, which
    ``c`` here is multiplied by.
    """
    d = pred[0].numel()
    cc = c * d**0.5
    return ((pred - target).flatten(1).pow(2).sum(1) + cc**2).sqrt() - cc
