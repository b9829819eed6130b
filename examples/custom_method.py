"""A new method in one file: knowledge distillation (Luhman & Luhman 2021) of the teacher's DDIM sampler.

    distill run examples/custom_method.yaml --out runs/one-step-kd

The recipe names this file's class (``method.name: examples/custom_method.py:OneStepKD``); the trainer needs no
change. A method says which networks it trains (``roles``), the loss of each (``loss``), the state it carries
through checkpoints (``method_state``), and what it exports (``export_denoiser``, ``export_info``).

The same file distills a text-to-image or class-conditional teacher, guided or not: ``self.guided(teacher)`` is
the teacher under the recipe's classifier-free guidance, ``self.new_student(teacher)`` its trainable copy, and
``self.cond(batch)`` the conditioning every network call gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distill import losses
from distill.config import OptimizerConfig
from distill.methods import Method, Role, load_teacher
from distill.samplers import sample_ddim
from distill.schedules import scale_noise


@dataclass
class OneStepKDConfig:
    teacher_steps: int = 8  # DDIM steps of the teacher that make each target
    iters: int = 300
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4, warmup_steps=20))

    def total_steps(self) -> int:
        return self.iters

    def check(self) -> list[str]:
        return [f"{k} must be >= 1" for k in ("teacher_steps", "iters") if getattr(self, k) < 1]


class OneStepKD(Method):
    """A 1-step student regresses the teacher's K-step DDIM sample from the same noise (Luhman & Luhman 2021)."""

    Config = OneStepKDConfig

    def __init__(self, config: OneStepKDConfig, ctx) -> None:
        super().__init__(config, ctx)
        teacher = load_teacher(ctx, "one-step knowledge distillation")
        self.student = self.new_student(teacher)  # a trainable copy (guidance-embedded if the recipe asks)
        self.teacher = self.guided(teacher).requires_grad_(False).eval()  # with the recipe's guidance, if any
        self.grid = teacher.schedule.grid(config.teacher_steps, "trailing")  # (K + 1,) sigmas, descending to 0
        self.targets_made = 0  # the method's own state, saved in checkpoints

    def roles(self) -> dict[str, Role]:
        return {"student": Role(self.config.optimizer)}

    def loss(self, role: str, batch: dict, step: int):
        x0 = batch["image"]  # only its shape is used: the targets come from the teacher, not the data
        cond = self.cond(batch)  # prompt embeddings / class labels (and w), or nothing for an unconditional teacher
        sigma_max = self.grid[0].to(x0.device, torch.float32)
        x = scale_noise(self.randn_like(x0), sigma_max)  # sigma_max * noise (the noise itself at sigma = inf)
        with torch.no_grad():
            target = sample_ddim(self.teacher, x, self.grid.to(x0.device), cond=cond)
        err = losses.l2(self.student(x, sigma_max.expand(x0.shape[0]), **cond), target)
        self.targets_made += x0.shape[0] * self.shard[1]  # all ranks' rows: the state must not depend on the rank
        return err.mean(), {"mse": err.mean().detach()}  # a tensor: the trainer syncs it only when it logs

    def method_state(self) -> dict:
        return {"targets_made": self.targets_made}

    def load_method_state(self, state: dict) -> None:
        self.targets_made = int(state["targets_made"])

    def export_denoiser(self) -> torch.nn.Module:
        return self.unwrap(self.student)

    def export_info(self) -> dict:
        return {"sampler": "ddim", "steps": [1], "sigmas": {"1": [float(self.grid[0]), 0.0]}}
