"""Adversarial diffusion distillation (Sauer et al. 2023, "ADD"; the latent variant's teacher-feature
discriminator, Sauer et al. 2024, "LADD").

The student (initialised from the teacher) is trained at a few fixed timesteps: it turns a real image noised
to one of them, ``x_s = x0 + s * eps``, into ``x_hat = f(x_s, s)`` in one step. Two losses train it:

    adversarial:   L_G = -sum_k mean(h_k(B(x_hat)))                    (hinge generator loss, Lim & Ye 2017)
    distillation:  L_D = c(t) * ||x_hat - D_teacher(sg(x_hat) + sigma_t * eps', sigma_t)||^2
                   with t uniform over the teacher's timesteps and c(t) = alpha_bar_t ("exponential", ADD)
    student:       L_G + lambda * L_D                                   (ADD: lambda = 2.5)

and the discriminator's heads ``h_k`` (on features of a frozen backbone ``B``) minimise the hinge loss

    sum_k mean(relu(1 - h_k(B(x0)))) + mean(relu(1 + h_k(B(sg(x_hat))))) + r1_weight / 2 * ||grad_x0 sum_k h_k||^2

The default backbone is the frozen teacher's own network on re-noised inputs, as in LADD: the outputs of its
public blocks (a UNet's ``conv_in``, down blocks and middle block; a transformer's blocks, image tokens), read by
forward hooks during the network's own forward, which stops after the last of them. It needs no external weights,
works on any teacher distill adapts, and sees the conditioning (the prompt or class) like the teacher does. Any
frozen ``nn.Module`` named by a dotted path ``package.module:factory`` may replace it (for instance a DINOv2 where
its weights are available); it sees clean images. The FD-digits evaluation network may never be the backbone:
the config and the method refuse it.

The student samples at 1, 2 and 4 steps: denoise, then re-noise to the next student timestep (multistep
consistency sampling); it is exported like a consistency student (``LCMScheduler``), whose boundary scalings
are the identity to within 1e-7 at the student's timesteps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill import losses
from distill.config import OptimizerConfig
from distill.denoisers import (ConsistencyDenoiser, DiffusersDenoiser, consistency_scheduler_sigmas, consistency_sigmas,
                               consistency_timesteps)
from distill.errors import DistillError
from distill.methods.base import Context, Method, Role
from distill.methods.builders import load_teacher
from distill.methods.common import Head, StopForward, feature_hook, feature_points, head_kind, maps_of
from distill.schedules import add_noise

DISTILL_WEIGHTINGS = ("exponential", "uniform")
COLLAPSE_CHECK = 25  # steps between reads of the collapse counter (a device sync)


@dataclass
class AdversarialConfig:
    """ADD; the run lasts ``iters`` steps (one student update per ``student_every`` and one discriminator update
    per ``disc_every`` steps: the update ratio)."""

    student_steps: int = 4  # the student's timesteps: T-1, T-1-k, ... with k = T / student_steps (ADD: 4)
    sample_steps: list[int] = field(default_factory=lambda: [1, 2, 4])  # step counts the student samples at
    lambda_distill: float = 2.5  # lambda; 0 = pure adversarial
    distill_weighting: str = "exponential"  # c(t) = alpha_bar_t (ADD) | uniform
    adversarial: bool = True  # false = pure distillation (no discriminator)
    backbone: str = "teacher"  # teacher (LADD) | package.module:factory returning a frozen nn.Module
    disc_t_range: list[int] = field(default_factory=lambda: [0, 500])  # teacher backbone: re-noise timesteps
    head_channels: int = 64  # hidden width of each discriminator head
    r1_weight: float = 1e-3  # R1 penalty gamma on real images
    r1_every: int = 4  # lazy R1 (StyleGAN2): every k-th discriminator step, scaled by k
    student_every: int = 1
    disc_every: int = 1
    iters: int = 1200
    student_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-5, warmup_steps=50))
    disc_optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=2e-4, betas=(0.0, 0.99), warmup_steps=0))
    ema_decay: float = 0.0  # EMA of the student, exported when > 0
    collapse_steps: int = 200  # warn when the discriminator is right on every sample this many steps running

    def total_steps(self) -> int:
        return self.iters

    def check(self) -> list[str]:
        errs = []
        if self.student_steps < 1:
            errs.append(f"student_steps must be >= 1, got {self.student_steps}")
        if not self.sample_steps or min(self.sample_steps) < 1 or max(self.sample_steps) > max(self.student_steps, 1):
            errs.append(f"sample_steps must lie in 1..student_steps ({self.student_steps}), got {self.sample_steps}")
        if self.lambda_distill < 0:
            errs.append(f"lambda_distill must be >= 0, got {self.lambda_distill}")
        if self.lambda_distill == 0 and not self.adversarial:
            errs.append("lambda_distill = 0 with adversarial: false leaves no loss; enable one of them")
        if self.distill_weighting not in DISTILL_WEIGHTINGS:
            errs.append(f"distill_weighting: {self.distill_weighting!r} is not one of {', '.join(DISTILL_WEIGHTINGS)}")
        if self.backbone != "teacher":
            if ":" not in self.backbone:
                errs.append(f"backbone: {self.backbone!r} is neither 'teacher' nor a dotted path package.module:factory")
            if refers_to_eval_net(self.backbone):
                errs.append(f"backbone: {self.backbone!r} is the evaluation feature network; it may never train a "
                            "model (it would grade its own student). Use 'teacher' or another network")
        lo_hi = self.disc_t_range
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1]:
            errs.append(f"disc_t_range must be [lo, hi] with 0 <= lo <= hi, got {lo_hi}")
        if self.head_channels < 1:
            errs.append(f"head_channels must be >= 1, got {self.head_channels}")
        if self.r1_weight < 0:
            errs.append(f"r1_weight must be >= 0, got {self.r1_weight}")
        for name in ("r1_every", "student_every", "disc_every", "iters", "collapse_steps"):
            if getattr(self, name) < 1:
                errs.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            errs.append(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        return errs


def refers_to_eval_net(name: str) -> bool:
    """Whether a backbone name points at an evaluation network: distill's evaluation package, or any benchmark's
    judge (by the words each benchmark lists in ``judge_names``; :mod:`distill.registry`)."""
    from distill import registry

    low = name.lower()
    return "distill.eval" in low or any(word in low for b in registry.benchmarks() for word in b.judge_names)


# ---------------------------------------------------------------------------------------------- discriminator


class TeacherFeatures(nn.Module):
    """The frozen teacher network as a feature network: ``forward(x, sigma, **cond)`` runs the teacher's own
    forward on VE input ``x`` at noise level ``sigma`` (B,) and returns the outputs of its encoder-side public
    blocks (see :func:`feature_points`), collected by forward hooks; the forward stops after the last one, except
    on a sharded teacher (``trainer.fsdp``), whose network must finish its forward to free its gathered weights and
    set up its backward."""

    def __init__(self, teacher: DiffusersDenoiser) -> None:
        super().__init__()
        self.teacher = teacher
        self.points = feature_points(teacher.net)
        self._stop: bool | None = None  # whether to stop after the last feature (decided at the first call)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> list[torch.Tensor]:
        feats: list[torch.Tensor] = []
        if self._stop is None:
            from distill.sharding import is_sharded

            self._stop = not is_sharded(self.teacher)
        last = len(self.points) - 1 if self._stop else -1

        def sink(i: int) -> Any:
            def fn(f: torch.Tensor) -> None:
                feats.append(f)
                if i == last:
                    raise StopForward

            return fn

        handles = [feature_hook(m, pick, sink(i)) for i, (m, pick) in enumerate(self.points)]
        try:
            self.teacher(x, sigma, **cond)
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return feats


class Heads(nn.ModuleList):
    """One :class:`Head` per backbone feature; ``forward(feats)`` -> (heads, B) logits. A module with a forward
    (not a bare list), so the trainer can wrap it for several processes."""

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([h(f.float()) for h, f in zip(self, feats)])


def _as_list(feats: Any) -> list[torch.Tensor]:
    if isinstance(feats, torch.Tensor):
        return [feats]
    if isinstance(feats, (list, tuple)) and feats and all(isinstance(f, torch.Tensor) for f in feats):
        return list(feats)
    raise DistillError("a discriminator backbone must return a tensor (B, C[, H, W]) or a list of them, got "
                       f"{type(feats).__name__}.")


def load_backbone(name: str, teacher: DiffusersDenoiser) -> nn.Module:
    """The frozen feature network: the teacher's encoder, or ``package.module:factory()``."""
    if name == "teacher":
        return TeacherFeatures(teacher).requires_grad_(False).eval()
    if refers_to_eval_net(name):
        raise DistillError(f"backbone {name!r} is the evaluation feature network; it may never train a model.")
    from distill.plugins import load_object

    factory = load_object(name, "backbone")
    try:
        net = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as exc:  # a user's module may fail in any way
        raise DistillError(f"cannot build backbone {name!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(net, nn.Module):
        raise DistillError(f"backbone {name!r} gave a {type(net).__name__}, not a torch nn.Module.")
    from distill.registry import refuse_judges

    refuse_judges(net, name)  # every benchmark's judges, by class and by weights
    return net.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------- method


class AdversarialDistillation(Method):
    """ADD with hinge loss, R1 and a LADD-style teacher-feature discriminator; two roles: student and disc."""

    Config = AdversarialConfig

    def __init__(self, config: AdversarialConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        teacher = load_teacher(ctx, "adversarial distillation")
        T = teacher.schedule.num_train_timesteps
        if config.student_steps > T or config.disc_t_range[1] > T - 1:
            raise DistillError(f"the teacher has {T} timesteps: student_steps must be <= {T} and disc_t_range "
                               f"within [0, {T - 1}].")
        # the student is exported for LCMScheduler; its boundary scalings are the identity at its timesteps
        self.student = ConsistencyDenoiser(self.new_student(teacher)).train()
        self.teacher = self.guided(teacher).requires_grad_(False).eval()
        self.uses_teacher_backbone = config.backbone == "teacher"
        if config.adversarial:
            # the backbone reads the unguided teacher network (the same frozen modules as the teacher)
            self.backbone = load_backbone(config.backbone, teacher)
            with torch.no_grad():
                probe = torch.zeros(2, *ctx.sample_shape)
                cond = {}
                if ctx.pipeline is not None and ctx.pipeline.conditioning is not None and self.uses_teacher_backbone:
                    cond = {k: v.expand(2, *v.shape[1:]) for k, v in ctx.pipeline.unconditional().items()}
                feats = _as_list(self._features(probe, torch.ones(2, dtype=torch.float64), cond))
            maps = maps_of(teacher.net) if self.uses_teacher_backbone else None
            self.disc = Heads([Head(ch, config.head_channels, kind) for ch, kind in (head_kind(f, maps) for f in feats)])
        if config.ema_decay > 0:
            self.student_ema = self.copy_net(self.student).requires_grad_(False).eval()
            self.ema = {"student_ema": ("student", config.ema_decay)}
        self.student_sigmas = torch.tensor(self.sampling_sigmas(config.student_steps)[:-1], dtype=torch.float64)
        self._collapse = 0
        self._count: torch.Tensor | None = None  # the same count, on the device between checks
        self._warned = False
        self._sharded_backbone: bool | None = None  # trainer.fsdp sharded the backbone (R1 is refused then)

    # ------------------------------------------------------------------------------------------ grids

    def student_timesteps(self, steps: int) -> list[float]:
        """The teacher timesteps the stock consistency scheduler samples ``steps`` steps at, from the student's grid."""
        return consistency_timesteps(self.teacher.schedule, self.config.student_steps, steps)

    def sampling_sigmas(self, steps: int) -> list[float]:
        return consistency_sigmas(self.teacher.schedule, self.config.student_steps, steps)

    # ------------------------------------------------------------------------------------------ pieces

    def _features(self, x0: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> Any:
        if self.uses_teacher_backbone:
            cond = {k: v for k, v in cond.items() if k != "guidance"}  # the backbone is the unguided teacher
            return self.backbone(add_noise(x0, self.randn_like(x0), sigma), sigma, **cond)
        return self.backbone(x0)

    def _disc_sigma(self, x0: torch.Tensor) -> torch.Tensor:
        lo, hi = self.config.disc_t_range
        return self.teacher.schedule.on("sigmas", x0.device)[self.randint(lo, hi + 1, x0)]

    def logits(self, x0: torch.Tensor, cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(heads, B) logits for images ``x0`` (re-noised first when the backbone is the teacher's network)."""
        return self.disc(_as_list(self._features(x0, self._disc_sigma(x0), cond or {})))

    def generate(self, x0: torch.Tensor, cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The student's one-step output from ``x0`` noised to a random student timestep (B, ...)."""
        levels = self.on_device("student_sigmas", lambda: self.student_sigmas, x0.device)
        s = levels[self.randint(0, len(levels), x0)].float()
        return self.student(add_noise(x0, self.randn_like(x0), s), s, **(cond or {}))

    def distill_loss(self, x_hat: torch.Tensor, cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        sched = self.teacher.schedule
        t = self.randint(0, sched.num_train_timesteps, x_hat)
        s = sched.on("sigmas", x_hat.device)[t].float()
        with torch.no_grad():
            target = self.teacher(add_noise(x_hat.detach(), self.randn_like(x_hat), s), s, **(cond or {}))
        c = 1 / (1 + s**2) if self.config.distill_weighting == "exponential" else torch.ones_like(s)  # alpha_bar_t
        return (c * losses.l2(x_hat, target)).mean()

    def r1_penalty(self, x0: torch.Tensor, cond: dict[str, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (heads, B), R1 = mean_b ||grad_x0 sum_k logit_k(x0_b)||^2) on real images."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if self._sharded_backbone is None:  # decided at the first R1 step, not at every one
            from distill.sharding import is_sharded

            self._sharded_backbone = is_sharded(self.backbone)
        if self._sharded_backbone:
            raise DistillError("the R1 penalty differentiates the discriminator twice, through the backbone, and a "
                               "sharded backbone (trainer.fsdp) frees its gathered weights after the first backward "
                               "(FSDP2 has no double backward). Set method.r1_weight=0 with trainer.fsdp, or train "
                               "unsharded.")
        x = x0.detach().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
            logits = self.logits(x, cond)
            (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
        return logits, grad.pow(2).flatten(1).sum(1).mean()

    # ------------------------------------------------------------------------------------------ trainer API

    def roles(self) -> dict[str, Role]:
        c = self.config
        roles = {"student": Role(c.student_optimizer, every=c.student_every)}
        if c.adversarial:
            roles["disc"] = Role(c.disc_optimizer, every=c.disc_every)
        return roles

    def loss(self, role: str, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = batch["image"]
        cond = self.cond(batch)
        c = self.config
        if role == "student":
            x_hat = self.generate(x0, cond)
            self.remember("fake", x_hat.detach())  # the discriminator's fake for this micro-batch: no second forward
            loss = x0.new_zeros(())
            logs: dict[str, float] = {}
            if c.adversarial:
                adv = -self.logits(x_hat, cond).mean(1).sum()
                loss = loss + adv
                logs["adv"] = adv.detach()
            if c.lambda_distill > 0:
                dist = self.distill_loss(x_hat, cond)
                loss = loss + c.lambda_distill * dist
                logs["distill"] = dist.detach()
            return loss, logs
        # the discriminator: on the student's sample of this step (made once, by the student's update, if it ran)
        with torch.no_grad():
            fake = self.memo("fake", lambda: self.generate(x0, cond))
        lazy = c.r1_weight > 0 and step % (c.r1_every * c.disc_every) == 0
        if lazy:
            real_logits, r1 = self.r1_penalty(x0, cond)
        else:
            real_logits, r1 = self.logits(x0, cond), x0.new_zeros(())
        fake_logits = self.logits(fake, cond)
        hinge = F.relu(1 - real_logits).mean(1).sum() + F.relu(1 + fake_logits).mean(1).sum()
        loss = hinge + (c.r1_weight / 2 * c.r1_every * r1 if lazy else 0.0)
        d_real, d_fake = real_logits.mean(0), fake_logits.mean(0)
        acc_real, acc_fake = (d_real > 0).float().mean().detach(), (d_fake < 0).float().mean().detach()
        self._watch_collapse(acc_real, acc_fake, step)
        logs = {"hinge": hinge.detach(), "acc_real": acc_real, "acc_fake": acc_fake}
        if lazy:
            logs["r1"] = r1.detach()
        return loss, logs

    def _watch_collapse(self, acc_real: torch.Tensor, acc_fake: torch.Tensor, step: int) -> None:
        # counted on the device (no sync per step); read back every COLLAPSE_CHECK steps
        both = (acc_real == 1) & (acc_fake == 1)
        count = torch.as_tensor(self._collapse, device=acc_real.device) if self._count is None else self._count
        self._count = torch.where(both, count + 1, torch.zeros_like(count))
        if step % COLLAPSE_CHECK:
            return
        self._collapse = int(self._count)
        if self._collapse >= self.config.collapse_steps and not self._warned:
            self._warned = True
            warnings.warn(
                f"step {step}: the discriminator has been right on every real and fake sample for {self._collapse} "
                "steps; its gradient no longer teaches the student. Try a lower disc_optimizer.lr, a larger r1_weight, more "
                "re-noising (raise disc_t_range), disc_every: 2, or a larger lambda_distill.", stacklevel=2)

    def method_state(self) -> dict[str, Any]:
        collapse = int(self._count) if self._count is not None else self._collapse
        return {"collapse": collapse, "warned": self._warned}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._collapse, self._warned = int(state.get("collapse", 0)), bool(state.get("warned", False))
        self._count = None

    def export_denoiser(self) -> nn.Module:
        return self.student_ema if self.config.ema_decay > 0 else self.unwrap(self.student)

    def export_info(self) -> dict[str, Any]:
        steps = sorted(set(self.config.sample_steps))
        info = {"sampler": "consistency", "steps": steps, "sigmas": {str(k): self.sampling_sigmas(k) for k in steps},
                "original_inference_steps": self.config.student_steps}
        info.update(consistency_scheduler_sigmas(self.teacher.schedule, steps))  # flow: sigmas=
        return info
