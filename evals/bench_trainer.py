"""Benchmark: the overhead of distill's trainer against a bare PyTorch loop doing the same work.

    python evals/bench_trainer.py                                   (defaults: 3 x 20 timed steps per method)
    python evals/bench_trainer.py --steps 3 --repeats 1 --out /tmp/bench     (a smoke run)
    python evals/bench_trainer.py --methods teacher,consistency --threads 4

For the teacher method and each digits recipe (progressive, consistency, adversarial) this measures optimizer steps
per second of

* distill: ``Trainer(load_recipe(recipe, overrides), tmpdir).fit()`` with the recipe's own batch size and settings
  and ``trainer.progress=false eval.protocol=null trainer.checkpoint_every=0``;
* bare: a loop written here with plain PyTorch and diffusers that does the same work: the same networks (the
  teacher ``UNet2DModel.from_pretrained``, the student a ``copy.deepcopy``; the teacher method a ``UNet2DModel``
  built from the recipe's config after the same seed), the same batch size, the same data (the digits as one
  tensor on the device, one random permutation per epoch), the same random draws in kind and order, the same teacher
  forwards, AdamW with the recipe's learning rate, betas, weight decay and warm-up / decay, gradient clipping and
  the EMA updates. The loop, the optimizers, the data and the networks' calls are its own; the loss math is the
  library's, imported, not copied: the weightings and distances of ``distill.losses``, noising, DDIM steps and the
  prediction -> x0 conversion of ``distill.schedules``, and per-timestep tables (sigma, the network's input scale
  and timestep, the consistency scalings) computed once by the teacher's own schedule and
  ``distill.denoisers.ConsistencyDenoiser.scalings``. It indexes those tables on the device instead of mapping
  sigma to a timestep at every call, and keeps the loss as a tensor: no ``.item()``, no host sync inside a step.

Timing: one ``fit()`` per method runs ``warmup + repeats * steps`` steps; a callback (``fit(on_step=...)``) marks the
window boundaries and, at each one, runs the bare loop's window in between (warm-up first), so the two alternate
(distill, bare, distill, bare, ...) and share the machine's load. Each loop draws from its own random stream (swapped
outside the timed windows). The reported number is the median over the windows; CUDA is synchronised at every
boundary. The final checkpoint and export that ``fit()`` writes after its last step are outside every window.

The first optimizer step of both loops starts from the same weights, batch and random draws, and each loop keeps
its own copy of the random stream, so the losses of their first and of their last step are reported side by side:
they agree to float rounding when the bare loop mirrors the method (the last one checks the optimizer, learning
rate, clipping and EMA too).

An extra row times the teacher method under ``trainer.mixed_precision=bf16`` (distill only; on a CPU without fast
bf16 convolutions it is much slower than fp32, which is what the docs quote it for).

Writes ``evals/bench_trainer.md`` and ``evals/bench_trainer.json`` (or ``--out DIR``/bench_trainer.{md,json}).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # evals/: the scripts' shared helper
from common import (ROOT, add_out, add_threads, command, fmt, measured_by, out_dir, provenance,  # noqa: E402
                    set_threads, sync, write_report)

# the loss math both loops share: the library's own functions
from distill import losses  # noqa: E402
from distill.config import OptimizerConfig  # noqa: E402
from distill.denoisers import ConsistencyDenoiser, DiffusersDenoiser, consistency_timesteps  # noqa: E402
from distill.errors import DistillError  # noqa: E402
from distill.methods.common import Head, resolve_distance  # noqa: E402
from distill.recipe import RecipeConfig, load_recipe  # noqa: E402
from distill.schedules import add_noise, ddim_step, noise_estimate, rescale  # noqa: E402
from distill.tensors import per_row  # noqa: E402

RECIPES = {
    "teacher": ROOT / "recipes" / "digits" / "teacher.yaml",
    "progressive": ROOT / "recipes" / "digits" / "progressive.yaml",
    "consistency": ROOT / "recipes" / "digits" / "consistency.yaml",
    "adversarial": ROOT / "recipes" / "digits" / "adversarial.yaml",
}
# Variants: a recipe above under extra overrides, with the label its row gets and whether it is timed against that
# recipe's bare loop (the bare loop does fp32 work with no guard, so the precision and compile variants are distill
# only: their speed is read against the plain recipe's row). The CUDA ones need a GPU.
VARIANTS: dict[str, tuple[str, list[str], str, bool]] = {
    "teacher-sync": ("teacher", ["trainer.nonfinite_guard=sync"], "teacher (nonfinite_guard=sync)", True),
    "consistency-sync": ("consistency", ["trainer.nonfinite_guard=sync"], "consistency (nonfinite_guard=sync)", True),
    "teacher-bf16": ("teacher", ["trainer.mixed_precision=bf16"], "teacher (mixed_precision=bf16, distill only)", False),
    "teacher-fp16": ("teacher", ["trainer.mixed_precision=fp16"], "teacher (mixed_precision=fp16, distill only)", False),
    "teacher-compile": ("teacher", ["trainer.compile=inductor"], "teacher (compile=inductor, distill only)", False),
    "consistency-bf16-teacher": ("consistency", ["trainer.teacher_dtype=bf16"],
                                 "consistency (teacher_dtype=bf16, distill only)", False),
    "consistency-bf16": ("consistency", ["trainer.mixed_precision=bf16"],
                         "consistency (mixed_precision=bf16, distill only)", False),
    "consistency-compile": ("consistency", ["trainer.compile=inductor"],
                            "consistency (compile=inductor, distill only)", False),
}
RECIPES.update({name: RECIPES[base] for name, (base, *_) in VARIANTS.items()})
LABELS = {name: label for name, (_, _, label, _) in VARIANTS.items()}
DEFAULT_METHODS = ("teacher", "progressive", "consistency", "adversarial", "teacher-bf16")
BENCH_OVERRIDES = ["trainer.progress=false", "eval.protocol=null", "trainer.checkpoint_every=0"]
GOAL = 1.10  # bare / distill must not exceed this for any method


# ---------------------------------------------------------------------------------------------- helpers


RngState = tuple[torch.Tensor, "torch.Tensor | None"]


def get_rng(device: torch.device) -> RngState:
    """torch's global random state: the CPU generator's and, on CUDA, the device's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng(state: RngState, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda" and state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class RngStream:
    """A private copy of torch's global random state: ``with stream:`` swaps it in, and back out on exit, so two
    loops in one process each draw the numbers they would draw alone."""

    def __init__(self, state: RngState, device: torch.device) -> None:
        self.state, self.device = state, device
        self._outer: RngState | None = None

    def __enter__(self) -> "RngStream":
        self._outer = get_rng(self.device)
        set_rng(self.state, self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.state = get_rng(self.device)
        assert self._outer is not None
        set_rng(self._outer, self.device)


def lr_at(cfg: OptimizerConfig, local: int, length: int, peak: float | None = None) -> float:
    """Warm-up from 0 over ``warmup_steps``, then constant or linear / cosine decay to 0 over ``length`` steps."""
    scale = min(1.0, (local + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "linear":
        scale *= 1.0 - local / length
    elif cfg.schedule == "cosine":
        scale *= 0.5 * (1.0 + math.cos(math.pi * local / length))
    return (cfg.lr if peak is None else peak) * scale


# ---------------------------------------------------------------------------------------------- the bare loops


def digits_images() -> torch.Tensor:
    """scikit-learn's 8x8 digits as float32 (1797, 1, 8, 8) in [-1, 1] (pixel / 8 - 1)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.images.astype("float32") / 8.0 - 1.0)[:, None]


class Batches:
    """Batches of ``size`` from images held on the device, in a random permutation per epoch (epoch ``e``'s seeded
    ``seed * 100003 + e``, as distill's data does, so both loops see the same batches)."""

    def __init__(self, images: torch.Tensor, size: int, seed: int) -> None:
        self.images, self.size, self.seed = images, size, seed
        self.n = images.shape[0]
        self.epoch, self.offset = 0, 0
        self.perm = self._perm()

    def _perm(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).to(self.images.device)

    def next(self) -> torch.Tensor:
        parts, need = [], self.size
        while need:
            take = self.perm[self.offset : self.offset + need]
            parts.append(take)
            need -= take.shape[0]
            self.offset += take.shape[0]
            if self.offset >= self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self.perm = self._perm()
        return self.images[parts[0] if len(parts) == 1 else torch.cat(parts)]


class Tables:
    """Per-timestep tables on the device, computed once by the library from the teacher's discrete VP schedule
    (``DiffusersDenoiser(net, scheduler_config).schedule``) at the float32 noise levels the methods draw,
    ``sigma[t] = float32(schedule.sigmas[t])``: the network's input scale ``c_in`` and timestep ``timestep(sigma)``,
    and the consistency function's ``c_skip * c_in`` and ``c_out`` (:meth:`ConsistencyDenoiser.scalings`, LCM's,
    at ``timestep_scaling``). :meth:`x0` and :meth:`consistency` then compute what ``DiffusersDenoiser`` and
    ``ConsistencyDenoiser`` compute at those levels, with a table lookup in place of the sigma -> timestep search."""

    def __init__(self, den: DiffusersDenoiser, device: torch.device, timestep_scaling: float = 10.0) -> None:
        sched = den.schedule
        if sched.kind != "vp":
            raise DistillError(f"the bare loop implements discrete VP teachers (the digits teacher), not a "
                               f"{sched.kind} schedule.")
        self.schedule, self.prediction_type = sched, den.prediction_type
        sigma = sched.sigmas.float()  # (T,)
        s64 = sigma.double()
        c_skip, c_out = ConsistencyDenoiser(den, timestep_scaling).scalings(sigma)
        self.T = len(sigma)
        self.sigma = sigma.to(device)
        self.c_in = sched.c_in(s64).float().to(device)
        self.t = sched.timestep(sigma).to(device)
        self.skip = (c_skip * sched.c_in(s64)).float().to(device)
        self.out = c_out.float().to(device)

    def x0(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's x0 from a diffusers network at VE input ``x`` (B, ...) at integer timesteps ``t`` (B,):
        the network sees ``c_in x`` at its timestep; its output becomes x0 by the schedule's ``to_x0``."""
        out = net(x * per_row(self.c_in[t], x), self.t[t]).sample
        return self.schedule.to_x0(out.to(x.dtype), x, self.sigma[t], self.prediction_type)

    def consistency(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """LCM's consistency function ``c_skip c_in x + c_out x0(x)``."""
        return per_row(self.skip[t], x) * x + per_row(self.out[t], x) * self.x0(net, x, t)


@dataclass
class BareRole:
    module: nn.Module
    opt: torch.optim.Optimizer
    cfg: OptimizerConfig
    params: list[torch.Tensor]
    every: int = 1
    peak: float | None = None  # the learning rate of this phase / cycle (None: cfg.lr)
    length: int = 1  # the length of the learning-rate schedule
    ema: list[torch.Tensor] = field(default_factory=list)  # EMA parameters following this role, if any
    source: list[torch.Tensor] = field(default_factory=list)  # all of the module's parameters, for the EMA
    ema_decay: float = 0.0


class BareLoop:
    """A hand-written training loop; subclasses define ``build`` (networks, roles) and ``losses``."""

    def __init__(self, cfg: RecipeConfig, device: torch.device) -> None:
        tc = cfg.trainer
        if tc.grad_accum != 1:
            raise DistillError("the bare loop implements grad_accum = 1 (the digits recipes' setting).")
        if cfg.guidance.active:
            raise DistillError("the bare loop implements unguided, unconditional teachers (the digits teacher).")
        if cfg.data.name != "digits":
            raise DistillError(f"the bare loop trains on the digits, not {cfg.data.name!r}.")
        self.cfg, self.device = cfg, device
        self.schedule_steps = int(tc.max_steps)  # the learning-rate schedule's length: the run as configured
        torch.manual_seed(tc.seed)  # as the trainer does before it builds the method
        self.data = Batches(digits_images().to(device), tc.batch_size, tc.seed)
        self.step_no = 0
        self.roles: dict[str, BareRole] = {}
        self.first: dict[str, torch.Tensor] = {}  # each role's loss at step 0, a tensor
        self.last: dict[str, torch.Tensor] = {}
        self.memo: dict[str, torch.Tensor] = {}  # values one step's roles share (the methods' memo)

    def add_role(self, name: str, module: nn.Module, cfg: OptimizerConfig, *, every: int = 1,
                 peak: float | None = None, length: int | None = None,
                 ema: nn.Module | None = None, ema_decay: float = 0.0) -> None:
        """One AdamW per trainable network; ``ema`` follows ``module`` at ``ema_decay`` after each of its steps."""
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps)
        ema_params = list(ema.parameters()) if ema is not None else []
        source = list(module.parameters()) if ema is not None else []
        if len(ema_params) != len(source):
            raise DistillError("an EMA and its source network differ in their parameters.")
        self.roles[name] = BareRole(module, opt, cfg, params, every, peak, length or self.schedule_steps,
                                    ema_params, source, ema_decay)

    def losses(self, role: str, x0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, name: str, loss: torch.Tensor) -> None:
        r = self.roles[name]
        loss.backward()
        if r.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(r.params, r.cfg.grad_clip)
        lr = lr_at(r.cfg, self.step_no, r.length, r.peak)
        for g in r.opt.param_groups:
            g["lr"] = lr
        r.opt.step()
        for other in self.roles.values():  # a generator's loss also reaches the discriminator's heads
            other.opt.zero_grad(set_to_none=True)
        if r.ema:  # torch.optim.swa_utils' own EMA update
            with torch.no_grad():
                torch._foreach_lerp_(r.ema, r.source, 1.0 - r.ema_decay)

    def step(self) -> None:
        x0 = self.data.next()
        for name, r in self.roles.items():
            if self.step_no % r.every:
                continue
            loss = self.losses(name, x0)
            self.update(name, loss)
            self.last[name] = loss.detach()
            if self.step_no == 0:
                self.first[name] = loss.detach()
        self.memo.clear()
        self.step_no += 1

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


def _teacher_folder(cfg: RecipeConfig) -> Path:
    if cfg.teacher is None:
        raise DistillError("this recipe names no teacher.")
    return Path(cfg.teacher)


def _load_teacher(folder: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import UNet2DModel

    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True)
    return unet.to(device).eval().requires_grad_(False), cfg


def _tables(net: nn.Module, scheduler_config: dict[str, Any], device: torch.device,
            timestep_scaling: float = 10.0) -> Tables:
    """The tables of a network's schedule; the library's denoiser wraps ``net`` (no copy) only to compute them."""
    return Tables(DiffusersDenoiser(net, scheduler_config), device, timestep_scaling)


class BareTeacher(BareLoop):
    """:class:`~distill.methods.teacher.TeacherTraining`'s loss: ``t ~ U{0..T-1}``, ``x = x0 + sigma_t eps``,
    ``lambda(sigma) ||x0_hat - x0||^2``."""

    def __init__(self, cfg: RecipeConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        from diffusers import UNet2DModel

        m = cfg.method
        c, h, _ = digits_images().shape[1:]
        if m.init is not None:
            net, sched = _load_teacher(Path(m.init), device)
            net = net.requires_grad_(True)
        else:
            net = UNet2DModel(sample_size=h, in_channels=c, out_channels=c, **m.unet)  # after the seed, like distill
            sched = m.scheduler
        self.net = net.to(device).train()
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.tab = _tables(self.net, sched, device)
        self.weight = losses.weighting(m.weighting)
        self.add_role("denoiser", self.net, m.optimizer, ema=self.ema, ema_decay=m.ema_decay)

    def losses(self, role: str, x0: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, self.tab.T, (x0.shape[0],), device=x0.device)
        sigma = self.tab.sigma[t]
        x = add_noise(x0, torch.randn_like(x0), sigma)
        err = losses.l2(self.tab.x0(self.net, x, t), x0)
        return (self.weight(sigma) * err).mean()


class BareProgressive(BareLoop):
    """The first phase of progressive distillation (:class:`~distill.methods.progressive.ProgressiveDistillation`):
    the student learns two teacher DDIM steps in one."""

    def __init__(self, cfg: RecipeConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        m = cfg.method
        self.teacher, sched = _load_teacher(_teacher_folder(cfg), device)
        self.student = copy.deepcopy(self.teacher).requires_grad_(True).train()
        self.tab = _tables(self.teacher, sched, device)
        fine = m.start_steps  # phase 0: the teacher's 2n-step grid, the student's n steps
        self.n = fine // 2
        # the teacher's timesteps for the 2n-step grid (descending) and its noise levels, then the grid's last (0)
        self.fine_t = torch.from_numpy(self.tab.schedule.timesteps(fine, m.spacing)).long().to(device)
        self.fine_s = self.tab.schedule.grid(fine, m.spacing).float().to(device)
        self.weight = losses.weighting(m.weighting)
        self.dist = resolve_distance(m.distance)
        iters, lrs = m.per_phase(m.iters_per_phase), m.per_phase(m.lr)
        self.ema = copy.deepcopy(self.student).requires_grad_(False).eval() if m.ema_decay > 0 else None
        self.add_role("student", self.student, m.optimizer, peak=lrs[0], length=iters[0], ema=self.ema,
                      ema_decay=m.ema_decay)

    def losses(self, role: str, x0: torch.Tensor) -> torch.Tensor:
        j = 2 * torch.randint(0, self.n, (x0.shape[0],), device=x0.device)
        t, t_mid = self.fine_t[j], self.fine_t[j + 1]
        s, s_mid, s_next = self.fine_s[j], self.fine_s[j + 1], self.fine_s[j + 2]
        x = add_noise(x0, torch.randn_like(x0), s)
        with torch.no_grad():  # two DDIM steps of the teacher, s -> s_mid -> s_next
            x_mid = ddim_step(x, self.tab.x0(self.teacher, x, t), s, s_mid)
            x_next = ddim_step(x_mid, self.tab.x0(self.teacher, x_mid, t_mid), s_mid, s_next)
        # Algorithm 2's target: the x0 whose one DDIM step s -> s_next lands on x_next
        target = (x_next - rescale(x, s, s_next)) / (1 - per_row(s_next / s, x))
        err = self.dist(self.tab.x0(self.student, x, t), target)
        return (self.weight(s) * err).mean()


class BareConsistency(BareLoop):
    """Consistency distillation (:class:`~distill.methods.consistency.ConsistencyDistillation`) with LCM's
    skipping-step DDIM solver and an EMA target."""

    def __init__(self, cfg: RecipeConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        m = cfg.method
        if m.solver != "ddim" or len(m.stages()) > 1:
            raise DistillError("the bare loop implements solver ddim (the teacher's own timesteps) with one num_steps, "
                               "the recipe's; not euler / heun on a Karras grid, nor a num_steps curriculum.")
        self.teacher, sched = _load_teacher(_teacher_folder(cfg), device)
        self.student = copy.deepcopy(self.teacher).requires_grad_(True).train()
        self.target = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.tab = _tables(self.teacher, sched, device, m.timestep_scaling)
        N = m.stages()[0]
        k = self.tab.T // N
        self.N = N
        # the method's training grid: the teacher's timesteps 0, k - 1, 2k - 1, ..., T - 1 (LCM)
        self.grid_t = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1, N + 1) * k - 1]).to(device)
        self.ict = m.weighting == "ict"
        self.weight = None if self.ict else losses.weighting(m.weighting)
        self.dist = resolve_distance(m.distance, m.huber_c)
        self.add_role("student", self.student, m.optimizer, ema=self.target, ema_decay=m.mu)

    def losses(self, role: str, x0: torch.Tensor) -> torch.Tensor:
        n = torch.randint(0, self.N, (x0.shape[0],), device=x0.device)
        t_prev, t = self.grid_t[n], self.grid_t[n + 1]
        s_prev, s = self.tab.sigma[t_prev], self.tab.sigma[t]
        x = add_noise(x0, torch.randn_like(x0), s)
        with torch.no_grad():
            d = self.tab.x0(self.teacher, x, t)
            x_prev = x + per_row(s_prev - s, x) * noise_estimate(x, d, s)  # one Euler (= DDIM) step of the teacher
            target = self.tab.consistency(self.target, x_prev, t_prev)
        dist = self.dist(self.tab.consistency(self.student, x, t), target)
        w = 1.0 / (s - s_prev) if self.ict else self.weight(s)  # type: ignore[misc]
        return (w * dist).mean()


class BareAdversarial(BareLoop):
    """ADD (:class:`~distill.methods.adversarial.AdversarialDistillation`): the student's one-step output, a hinge
    discriminator on the teacher encoder's features of re-noised inputs, the teacher's distillation target, lazy
    R1. The discriminator's fake is the student's sample of the same step when the student was updated in it (the
    method's ``memo``), else a fresh one."""

    def __init__(self, cfg: RecipeConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        m = cfg.method
        if not m.adversarial or m.backbone != "teacher" or m.distill_weighting != "exponential":
            raise DistillError("the bare loop implements adversarial: true, backbone: teacher, distill_weighting: "
                               "exponential (the recipe's).")
        self.m = m
        self.teacher, sched = _load_teacher(_teacher_folder(cfg), device)
        for blk in self.teacher.down_blocks:
            if hasattr(blk, "skip_conv"):
                raise DistillError("the bare loop's encoder does not implement skip down blocks.")
        self.student = copy.deepcopy(self.teacher).requires_grad_(True).train()
        self.tab = _tables(self.teacher, sched, device)
        # the student's timesteps (999, 749, 499, 249): the stock consistency scheduler's, as the method's
        self.student_t = torch.tensor(consistency_timesteps(self.tab.schedule, m.student_steps, m.student_steps),
                                      device=device).long()
        c, h, w = digits_images().shape[1:]
        probe = torch.randn(2, c, h, w).to(device)  # the feature channels, from a noise probe (as distill draws one)
        with torch.no_grad():
            feats = self.features_at(self.teacher, probe, torch.zeros(2, dtype=torch.long, device=device))
        self.heads = nn.ModuleList([Head(f.shape[1], m.head_channels, "spatial") for f in feats]).to(device)
        self.ema = copy.deepcopy(self.student).requires_grad_(False).eval() if m.ema_decay > 0 else None
        self.add_role("student", self.student, m.student_optimizer, every=m.student_every, ema=self.ema,
                      ema_decay=m.ema_decay)
        self.add_role("disc", self.heads, m.disc_optimizer, every=m.disc_every)

    def features_at(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        """The teacher network's encoder on VE input ``x`` at timesteps ``t``: the outputs of conv_in, each down
        block and the middle block (its up blocks are never run)."""
        emb = unet.time_embedding(unet.time_proj(self.tab.t[t]).to(unet.dtype))
        h = unet.conv_in(x * per_row(self.tab.c_in[t], x))
        feats = [h]
        for blk in unet.down_blocks:
            h, _ = blk(hidden_states=h, temb=emb)
            feats.append(h)
        feats.append(unet.mid_block(h, emb))
        return feats

    def logits(self, x0: torch.Tensor) -> torch.Tensor:
        """(heads, B) logits of images ``x0``, re-noised to a random timestep in ``disc_t_range``."""
        lo, hi = self.m.disc_t_range
        t = torch.randint(lo, hi + 1, (x0.shape[0],), device=x0.device)
        feats = self.features_at(self.teacher, add_noise(x0, torch.randn_like(x0), self.tab.sigma[t]), t)
        return torch.stack([h(f.float()) for h, f in zip(self.heads, feats)])

    def generate(self, x0: torch.Tensor) -> torch.Tensor:
        t = self.student_t[torch.randint(0, len(self.student_t), (x0.shape[0],), device=x0.device)]
        return self.tab.consistency(self.student, add_noise(x0, torch.randn_like(x0), self.tab.sigma[t]), t)

    def losses(self, role: str, x0: torch.Tensor) -> torch.Tensor:
        m = self.m
        if role == "student":
            x_hat = self.generate(x0)
            self.memo["fake"] = x_hat.detach()  # the discriminator's fake of this step: no second forward
            adv = -self.logits(x_hat).mean(1).sum()
            t = torch.randint(0, self.tab.T, (x0.shape[0],), device=x0.device)
            s = self.tab.sigma[t]
            with torch.no_grad():
                target = self.tab.x0(self.teacher, add_noise(x_hat.detach(), torch.randn_like(x_hat), s), t)
            c = 1 / (1 + s**2)  # c(t) = alpha_bar_t (ADD's "exponential")
            return adv + m.lambda_distill * (c * losses.l2(x_hat, target)).mean()
        fake = self.memo.get("fake")
        if fake is None:
            with torch.no_grad():
                fake = self.generate(x0)
        lazy = m.r1_weight > 0 and self.step_no % (m.r1_every * m.disc_every) == 0
        if lazy:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            x = x0.detach().requires_grad_(True)
            with sdpa_kernel(SDPBackend.MATH):  # double backward through attention
                real = self.logits(x)
                (grad,) = torch.autograd.grad(real.sum(), x, create_graph=True)
            r1 = grad.pow(2).flatten(1).sum(1).mean()
        else:
            real = self.logits(x0)
        fake_logits = self.logits(fake)
        hinge = F.relu(1 - real).mean(1).sum() + F.relu(1 + fake_logits).mean(1).sum()
        return hinge + m.r1_weight / 2 * m.r1_every * r1 if lazy else hinge


BARE: dict[str, type[BareLoop]] = {
    "teacher": BareTeacher, "progressive": BareProgressive, "consistency": BareConsistency,
    "adversarial": BareAdversarial,
}


# ---------------------------------------------------------------------------------------------- the benchmark


@dataclass
class Result:
    method: str
    distill_windows: list[float]
    bare_windows: list[float]
    steps: int
    repeats: int
    warmup: int
    losses: dict[str, dict[str, float]]  # role -> {"distill_first", "bare_first", "distill_last", "bare_last"}
    notes: list[str]

    def sps(self, windows: list[float]) -> float | None:
        return self.steps / statistics.median(windows) if windows else None

    def row(self) -> dict[str, Any]:
        d, b = self.sps(self.distill_windows), self.sps(self.bare_windows)
        return {"method": self.method, "label": LABELS.get(self.method, self.method),
                "distill_steps_per_s": d, "bare_steps_per_s": b,
                "ratio_bare_over_distill": (b / d) if (b and d) else None,
                "steps_timed": self.steps, "repeats": self.repeats, "warmup": self.warmup,
                "distill_window_s": self.distill_windows, "bare_window_s": self.bare_windows,
                "losses": self.losses, "notes": self.notes}


def recipe_config(method: str, needed: int) -> tuple[RecipeConfig, list[str], list[str]]:
    """The recipe with the benchmark's overrides; the overrides and notes."""
    path = RECIPES[method]
    overrides = list(BENCH_OVERRIDES)
    if method in VARIANTS:
        overrides += VARIANTS[method][1]
    notes: list[str] = []
    cfg = load_recipe(path, overrides)
    if cfg.teacher is not None and not Path(cfg.teacher).is_absolute():
        overrides.append(f"teacher={ROOT / cfg.teacher}")  # the recipes' teacher path is relative to the repo
    if method.split("-")[0] == "progressive":
        m = cfg.method
        iters = m.per_phase(m.iters_per_phase)
        if needed >= iters[0]:
            # keep every timed step in the first phase: a phase boundary exports a student and writes a checkpoint
            iters[0] = needed + 1
            overrides.append(f"method.iters_per_phase={json.dumps(iters)}")
            notes.append(f"method.iters_per_phase[0] raised to {needed + 1} so all {needed} steps stay in phase 1")
    return load_recipe(path, overrides), overrides, notes


def bench_method(method: str, steps: int, repeats: int, warmup: int, say: Callable[[str], None]) -> Result:
    from distill.trainer import Trainer

    total = warmup + repeats * steps
    cfg, overrides, notes = recipe_config(method, total)
    base = VARIANTS[method][0] if method in VARIANTS else method
    distill_only = method in VARIANTS and not VARIANTS[method][3]
    say(f"[{method}] {RECIPES[method].relative_to(ROOT)} {' '.join(overrides)}: {warmup} warm-up + {repeats} x "
        f"{steps} steps, batch {cfg.trainer.batch_size}")
    with tempfile.TemporaryDirectory(prefix=f"bench-{method}-") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"bf16/fp16 on the CPU")
        trainer = Trainer(cfg, tmp)  # seeds torch's global stream with trainer.seed
        device = trainer.device
        bare: BareLoop | None = None
        bare_rng: RngStream | None = None
        if not distill_only:
            distill_state = get_rng(device)  # distill's stream as it stands after its construction
            bare = BARE[base](cfg, device)  # seeds the global stream itself, as the trainer does
            bare_rng = RngStream(get_rng(device), device)
            set_rng(distill_state, device)
        trainer.tc.max_steps = total  # after construction: the learning-rate schedules keep the recipe's length

        first: dict[str, torch.Tensor] = {}
        method_obj = trainer.method
        original_loss = method_obj.loss

        def capture(role: str, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
            loss, extra = original_loss(role, batch, step)
            if step == 0:
                first[role] = loss.detach().clone()
            return loss, extra

        method_obj.loss = capture  # removed again after the first step
        marks = [warmup + i * steps for i in range(repeats + 1)]
        d_windows: list[float] = []
        b_windows: list[float] = []
        t_start = 0.0

        def on_step(step: int) -> None:
            nonlocal t_start
            if step == 1:
                del method_obj.loss
            if step not in marks:
                return
            sync(device)
            now = time.perf_counter()
            i = marks.index(step)
            if i > 0:
                d_windows.append(now - t_start)
                msg = f"[{method}] window {i}/{repeats}: distill {steps / d_windows[-1]:.2f} steps/s"
                if b_windows:
                    msg += f", bare {steps / b_windows[-1]:.2f} steps/s"
                say(msg)
            if bare is not None and bare_rng is not None and i < repeats:
                with bare_rng:
                    if i == 0:
                        bare.run(warmup)
                    sync(device)
                    t0 = time.perf_counter()
                    bare.run(steps)
                    sync(device)
                    b_windows.append(time.perf_counter() - t0)
            t_start = time.perf_counter()

        done = trainer.fit(resume=False, on_step=on_step)
    losses: dict[str, dict[str, float]] = {}
    for role, v in first.items():
        losses[role] = {"distill_first": float(v), "distill_last": float(done["last"].get(f"{role}/loss", math.nan))}
        if bare is not None and role in bare.first:
            losses[role].update(bare_first=float(bare.first[role]), bare_last=float(bare.last[role]))
    return Result(method, d_windows, b_windows, steps, repeats, warmup, losses, notes)


def report(results: list[Result], args: argparse.Namespace, cmd: str, device: str,
           failed: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    info = {**provenance(cmd, device=device, packages=("torch", "diffusers")), "threads": args.threads,
            "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup, "goal_bare_over_distill_max": GOAL,
            "rows": [r.row() for r in results], "failed": failed or {}}
    lines = [
        "# Speed: distill's trainer against a bare PyTorch loop",
        "",
        measured_by(info, ("torch", "diffusers")),
        "",
        f"Optimizer steps per second at each recipe's own settings (batch 128). Each number is the median of "
        f"{args.repeats} window(s) of {args.steps} steps after {args.warmup} warm-up steps; distill's and the bare "
        "loop's windows alternate in one process, so both see the same machine load. The bare loop "
        "(`BareLoop` in `evals/bench_trainer.py`) does the same work with plain PyTorch and diffusers: same "
        "networks, data, random draws, teacher forwards, AdamW with warm-up, clipping at 1.0, EMA updates and loss "
        "math, with precomputed per-timestep tables and no host sync in a step.",
        "",
        "| method | distill steps/s | bare steps/s | bare/distill | steps timed |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        row = r.row()
        lines.append(f"| {row['label']} | {fmt(row['distill_steps_per_s'], '.2f')} | "
                     f"{fmt(row['bare_steps_per_s'], '.2f')} | {fmt(row['ratio_bare_over_distill'], '.2f')} | "
                     f"{r.repeats} x {r.steps} |")
    compared = [r.row() for r in results if r.bare_windows]
    if compared:
        over = [f"{row['method']} ({row['ratio_bare_over_distill']:.2f})" for row in compared
                if row["ratio_bare_over_distill"] > GOAL]
        lines += ["", f"Goal: bare/distill <= {GOAL:.2f} for every method: "
                  + ("met." if not over else f"not met for {', '.join(over)}.")]
    lines += ["", "Losses of the first and of the last step (both loops start from the same seed, weights, batch and "
              "random draws, and each draws from its own copy of the stream, so they stay in step until float "
              "rounding drifts them apart):", "",
              "| method | role | distill, step 1 | bare, step 1 | distill, last step | bare, last step |",
              "|---|---|---:|---:|---:|---:|"]
    for r in results:
        for role, v in r.losses.items():
            lines.append(f"| {r.method} | {role} | {fmt(v.get('distill_first'), '.6g')} | "
                         f"{fmt(v.get('bare_first'), '.6g')} | {fmt(v.get('distill_last'), '.6g')} | "
                         f"{fmt(v.get('bare_last'), '.6g')} |")
    notes = [f"{r.method}: {n}" for r in results for n in r.notes]
    lines += [
        "",
        "What the bare loop leaves out, by design: resume and checkpoints, metrics rows and the progress bar, the "
        "non-finite guard (by default distill reads one boolean per update from the device on a CPU, and skips a "
        "NaN/inf update on the device on CUDA, reading the flags with each metrics row: `trainer.nonfinite_guard`), "
        "the adversarial method's "
        "discriminator-collapse counter, gradient accumulation and multi-process sharding (one process, "
        "grad_accum 1), and progressive distillation's phase changes (every timed step lies in the first phase).",
    ]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    if failed:
        lines += ["", "Failed on this machine: " + "; ".join(f"{m} ({e})" for m, e in failed.items()) + "."]
    return "\n".join(lines) + "\n", info


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in RECIPES]
    if bad or not methods:
        raise SystemExit(f"--methods: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(RECIPES)}.")
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="distill's trainer against a bare PyTorch loop (steps/s)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed window (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per loop; the median is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the first window (>= 1)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from {', '.join(RECIPES)} (default: all)")
    add_threads(parser)
    add_out(parser, "bench_trainer.md/.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 1 or args.threads < 1:
        parser.error("--steps, --repeats, --warmup and --threads must be >= 1")
    methods = parse_methods(args.methods)
    out = out_dir(args.out)
    set_threads(args.threads)
    cmd = command(__file__, argv)

    def say(msg: str) -> None:
        print(msg, flush=True)

    results, failed = [], {}
    for method in methods:
        try:
            r = bench_method(method, args.steps, args.repeats, args.warmup, say)
        except Exception as exc:  # a variant this machine cannot run (fp16 without CUDA, a compiler error): the
            # others are still measured, and the report names it
            if not isinstance(exc, DistillError):
                import traceback

                traceback.print_exc()
            print(f"error: {method}: {exc}", file=sys.stderr)
            failed[method] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            continue
        results.append(r)
        for role, v in r.losses.items():
            msg = f"[{method}] loss ({role}): step 1 distill {v['distill_first']:.6g}"
            msg += f", bare {v['bare_first']:.6g}" if "bare_first" in v else ""
            msg += f"; last step distill {v['distill_last']:.6g}"
            msg += f", bare {v['bare_last']:.6g}" if "bare_last" in v else ""
            say(msg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    text, info = report(results, args, cmd, device, failed)
    if not results:
        return 1
    md, js = write_report(out, "bench_trainer", text, info)
    print()
    print(text)
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
