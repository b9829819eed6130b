"""Teacher training: the standard denoising loss (Ho et al. 2020) on any network distill adapts.

The loss is written in the library's convention, ``lambda(sigma) * ||D(x0 + sigma * eps, sigma) - x0||^2``
with ``t ~ U{0, ..., T-1}`` and ``sigma = sigma(t)``. With ``lambda = SNR + 1`` it is exactly the v-prediction
MSE, with ``SNR`` the eps-prediction MSE, with 1 the x0 MSE (see :mod:`distill.losses`), so the network's
native parameterization never appears here; ``flow`` weights a rectified-flow teacher's loss as its velocity MSE.

What is trained: a fresh ``UNet2DModel`` built from ``unet`` (pixel data), or the network of a pipeline folder:
``init``, or the recipe's ``teacher:``. The latter is how latent and text-conditional teachers are trained: the
folder (a "scaffold" of a freshly initialised network beside a trained VAE and text encoders) also decides how the
data is served (VAE latents, caption embeddings), and the exported teacher keeps its other components.
``cond_dropout`` trains that share of samples on the unconditional input (the empty prompt, the null class), so
that classifier-free guidance works (Ho & Salimans 2022).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from distill import losses
from distill.config import OptimizerConfig
from distill.denoisers import DiffusersDenoiser, check_scheduler_config
from distill.errors import DistillError
from distill.methods.base import Context, Method, Role
from distill.methods.builders import load_teacher
from distill.schedules import add_noise
from distill.tensors import append_dims


def _default_unet() -> dict[str, Any]:
    return {
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 16,
        "attention_head_dim": 32,
    }


def _default_scheduler() -> dict[str, Any]:
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "clip_sample": False,
    }


@dataclass
class TeacherConfig:
    """Train a diffusers ``UNet2DModel`` from scratch (or fine-tune one given by ``init``)."""

    unet: dict[str, Any] = field(default_factory=_default_unet)  # UNet2DModel kwargs; sample_size/channels from data
    scheduler: dict[str, Any] = field(default_factory=_default_scheduler)  # DDPMScheduler kwargs
    weighting: str = "snr+1"  # lambda(sigma): snr+1 = v-MSE, snr = eps-MSE, uniform = x0-MSE
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-3, warmup_steps=100))
    ema_decay: float = 0.999  # the exported model is the EMA
    init: str | None = None  # start from this pipeline folder instead of a fresh UNet (or set the recipe's teacher:)
    cond_dropout: float = 0.0  # share of samples trained unconditionally (classifier-free guidance needs > 0)

    def check(self) -> list[str]:
        errs = []
        if self.weighting not in losses.WEIGHTINGS:
            errs.append(f"weighting: {self.weighting!r} is not one of {', '.join(losses.WEIGHTINGS)}")
        if not 0 <= self.ema_decay < 1:
            errs.append(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not 0 <= self.cond_dropout < 1:
            errs.append(f"cond_dropout must lie in [0, 1), got {self.cond_dropout}")
        try:
            check_scheduler_config(self.scheduler)
        except DistillError as exc:
            errs.append(f"scheduler: {exc}")
        return errs


class TeacherTraining(Method):
    """Denoising score matching for a discrete-time (DDPM) teacher."""

    Config = TeacherConfig
    has_student = False  # the network itself is trained in full (student.lora is refused)

    def __init__(self, config: TeacherConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        if config.init is not None or ctx.teacher is not None:
            denoiser = load_teacher(ctx, "teacher training", source=config.init or ctx.teacher)
        else:
            from diffusers import UNet2DModel

            if len(ctx.sample_shape) != 3:
                raise DistillError(f"teacher training from scratch builds a UNet2DModel for images (C, H, W); the data's "
                                   f"samples are {'x'.join(map(str, ctx.sample_shape))}. Start from a network of that "
                                   "rank instead: method.init (or teacher) naming a pipeline folder.")
            c, h, w = ctx.sample_shape
            if h != w:
                raise DistillError(f"UNet2DModel needs square images; the data gives {h}x{w}.")
            kwargs = {"sample_size": h, "in_channels": c, "out_channels": c, **config.unet}
            try:
                unet = UNet2DModel(**kwargs)
            except Exception as exc:
                raise DistillError(f"method.unet does not build a UNet2DModel: {exc}") from exc
            denoiser = DiffusersDenoiser(unet, config.scheduler)
        self.denoiser = denoiser
        self.denoiser_ema = copy.deepcopy(denoiser).requires_grad_(False).eval()
        self.ema = {"denoiser_ema": ("denoiser", config.ema_decay)}
        self.weight = losses.weighting(config.weighting)
        if config.cond_dropout > 0:
            if ctx.pipeline is None or ctx.pipeline.conditioning is None:
                raise DistillError("method.cond_dropout trains a conditional teacher's unconditional input; this "
                                   "teacher is unconditional. Set cond_dropout: 0.")
            self.uncond = {k: v.to(ctx.device) for k, v in ctx.pipeline.unconditional().items()}
        # (T,) the teacher's discrete noise levels; a buffer, so it lives on the training device
        self.register_buffer("sigmas", denoiser.schedule.sigmas.float(), persistent=False)

    def roles(self) -> dict[str, Role]:
        return {"denoiser": Role(self.config.optimizer)}

    def loss(self, role: str, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = batch["image"]
        t = self.randint(0, len(self.sigmas), x0)
        sigma = self.sigmas[t]
        x = add_noise(x0, self.randn_like(x0), sigma)
        cond = self.cond(batch)
        if self.config.cond_dropout > 0:
            drop = self.rand(x0) < self.config.cond_dropout
            for k, u in self.uncond.items():
                c = cond[k]
                cond[k] = torch.where(append_dims(drop, c.ndim), u.to(c.dtype).expand_as(c), c)
        err = losses.l2(self.denoiser(x, sigma, **cond), x0)  # (B,)
        loss = (self.weight(sigma) * err).mean()
        return loss, {"x0_mse": err.mean().detach()}

    def export_denoiser(self) -> DiffusersDenoiser:
        return self.denoiser_ema
