"""Noise levels and the conversions between their three spellings.

Inside distill every noise level is a variance-exploding sigma (Karras et al. 2022, "EDM"):
``x = x0 + sigma * eps``. Discrete-time teachers (DDPM, Ho et al. 2020) use the variance-preserving form
``x_t = alpha_t * x0 + sigma_t * eps`` with ``alpha_t**2 = alphas_cumprod[t]`` and ``alpha_t**2 + sigma_t**2 = 1``.
The two are related by::

    sigma = sigma_t / alpha_t                 (VP -> VE noise level)
    alpha_t = 1 / sqrt(1 + sigma**2)          (VE -> VP signal scale)
    x_vp = alpha_t * x_ve                     (VP scaling at the model's edge)

and ``t`` is the discrete timestep whose ``alphas_cumprod`` gives that sigma. Between integer timesteps,
``t <-> sigma`` is piecewise linear in sigma, exactly as diffusers' ``EulerDiscreteScheduler`` interpolates,
so fractional timesteps from that scheduler map to the same sigmas here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from distill.errors import DistillError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")


def vp_alpha(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """VP signal scale ``alpha_t = 1 / sqrt(1 + sigma^2)`` for a VE ``sigma``."""
    if isinstance(sigma, torch.Tensor):
        return (1.0 + sigma**2).rsqrt()
    return 1.0 / math.sqrt(1.0 + sigma**2)


def vp_sigma(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """VP noise scale ``sigma_t = sigma / sqrt(1 + sigma^2)`` for a VE ``sigma``."""
    if isinstance(sigma, torch.Tensor):
        return sigma * (1.0 + sigma**2).rsqrt()
    return sigma / math.sqrt(1.0 + sigma**2)


def ve_sigma(alphas_cumprod: torch.Tensor | float) -> torch.Tensor | float:
    """VE ``sigma = sqrt((1 - abar) / abar)`` for a VP ``alphas_cumprod`` value ``abar``."""
    if isinstance(alphas_cumprod, torch.Tensor):
        return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
    return math.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, Eq. 17 (diffusers' ``squaredcos_cap_v2``)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """The DDPM beta schedule, float32 as diffusers computes it (so sigmas match diffusers bit for bit)."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _betas_for_alpha_bar(num_train_timesteps)
    raise DistillError(
        f"beta_schedule {beta_schedule!r} is not supported; use one of {', '.join(BETA_SCHEDULES)} "
        "in the scheduler config."
    )


def discrete_timesteps(
    num_steps: int, num_train_timesteps: int, spacing: str = "trailing", steps_offset: int = 0
) -> np.ndarray:
    """Descending integer timesteps for ``num_steps`` sampling steps, as diffusers' DDIM/DDPM schedulers space them.

    ``leading``: ``t = k * (T // n) + offset`` (DDIM paper); ``trailing``: ``t = round(T - k * T / n) - 1``
    (Lin et al. 2024, starts at the last timestep); ``linspace``: ``round(linspace(0, T - 1, n))``.
    """
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise DistillError(
            f"cannot take {num_steps} steps on a {num_train_timesteps}-timestep schedule; "
            f"choose 1 <= steps <= {num_train_timesteps}."
        )
    T = num_train_timesteps
    if spacing == "leading":
        ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        # not np.arange(T, 0, -T / n): its float step overshoots for 62 values of n at T = 1000 (n = 61, ...)
        # and yields n + 1 timesteps ending in -1; diffusers has that bug, distill does not copy it.
        ts = np.round(T - np.arange(num_steps) * T / num_steps) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()[::-1]
    else:
        raise DistillError(f"timestep spacing {spacing!r} is unknown; use one of {', '.join(SPACINGS)}.")
    ts = ts.astype(np.int64).copy()
    assert len(ts) == num_steps and ts.min() >= 0 and ts.max() < T, (spacing, num_steps, ts)
    return ts


@dataclass
class DiscreteVPSchedule:
    """A DDPM-family noise schedule seen in VE sigmas.

    ``sigmas[t]`` (float64, shape ``(T,)``, ascending) is the VE noise level of discrete timestep ``t``; it is
    derived from float32 ``alphas_cumprod`` exactly as diffusers derives it.
    """

    alphas_cumprod: torch.Tensor  # (T,) float32, as diffusers holds it
    sigmas: torch.Tensor  # (T,) float64, ascending
    steps_offset: int = 0
    final_sigma: float = 0.0  # noise level after the last DDIM step: 0 when set_alpha_to_one (the default)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DiscreteVPSchedule":
        """Build from a diffusers scheduler config (``scheduler_config.json`` of DDPM/DDIM/Euler/LCM...)."""
        T = int(config.get("num_train_timesteps", 1000))
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        else:
            betas = make_betas(
                config.get("beta_schedule", "linear"),
                T,
                float(config.get("beta_start", 0.0001)),
                float(config.get("beta_end", 0.02)),
            )
        acp = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - acp) / acp) ** 0.5  # float32 like diffusers, widened below
        final = 0.0 if config.get("set_alpha_to_one", True) else float(sigmas[0])
        return cls(acp, sigmas.double(), int(config.get("steps_offset", 0)), final)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma of (possibly fractional) timesteps ``t``, linear in sigma between integers. Returns float64."""
        t = t.double().clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - lo
        s = self.sigmas.to(t.device)
        return (1 - w) * s[lo] + w * s[lo + 1]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`t_to_sigma` (float64); sigmas outside the schedule clamp to its ends."""
        s = self.sigmas.to(sigma.device)
        sigma = sigma.double().clamp(s[0], s[-1])
        hi = torch.searchsorted(s, sigma).clamp(1, self.num_train_timesteps - 1)
        lo = hi - 1
        w = (sigma - s[lo]) / (s[hi] - s[lo])
        return lo.double() + w

    def timesteps(self, num_steps: int, spacing: str = "trailing") -> np.ndarray:
        return discrete_timesteps(num_steps, self.num_train_timesteps, spacing, self.steps_offset)

    def grid(self, num_steps: int, spacing: str = "trailing") -> torch.Tensor:
        """Descending sigma grid ``(num_steps + 1,)`` float64: the teacher's timesteps, then ``final_sigma``."""
        ts = torch.from_numpy(self.timesteps(num_steps, spacing))
        return torch.cat([self.sigmas[ts], torch.tensor([self.final_sigma], dtype=torch.float64)])


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's grid (Karras et al. 2022, Eq. 5): ``(num_steps + 1,)`` float64, descending, ending in 0."""
    if num_steps < 1:
        raise DistillError(f"num_steps must be >= 1, got {num_steps}.")
    if not 0 < sigma_min < sigma_max:
        raise DistillError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
    i = torch.arange(num_steps, dtype=torch.float64)
    denom = max(num_steps - 1, 1)
    inv = sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1, dtype=torch.float64)])
