"""Consistency distillation (Song et al., ICML 2023, Algorithm 2; discrete-time teachers as in LCM, Luo et al. 2023).

The student is a consistency function ``f(x, sigma) = c_skip(sigma) alpha(sigma) x + c_out(sigma) F(x, sigma)``
(:class:`~distill.denoisers.ConsistencyDenoiser`, LCM's form): ``F`` is a copy of the teacher's denoiser and the
scalings give ``f(x, sigma_min) = alpha(sigma_min) x``, the VP sample, with no network term. Training walks a grid ``sigma_min = s_0 < s_1 < ... < s_N = sigma_max``:

    x        = x0 + s_{n+1} * eps                              (a real image, noised to s_{n+1})
    x_n      = Phi(x, s_{n+1} -> s_n; teacher)                 (one step of the teacher's PF-ODE solver)
    loss     = lambda(s_{n+1}, s_n) * d(f_theta(x, s_{n+1}), f_target(x_n, s_n))
    target  <- mu * target + (1 - mu) * theta                  (after every optimizer step; never by the optimizer)

Solvers ``Phi``: ``ddim`` walks the teacher's own discrete timesteps ``0, k - 1, 2k - 1, ..., T - 1`` with the
skipping interval ``k = T / N`` (LCM); ``euler`` and ``heun`` walk a Karras grid (rho = 7) from sigma_min to
sigma_max (Song et al. 2023). A DDIM step and an Euler step are the same map in VE sigmas; they differ in the
grid. Distances ``d``: ``l2``, ``l1``, ``pseudo_huber`` (Song & Dhariwal 2023), ``lpips`` (needs the ``lpips``
package and its weights), or a user's callable named by dotted path ``package.module:function`` taking
``(pred, target)`` and returning one distance per sample (B,).

The exported student is the teacher's pipeline class with an ``LCMScheduler`` (which applies the same boundary
scalings), sampled by multistep consistency sampling at the timesteps ``LCMScheduler`` picks from the N-point grid;
a flow teacher's student gets a ``FlowMatchLCMScheduler`` (``f = F``: the flow parameterization already meets the
boundary condition). The sigma grids are written into ``distill.json`` too.

Guided teachers, as LCM: ``Phi`` steps the teacher's guided ODE (classifier-free guidance at ``guidance.scale``);
with ``guidance.range`` the student is ``w``-conditioned (``time_cond_proj_dim`` for UNets) and each sample's
solver step and target use its own ``w``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from distill import losses
from distill.config import OptimizerConfig
from distill.denoisers import ConsistencyDenoiser, consistency_scheduler_sigmas, consistency_sigmas, consistency_timesteps
from distill.errors import DistillError
from distill.methods.base import Context, Method, Role
from distill.methods.builders import load_teacher
from distill.methods.common import DISTANCES, resolve_distance
from distill.schedules import add_noise, karras_sigmas
from distill.tensors import append_dims, per_row

SOLVERS = ("ddim", "euler", "heun")
CD_WEIGHTINGS = (*losses.WEIGHTINGS, "ict")  # ict: 1 / (s_{n+1} - s_n), Song & Dhariwal 2023


@dataclass
class ConsistencyConfig:
    """Consistency distillation; the run lasts ``iters`` optimizer steps."""

    solver: str = "ddim"  # the teacher's ODE solver: ddim (teacher timesteps, LCM) | euler | heun (Karras grid)
    num_steps: int | list[int] = 50  # N grid intervals (ddim: LCM's skipping interval k = T / N, N = 50 -> k = 20);
    # a list is a curriculum (as in improved CT): equal shares of the run on each N; the student samples on the last
    rho: float = 7.0  # Karras grid exponent for euler / heun
    mu: float = 0.95  # target EMA rate; 0 = the target is the (stop-gradient) student itself
    distance: str = "l2"  # l2 | l1 | pseudo_huber | lpips | package.module:function (pred, target) -> (B,)
    huber_c: float = 0.00054  # pseudo_huber: c = huber_c * sqrt(dims), Song & Dhariwal 2023
    weighting: str = "uniform"  # lambda: uniform (CD paper) | ict = 1/(s_{n+1} - s_n) | snr | snr+1 | ...
    timestep_scaling: float = 10.0  # boundary scalings c_skip / c_out in timestep units (LCM's s)
    iters: int = 2000  # optimizer steps
    optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=1e-4, warmup_steps=50, schedule="linear"))
    export: str = "target"  # which network becomes DIR/model: target (the EMA, as LCM) | student
    sample_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # step counts the student samples at

    def total_steps(self) -> int:
        return self.iters

    def stages(self) -> list[int]:
        """The N of each curriculum stage (one stage when ``num_steps`` is a number)."""
        return list(self.num_steps) if isinstance(self.num_steps, list) else [self.num_steps]

    def check(self) -> list[str]:
        errs = []
        if self.solver not in SOLVERS:
            errs.append(f"solver: {self.solver!r} is not one of {', '.join(SOLVERS)}")
        if min(self.stages()) < 1:
            errs.append(f"num_steps (N) must be >= 1, got {self.num_steps}")
        if self.rho <= 0:
            errs.append(f"rho must be > 0, got {self.rho}")
        if not 0 <= self.mu < 1:
            errs.append(f"mu (the target EMA rate) must lie in [0, 1), got {self.mu}")
        if self.distance not in DISTANCES and ":" not in self.distance:
            errs.append(f"distance: {self.distance!r} is not one of {', '.join(DISTANCES)} nor a dotted path "
                        "package.module:function")
        if self.huber_c <= 0:
            errs.append(f"huber_c must be > 0, got {self.huber_c}")
        if self.weighting not in CD_WEIGHTINGS:
            errs.append(f"weighting: {self.weighting!r} is not one of {', '.join(CD_WEIGHTINGS)}")
        if self.timestep_scaling <= 0:
            errs.append(f"timestep_scaling must be > 0, got {self.timestep_scaling}")
        if self.iters < 1:
            errs.append(f"iters must be >= 1, got {self.iters}")
        if self.export not in ("target", "student"):
            errs.append(f"export: {self.export!r} is not one of target, student")
        if not self.sample_steps or min(self.sample_steps) < 1:
            errs.append(f"sample_steps must be positive integers, got {self.sample_steps}")
        elif max(self.sample_steps) > self.stages()[-1]:
            errs.append(f"sample_steps {self.sample_steps} go beyond the N = {self.stages()[-1]} grid the student "
                        "samples on; raise num_steps or drop the larger step counts")
        return errs


# ---------------------------------------------------------------------------------------------- method


class ConsistencyDistillation(Method):
    """Song et al. 2023, Algorithm 2 (CD), with LCM's skipping-step DDIM solver for discrete-time teachers."""

    Config = ConsistencyConfig

    def __init__(self, config: ConsistencyConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        teacher = load_teacher(ctx, "consistency distillation")
        T = teacher.schedule.num_train_timesteps
        for N in config.stages():
            if N > T - 1:
                raise DistillError(f"num_steps={N} is more intervals than the teacher's {T} timesteps allow; use "
                                   f"num_steps <= {T - 1}.")
            if config.solver == "ddim" and T % N:
                raise DistillError(f"solver ddim walks every k-th teacher timestep with k = T / N; T = {T} is not a "
                                   f"multiple of num_steps = {N} (try {T // 20} or another divisor).")
        self.student = ConsistencyDenoiser(self.new_student(teacher), config.timestep_scaling).train()
        self.teacher = self.guided(teacher).requires_grad_(False).eval()
        # the EMA target: a copy of the student (with student.lora: of its adapters, on the shared base weights)
        self.target = self.copy_net(self.student).requires_grad_(False).eval()
        self.ema = {"target": ("student", config.mu)}
        self.distance = resolve_distance(config.distance, config.huber_c)
        self.grids = {N: self.training_grid(N) for N in config.stages()}
        self.sigmas = self.grids[config.stages()[-1]]  # the final grid

    # ------------------------------------------------------------------------------------------ grids

    def training_grid(self, N: int) -> torch.Tensor:
        """Ascending ``(N + 1,)`` float64 noise levels ``s_0 = sigma_min < ... < s_N = sigma_max``."""
        sched = self.teacher.schedule
        if self.config.solver != "ddim" and sched.kind != "vp":
            raise DistillError(f"solver {self.config.solver} walks a Karras grid to the teacher's sigma_max; a "
                               f"{sched.kind} teacher's levels are its own: use solver ddim.")
        if self.config.solver == "ddim":
            k = sched.num_train_timesteps // N
            t = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1, N + 1) * k - 1])  # LCM: 0, k-1, ..., T-1
            return sched.sigmas[t]
        return karras_sigmas(N + 1, sched.sigma_min, sched.sigma_max, self.config.rho)[:-1].flip(0)

    def sampling_timesteps(self, steps: int) -> list[float]:
        """The teacher timesteps the stock consistency scheduler samples ``steps`` steps at (``LCMScheduler``: from
        the N-point grid)."""
        return consistency_timesteps(self.teacher.schedule, self.config.stages()[-1], steps)

    def sampling_sigmas(self, steps: int) -> list[float]:
        """The student's descending sigma grid for ``steps`` steps: ``steps`` noise levels, then 0."""
        return consistency_sigmas(self.teacher.schedule, self.config.stages()[-1], steps)

    # ------------------------------------------------------------------------------------------ training

    @torch.no_grad()
    def solver_step(self, x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        """One teacher PF-ODE step of ``x`` (B, ...) from noise level ``s`` (B,) to ``s_next`` (B,)."""
        x0 = self.teacher(x, s, **cond)
        inf = torch.isinf(s)
        s_fin = torch.where(inf, torch.ones_like(s), s)
        d = (x - x0) / per_row(s_fin, x)  # dx/dsigma (EDM Eq. 3)
        x_euler = x + per_row(s_next - s_fin, x) * d  # = DDIM: D + s_next / s * (x - D)
        # from s = inf (x the unit noise): the DDIM step's limit D + s_next x (a select, so no wait on the device)
        x_euler = torch.where(append_dims(inf, x.ndim), add_noise(x0, x, s_next), x_euler)
        if self.config.solver != "heun":
            return x_euler
        d_next = (x_euler - self.teacher(x_euler, s_next, **cond)) / per_row(s_next, x)
        return x + per_row(s_next - s, x) * (d + d_next) / 2

    def steps_at(self, step: int) -> int:
        """N of the curriculum stage that ``step`` falls in."""
        stages = self.config.stages()
        return stages[min(step * len(stages) // self.config.iters, len(stages) - 1)]

    def weight(self, s: torch.Tensor, s_prev: torch.Tensor) -> torch.Tensor:
        if self.config.weighting == "ict":
            return 1.0 / (s - s_prev)
        return losses.weighting(self.config.weighting)(s)

    def roles(self) -> dict[str, Role]:
        return {"student": Role(self.config.optimizer)}

    def loss(self, role: str, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = batch["image"]
        cond = self.cond(batch)
        N = self.steps_at(step)
        grid = self.on_device(("grid", N), lambda: self.grids[N], x0.device, torch.float32)
        n = self.randint(0, N, x0)
        s_prev, s = grid[n], grid[n + 1]  # s_n < s_{n+1}
        x = add_noise(x0, self.randn_like(x0), s)
        x_prev = self.solver_step(x, s, s_prev, **cond)
        with torch.no_grad():
            target = self.target(x_prev, s_prev, **cond)
        pred = self.student(x, s, **cond)
        dist = self.distance(pred, target)
        if dist.ndim == 0:
            dist = dist.expand(x0.shape[0])
        loss = (self.weight(s, s_prev).to(dist.dtype) * dist).mean()
        return loss, {"distance": dist.mean().detach()}

    # ------------------------------------------------------------------------------------------ export

    def export_denoiser(self) -> torch.nn.Module:
        return self.target if self.config.export == "target" else self.unwrap(self.student)

    def export_info(self) -> dict[str, Any]:
        steps = sorted(set(self.config.sample_steps))
        info = {"sampler": "consistency", "steps": steps, "sigmas": {str(k): self.sampling_sigmas(k) for k in steps},
                "original_inference_steps": self.config.stages()[-1], "solver": self.config.solver}
        info.update(consistency_scheduler_sigmas(self.teacher.schedule, steps))  # flow: sigmas=
        return info
