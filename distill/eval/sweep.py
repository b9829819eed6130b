"""Generating evaluation samples with per-sample seeds, and the sigma grids they are drawn on.

Sample ``i`` of an evaluation starts from its own generator seeded ``seed + i``: its initial noise and any
noise its sampler adds come from that generator alone, so images do not depend on the batch size, and the
same seeds are used at every step count and for every model.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from distill.samplers import get_sampler, randn
from distill.schedules import karras_sigmas, scale_noise

# draw(noise (B, C, H, W) standard normal, generators [B], **cond) -> images (B, C, H, W)
Draw = Callable[..., torch.Tensor]


def sigma_grid(denoiser: Any, steps: int, grid: str = "trailing", sigma_max: float | None = None) -> torch.Tensor:
    """Descending sigmas (steps + 1,) for ``denoiser``: its own discrete timesteps spaced ``leading`` /
    ``trailing`` / ``linspace``, or ``karras`` from ``min(sigma_max, denoiser.sigma_max)`` to its sigma_min."""
    from distill.errors import DistillError

    if grid == "karras":
        if not (hasattr(denoiser, "sigma_min") and hasattr(denoiser, "sigma_max")):
            raise DistillError(f"a karras grid needs the denoiser's sigma_min and sigma_max; "
                               f"{type(denoiser).__name__} has none: give it those attributes or explicit sigmas.")
        schedule = getattr(denoiser, "schedule", None)
        most = schedule.sigma_max_finite if schedule is not None else denoiser.sigma_max  # a flow teacher's is inf
        top = most if sigma_max is None else min(sigma_max, most)
        return karras_sigmas(steps, denoiser.sigma_min, top)
    if not hasattr(denoiser, "schedule"):
        raise DistillError(f"{type(denoiser).__name__} has no discrete schedule for a {grid!r} grid; use grid karras "
                           "(with sigma_min/sigma_max attributes) or give explicit sigmas.")
    return denoiser.schedule.grid(steps, grid)


def denoiser_draw(denoiser: Any, sampler: str, sigmas: torch.Tensor, decode: Callable | None = None) -> Draw:
    """A ``draw`` that runs ``sample_<sampler>`` from ``sigmas[0] * noise`` (the noise itself at ``sigma = inf``)
    down ``sigmas``, passing ``**cond`` to every denoiser call; ``decode`` turns latents into images."""
    fn = get_sampler(sampler)

    def draw(noise: torch.Tensor, gens: Sequence[torch.Generator], **cond: torch.Tensor) -> torch.Tensor:
        out = fn(denoiser, scale_noise(noise, float(sigmas[0])), sigmas, generator=list(gens), cond=cond)
        return decode(out) if decode is not None else out

    return draw


@torch.no_grad()
def generate(
    draw: Draw,
    n: int,
    shape: tuple[int, ...],
    *,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    cond: dict[str, torch.Tensor] | None = None,
    rows: range | None = None,
) -> torch.Tensor:
    """``n`` images on the CPU from noise of ``shape`` (C, H, W); sample i uses
    ``torch.Generator().manual_seed(seed + i)`` alone, and row i of each ``cond`` tensor (n rows; ``guidance`` may
    be a float). ``rows``: only those samples (one process's share of an evaluation), the same images they are in
    the whole."""
    out = []
    span = rows if rows is not None else range(n)
    for lo in range(span.start, span.stop, batch_size):
        hi = min(lo + batch_size, span.stop)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(lo, hi)]
        noise = randn((len(gens), *shape), gens, device=device)
        part = {k: (v[lo:hi].to(device) if isinstance(v, torch.Tensor) and v.ndim > 0 else v)
                for k, v in (cond or {}).items()}
        out.append(draw(noise, gens, **part).detach().float().cpu())
        if progress is not None:
            progress(len(gens))
    return torch.cat(out) if out else torch.empty(0, *shape)
