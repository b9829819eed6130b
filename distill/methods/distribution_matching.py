"""Distribution matching distillation, DMD2 (Yin et al., NeurIPS 2024; DMD: Yin et al., CVPR 2024).

A generator ``G`` (initialised from the teacher) maps noise to images in one step (or a few, below). No regression
to teacher outputs and no teacher-made noise-image pairs: ``G`` is trained so that its output distribution's score
matches the teacher's. At a random noise level ``sigma`` (``t`` uniform over ``t_range`` of the teacher's timesteps):

    x = G(z),  x_t = x + sigma * eps
    real = D_teacher(x_t, sigma)        (with the recipe's classifier-free guidance)
    fake = D_fake(x_t, sigma)           (a denoiser of G's own samples, no guidance)
    grad = (fake - real) / mean_|x - real|   per sample (DMD's normaliser)
    L_G  = 0.5 * ||x - sg(x - grad)||^2 / numel            (its gradient in x is grad / numel)

so ``G`` moves its samples along ``real - fake``, the difference of the two scores. The fake denoiser ``D_fake``
(initialised from the teacher) learns the score of ``G``'s current samples with the teacher's own denoising loss,
``lambda(sigma) ||D_fake(sg(x) + sigma eps', sigma) - sg(x)||^2``; two time scales (DMD2): it is updated every step,
``G`` every ``fake_updates``-th. It sees only generator samples.

GAN term (DMD2, optional, ``gan_weight > 0``): a head on the fake denoiser's middle features (of re-noised inputs)
classifies real images against generated ones (non-saturating loss, weight ``gan_disc_weight``, trained with the
fake denoiser); ``G`` gets ``gan_weight`` times the non-saturating generator loss through it.

Multi-step generators (``student_steps > 1``): ``G`` denoises at ``student_steps`` fixed timesteps (LCM's pick, as
the adversarial recipe); with backward simulation (DMD2) its input at step ``k`` is made by running ``G`` itself
for ``k`` steps from pure noise (no gradient), so training sees what sampling sees. ``k`` cycles over the steps
(or over ``step_cycle``) from one generator update to the next. The student is exported like a consistency
student (``LCMScheduler``), sampled by multistep consistency sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill import losses
from distill.config import OptimizerConfig
from distill.denoisers import ConsistencyDenoiser, consistency_scheduler_sigmas, consistency_sigmas
from distill.errors import DistillError
from distill.methods.base import Context, Method, Role
from distill.methods.builders import load_teacher
from distill.methods.common import Head, StopForward, feature_hook, feature_points, head_kind, maps_of
from distill.schedules import add_noise, scale_noise
from distill.tensors import per_row


@dataclass
class DistributionMatchingConfig:
    """DMD2; the run lasts ``iters`` steps: the fake denoiser is updated every step, the generator every
    ``fake_updates``-th (the two time-scale update rule)."""

    student_steps: int = 1  # the generator's timesteps (1: one step from pure noise)
    sample_steps: list[int] = field(default_factory=lambda: [1])  # step counts it samples at (<= student_steps)
    fake_updates: int = 5  # fake-denoiser updates per generator update (DMD2: 5)
    t_range: list[float] = field(default_factory=lambda: [0.02, 0.98])  # DM loss's noise levels, as a fraction of
    # the teacher's timesteps (DMD2: 20..980 of 1000)
    fake_weighting: str = "snr+1"  # the fake denoiser's loss weighting: the teacher's own (snr+1 = v-MSE)
    gan_weight: float = 0.0  # the generator's GAN loss weight (DMD2: 3e-3); 0 = no GAN term
    gan_disc_weight: float = 1e-2  # the classifier's loss weight in the fake denoiser's update (DMD2: 1e-2)
    head_channels: int = 64
    backward_simulation: bool = True  # multi-step generators train on inputs from their own earlier steps
    # the generator's step k from one update to the next (backward simulation): null cycles 0..student_steps-1;
    # e.g. [0, 1, 0, 2, 0, 3] gives the 1-step map from pure noise half of the updates
    step_cycle: list[int] | None = None
    iters: int = 1000
    student_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-5, warmup_steps=0))
    fake_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-5, warmup_steps=0))
    ema_decay: float = 0.0  # EMA of the generator, exported when > 0

    def total_steps(self) -> int:
        return self.iters

    def check(self) -> list[str]:
        errs = []
        if self.student_steps < 1:
            errs.append(f"student_steps must be >= 1, got {self.student_steps}")
        if not self.sample_steps or min(self.sample_steps) < 1 or max(self.sample_steps) > self.student_steps:
            errs.append(f"sample_steps must lie in 1..student_steps ({self.student_steps}), got {self.sample_steps}")
        if self.fake_updates < 1:
            errs.append(f"fake_updates must be >= 1, got {self.fake_updates}")
        lo_hi = self.t_range
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 1:
            errs.append(f"t_range must be [lo, hi] with 0 <= lo < hi <= 1, got {lo_hi}")
        if self.fake_weighting not in losses.WEIGHTINGS:
            errs.append(f"fake_weighting: {self.fake_weighting!r} is not one of {', '.join(losses.WEIGHTINGS)}")
        for name in ("gan_weight", "gan_disc_weight"):
            if getattr(self, name) < 0:
                errs.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.head_channels < 1:
            errs.append(f"head_channels must be >= 1, got {self.head_channels}")
        if self.iters < 1:
            errs.append(f"iters must be >= 1, got {self.iters}")
        if self.step_cycle is not None and (not self.step_cycle
                                            or not all(0 <= k < self.student_steps for k in self.step_cycle)):
            errs.append(f"step_cycle must list steps in 0..student_steps-1 ({self.student_steps - 1}), "
                        f"got {self.step_cycle}")
        elif self.step_cycle is not None and not self.backward_simulation:
            errs.append("step_cycle orders backward simulation's steps; set backward_simulation: true or drop "
                        "step_cycle")
        if not 0 <= self.ema_decay < 1:
            errs.append(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        return errs


def distribution_matching_loss(x: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """DMD's generator loss for samples ``x`` (B, ...) given the real (teacher) and fake denoisers' estimates at a
    noised copy of ``x``: its gradient in ``x`` is ``(fake - real) / mean|x - real|`` per sample, over numel."""
    with torch.no_grad():
        norm = (x - real).abs().flatten(1).mean(1).clamp(min=1e-8)
        grad = (fake - real) / per_row(norm, x)
        target = x - grad
    return 0.5 * F.mse_loss(x.float(), target.float())


class FakeScore(nn.Module):
    """The fake denoiser (``denoiser``, a copy of the teacher's) and, for the GAN term, a classifier head on its
    middle features: one role, one optimizer. ``forward(x, sigma, **cond)`` denoises; with ``logits=True`` it gives
    the head's logit per sample (B,) from the network's deepest encoder features (read by a hook), so both uses
    go through the module the trainer wraps for several processes."""

    def __init__(self, denoiser: nn.Module, channels: int | None = None, shape: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.head: nn.Module | None = None
        if channels is not None:
            self._point = feature_points(denoiser.net)[-1]
            with torch.no_grad():
                probe = self._deepest(torch.zeros(2, *shape), torch.ones(2, dtype=torch.float64))
            ch, kind = head_kind(probe, maps_of(denoiser.net))
            self.head = Head(ch, channels, kind)

    def _deepest(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        module, pick = self._point
        got: list[torch.Tensor] = []

        def sink(f: torch.Tensor) -> None:
            got.append(f)
            raise StopForward

        handle = feature_hook(module, pick, sink)
        try:
            self.denoiser(x, sigma, **cond)
        except StopForward:
            pass
        finally:
            handle.remove()
        return got[0]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, logits: bool = False, **cond: Any) -> torch.Tensor:
        if not logits:
            return self.denoiser(x, sigma, **cond)
        return self.head(self._deepest(x, sigma, **cond).float())


class DistributionMatching(Method):
    """DMD2: a generator trained by the difference of the teacher's and a fake denoiser's scores, two time
    scales, an optional GAN term, backward simulation for multi-step generators."""

    Config = DistributionMatchingConfig

    def __init__(self, config: DistributionMatchingConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        teacher = load_teacher(ctx, "distribution matching distillation")
        self.schedule = teacher.schedule
        self.student = ConsistencyDenoiser(self.new_student(teacher)).train()
        # a full copy of the teacher; with student.lora its own adapters on the shared base weights
        fake = self.new_adapter(teacher)
        if config.gan_weight > 0 and self._probe_cond(ctx, 2):
            raise DistillError("the GAN term of distribution matching reads an unconditional head; set gan_weight: 0 "
                               "for a conditional teacher.")
        self.fake = FakeScore(fake, config.head_channels if config.gan_weight > 0 else None, tuple(ctx.sample_shape))
        self.teacher = self.guided(teacher).requires_grad_(False).eval()
        if config.ema_decay > 0:
            self.student_ema = self.copy_net(self.student).requires_grad_(False).eval()
            self.ema = {"student_ema": ("student", config.ema_decay)}
        sched = teacher.schedule
        self.levels = torch.tensor(self.sampling_sigmas(config.student_steps)[:-1], dtype=torch.float64)
        T = sched.num_train_timesteps
        lo, hi = config.t_range
        self.t_lo, self.t_hi = int(lo * (T - 1)), max(int(hi * (T - 1)), int(lo * (T - 1)) + 1)
        self.weight = losses.weighting(config.fake_weighting)
        self.generator_updates = 0  # counts generator updates (backward simulation cycles its step with it)

    @staticmethod
    def _probe_cond(ctx: Context, n: int) -> dict[str, torch.Tensor]:
        if ctx.pipeline is None or ctx.pipeline.conditioning is None:
            return {}
        return {k: v.expand(n, *v.shape[1:]) for k, v in ctx.pipeline.unconditional().items()}

    # ------------------------------------------------------------------------------------------ grids

    def sampling_sigmas(self, steps: int) -> list[float]:
        return consistency_sigmas(self.schedule, self.config.student_steps, steps)

    # ------------------------------------------------------------------------------------------ pieces

    def generate(self, like: torch.Tensor, cond: dict[str, torch.Tensor], grad: bool = True) -> torch.Tensor:
        """Generator samples shaped like ``like`` (B, ...): from pure noise through its first ``k`` steps (no
        gradient; backward simulation), then its step ``k`` (with gradient when ``grad``)."""
        levels = self.on_device("levels", lambda: self.levels, like.device)
        k = self.step_k()
        x = scale_noise(self.randn_like(like), levels[0].float())
        with torch.no_grad():
            for i in range(k):
                x0 = self.student(x, levels[i].float().expand(len(x)), **cond)
                x = add_noise(x0, self.randn_like(like), levels[i + 1].float())
        s = levels[k].float().expand(len(x))
        if not grad:
            with torch.no_grad():
                return self.student(x, s, **cond)
        return self.student(x, s, **cond)

    def step_k(self) -> int:
        """The generator step this update trains: ``k`` of backward simulation, from ``step_cycle``."""
        K = self.config.student_steps
        if K == 1 or not self.config.backward_simulation:
            return 0
        cycle = self.config.step_cycle or list(range(K))
        return cycle[self.generator_updates % len(cycle)]

    def _noise_level(self, like: torch.Tensor) -> torch.Tensor:
        sigmas = self.schedule.on("sigmas", like.device)
        return sigmas[self.randint(self.t_lo, self.t_hi + 1, like)].float()

    def _gan_logits(self, x: torch.Tensor) -> torch.Tensor:
        s = self._noise_level(x)
        return self.fake(add_noise(x, self.randn_like(x), s), s, logits=True)

    # ------------------------------------------------------------------------------------------ trainer API

    def roles(self) -> dict[str, Role]:
        c = self.config
        # the generator first (as DMD2): its sample of the step, detached, is the fake denoiser's training sample
        return {"student": Role(c.student_optimizer, every=c.fake_updates), "fake": Role(c.fake_optimizer, every=1)}

    def loss(self, role: str, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        x0 = batch["image"]  # real images: only the GAN term looks at them
        cond = self.cond(batch)
        c = self.config
        if role == "fake":
            x = self.memo("sample", lambda: self.generate(x0, cond, grad=False).detach())  # G's samples only
            s = self._noise_level(x)
            fake_cond = {k: v for k, v in cond.items() if k != "guidance"}
            err = losses.l2(self.fake(add_noise(x, self.randn_like(x), s), s, **fake_cond), x)
            loss = (self.weight(s) * err).mean()
            logs: dict[str, Any] = {"denoise": loss.detach()}
            if c.gan_weight > 0:
                d_loss = F.softplus(-self._gan_logits(x0)).mean() + F.softplus(self._gan_logits(x)).mean()
                loss = loss + c.gan_disc_weight * d_loss
                logs["gan_d"] = d_loss.detach()
            return loss, logs
        # the generator
        x = self.generate(x0, cond)
        self.remember("sample", x.detach())  # for the fake denoiser's update of this step: no second forward
        s = self._noise_level(x)
        x_t = add_noise(x.detach(), self.randn_like(x), s)
        with torch.no_grad():
            real = self.teacher(x_t, s, **cond)
            fake = self.fake(x_t, s, **{k: v for k, v in cond.items() if k != "guidance"})
        loss = distribution_matching_loss(x, real, fake)
        logs = {"dm": loss.detach()}
        if c.gan_weight > 0:
            g = F.softplus(-self._gan_logits(x)).mean()
            loss = loss + c.gan_weight * g
            logs["gan_g"] = g.detach()
        return loss, logs

    def end_of_step(self, step: int) -> None:
        if (step - 1) % self.config.fake_updates == 0:  # the generator updated in the step just finished
            self.generator_updates += 1
        return None

    def method_state(self) -> dict[str, Any]:
        return {"generator_updates": self.generator_updates}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.generator_updates = int(state.get("generator_updates", 0))

    def export_denoiser(self) -> nn.Module:
        return self.student_ema if self.config.ema_decay > 0 else self.unwrap(self.student)

    def export_info(self) -> dict[str, Any]:
        steps = sorted(set(self.config.sample_steps))
        return {"sampler": "consistency", "steps": steps, "sigmas": {str(k): self.sampling_sigmas(k) for k in steps},
                "original_inference_steps": self.config.student_steps,
                **consistency_scheduler_sigmas(self.schedule, steps)}  # flow teachers: the stock call's sigmas=
