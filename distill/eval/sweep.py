"""Generating evaluation samples with per-sample seeds, and FD-digits of a model against step count.

Sample ``i`` of an evaluation starts from its own generator seeded ``seed + i``: its initial noise and any
noise its sampler adds come from that generator alone, so images do not depend on the batch size, and the
same seeds are used at every step count and for every model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from distill.eval.frechet import FeatureStats, feature_stats, frechet_distance
from distill.samplers import get_sampler, nfe, randn
from distill.schedules import karras_sigmas


def sigma_grid(denoiser: Any, steps: int, grid: str = "trailing") -> torch.Tensor:
    """Descending sigmas (steps + 1,) for ``denoiser``: its own discrete timesteps spaced ``leading`` /
    ``trailing`` / ``linspace``, or ``karras`` between its sigma_min and sigma_max."""
    if grid == "karras":
        return karras_sigmas(steps, denoiser.sigma_min, denoiser.sigma_max)
    return denoiser.schedule.grid(steps, grid)


@torch.no_grad()
def generate(
    denoiser: Any,
    sampler: str,
    sigmas: torch.Tensor,
    n: int,
    shape: tuple[int, ...],
    *,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``n`` samples (n, *shape) on the CPU; sample i uses ``torch.Generator().manual_seed(seed + i)``."""
    fn = get_sampler(sampler)
    out = []
    for lo in range(0, n, batch_size):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(lo, min(lo + batch_size, n))]
        x = randn((len(gens), *shape), gens, device=device) * float(sigmas[0])
        out.append(fn(denoiser, x, sigmas, generator=gens).cpu())
        if progress is not None:
            progress(len(gens))
    return torch.cat(out)


@torch.no_grad()
def features_of(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """``net.features`` of images (N, C, H, W) in [-1, 1] -> (N, D); images are clamped to [-1, 1] first."""
    feats = [net.features(images[i : i + batch_size].clamp(-1, 1)) for i in range(0, len(images), batch_size)]
    return torch.cat(feats)


@dataclass
class DigitsReference:
    """The digits protocol: two disjoint random halves of the real set.

    Model samples and half B are both compared with half A's statistics using the same sample count
    (``n = len(B)``), so the data-vs-data floor ``FD(B, A)`` and model FDs compare fairly.
    """

    net: torch.nn.Module
    ref: FeatureStats  # statistics of half A
    floor: float  # FD(half B, half A)
    n: int  # samples per model evaluation = len(half B)
    split_seed: int


def digits_reference(split_seed: int = 0) -> DigitsReference:
    from distill.eval.digits_net import digits_array, load_digits_net

    images, _ = digits_array()
    perm = np.random.default_rng(split_seed).permutation(len(images))
    half = len(images) // 2
    a, b = torch.from_numpy(images[perm[:half]]), torch.from_numpy(images[perm[half : 2 * half]])
    net = load_digits_net()
    ref = feature_stats(features_of(net, a))
    floor = frechet_distance(feature_stats(features_of(net, b)), ref)
    return DigitsReference(net, ref, floor, len(b), split_seed)


def fd_digits(reference: DigitsReference, images: torch.Tensor) -> float:
    return frechet_distance(feature_stats(features_of(reference.net, images)), reference.ref)


def digits_curve(
    denoiser: Any,
    samplers: list[str],
    steps: list[int],
    reference: DigitsReference,
    *,
    grid: str = "trailing",
    seed: int = 0,
    batch_size: int = 450,
) -> list[dict[str, Any]]:
    """FD-digits of ``denoiser`` for every (sampler, step count); one dict per point."""
    rows = []
    for sampler in samplers:
        for k in steps:
            t0 = time.perf_counter()
            imgs = generate(denoiser, sampler, sigma_grid(denoiser, k, grid), reference.n, (1, 8, 8),
                            seed=seed, batch_size=batch_size)
            wall = time.perf_counter() - t0
            rows.append({
                "sampler": sampler, "steps": k, "nfe": nfe(sampler, k), "grid": grid, "metric": "FD-digits",
                "value": fd_digits(reference, imgs), "n": reference.n, "seed": seed,
                "wall_s": round(wall, 3), "samples_per_s": round(reference.n / wall, 1),
            })
    return rows
