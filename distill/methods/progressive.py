"""Progressive distillation (Salimans & Ho, ICLR 2022, Algorithm 2).

In a phase with N student steps the student learns to do in one DDIM step what its teacher does in two.
The student's grid is the teacher's own discrete timesteps for N steps (trailing spacing), and the teacher's
2N-step grid puts one extra point between each pair: with sigmas ``s > s' > s''`` (a student step from
``s`` to ``s''``, through the teacher's midpoint ``s'``) and ``x = x0 + s * eps``:

    teacher: x'  = D(x, s)   + s'  / s  * (x  - D(x, s))          (DDIM, VE form)
             x'' = D(x', s') + s'' / s' * (x' - D(x', s'))
    target:  x_tilde = (x'' - s'' / s * x) / (1 - s'' / s)         (Alg. 2: one DDIM step s -> s'' lands on x'')
    loss:    lambda(s) * ||D_student(x, s) - x_tilde||^2            (lambda: truncated SNR = max(SNR, 1), or SNR+1;
                                                                    another distance by name or dotted path)

Then the student becomes the next phase's teacher and N halves, until ``end_steps``. The student keeps the
teacher's parameterization (the paper's v-prediction for the digits teacher), adapted at the edge as always.
At the end of every phase the student is exported to ``DIR/students/<N>-step/`` and evaluated at N steps.

Guided teachers (Meng et al., CVPR 2023): with ``guidance.scale`` the first phase's teacher is the classifier-free
guided teacher at that ``w`` (both halves in one batched forward), so the student learns the guided sampler and
needs no guidance itself; with ``guidance.range`` the student takes ``w`` as an input (a guidance embedding) and
each sample's target is the teacher guided at its own ``w``: one student for a range of guidance scales. Later
phases distill the previous phase's student, which is already guided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from distill import losses
from distill.config import OptimizerConfig
from distill.errors import DistillError
from distill.methods.base import Context, Cycle, Method, Milestone, Role, StepEvents
from distill.methods.builders import load_teacher
from distill.methods.common import DISTANCES, resolve_distance
from distill.schedules import add_noise, ddim_step, rescale
from distill.tensors import per_row


@dataclass
class ProgressiveConfig:
    """Phases halve the step count: the first student does ``start_steps / 2``, the last ``end_steps``."""

    start_steps: int = 64  # the teacher's DDIM steps in the first phase; its student learns start_steps / 2
    end_steps: int = 1  # the last phase's student steps
    iters_per_phase: int | list[int] = 400  # optimizer steps per phase (one number, or one per phase)
    lr: float | list[float] = 1e-4  # peak learning rate per phase (one number, or one per phase); optimizer.schedule
    # (linear: decay to 0 within each phase) and warmup_steps restart every phase
    weighting: str = "truncated_snr"  # lambda(sigma): truncated_snr = max(SNR, 1) | snr+1 | uniform | snr
    distance: str = "l2"  # d(student x0, target x0): l2 (the paper's) | l1 | pseudo_huber | lpips | package.module:fn
    spacing: str = "trailing"  # the teacher's timesteps for a grid of N: leading | trailing | linspace
    optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=1e-4, warmup_steps=20, schedule="linear"))
    reset_optimizer: bool = True  # fresh Adam moments at every phase
    ema_decay: float = 0.0  # EMA of the student within a phase; 0 = none (phases are short)

    @property
    def num_phases(self) -> int:
        return int(round(math.log2(self.start_steps / self.end_steps))) if self.end_steps > 0 else 0

    def per_phase(self, value: Any) -> list[Any]:
        return list(value) if isinstance(value, list) else [value] * self.num_phases

    def total_steps(self) -> int:
        return sum(self.per_phase(self.iters_per_phase))

    def check(self) -> list[str]:
        errs = []
        if self.end_steps < 1:
            errs.append(f"end_steps must be >= 1, got {self.end_steps}")
        elif self.start_steps <= self.end_steps:
            errs.append(f"start_steps ({self.start_steps}) must be above end_steps ({self.end_steps})")
        elif self.start_steps % self.end_steps or (self.start_steps // self.end_steps) & (self.start_steps // self.end_steps - 1):
            errs.append(f"start_steps / end_steps must be a power of 2 (phases halve the steps), got "
                        f"{self.start_steps} / {self.end_steps}")
        else:
            for name in ("iters_per_phase", "lr"):
                v = getattr(self, name)
                if isinstance(v, list) and len(v) != self.num_phases:
                    errs.append(f"{name} lists {len(v)} values for {self.num_phases} phases "
                                f"({self.start_steps} -> {self.end_steps} steps)")
            if any(i < 1 for i in self.per_phase(self.iters_per_phase)):
                errs.append(f"iters_per_phase must be >= 1, got {self.iters_per_phase}")
            if any(lr < 0 for lr in self.per_phase(self.lr)):
                errs.append(f"lr must be >= 0, got {self.lr}")
        if self.distance not in DISTANCES and ":" not in self.distance:
            errs.append(f"distance: {self.distance!r} is not one of {', '.join(DISTANCES)} nor "
                        "package.module:function or path/to/file.py:function")
        if self.weighting not in losses.WEIGHTINGS:
            errs.append(f"weighting: {self.weighting!r} is not one of {', '.join(losses.WEIGHTINGS)}")
        if self.spacing not in ("leading", "trailing", "linspace"):
            errs.append(f"spacing: {self.spacing!r} is not one of leading, trailing, linspace")
        if not 0 <= self.ema_decay < 1:
            errs.append(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        return errs


class ProgressiveDistillation(Method):
    """Salimans & Ho 2022, Algorithm 2, on the teacher's own discrete timesteps."""

    Config = ProgressiveConfig
    checkpointed = ("teacher",)

    def __init__(self, config: ProgressiveConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        teacher = load_teacher(ctx, "progressive distillation", ("epsilon", "v_prediction", "flow"))
        T = teacher.schedule.num_train_timesteps
        if config.start_steps > T:
            raise DistillError(
                f"start_steps={config.start_steps} asks for a {config.start_steps}-step teacher grid, but the "
                f"teacher's schedule has {T} timesteps; use start_steps <= {T}."
            )
        self.schedule = teacher.schedule
        self._grids: dict[int, torch.Tensor] = {}
        for p in range(config.num_phases):
            # The N-step grid must be every other point of the 2N-step grid, or the target is not two teacher steps.
            n = config.start_steps >> (p + 1)
            fine, coarse = self.grid(2 * n), self.grid(n)
            if not torch.equal(fine[::2], coarse):
                raise DistillError(
                    f"with {config.spacing!r} spacing the teacher's {n}-step timesteps are not every other "
                    f"{2 * n}-step timestep; use spacing: trailing."
                )
        self.student = self.new_student(teacher)
        self.teacher = self.guided(teacher).requires_grad_(False).eval()
        if self.teacher is teacher and not self.shared_base:
            self.checkpointed = ("teacher",)  # each phase's student is loaded into it (Algorithm 2)
        else:
            # guided: the first phase distills the teacher under classifier-free guidance; later phases distill
            # the previous phase's student, which is guided already (and may take w as an input). A LoRA student
            # shares the teacher's base weights: later phases' teacher is a frozen copy of its adapters instead
            self.phase_teacher = self.copy_net(self.student).requires_grad_(False).eval()
            self.checkpointed = ("phase_teacher",)
        if config.ema_decay > 0:
            self.student_ema = self.copy_net(self.student).requires_grad_(False).eval()
            self.ema = {"student_ema": ("student", config.ema_decay)}
        self.weight = losses.weighting(config.weighting)
        self.distance = resolve_distance(config.distance)
        self.iters = config.per_phase(config.iters_per_phase)
        self.lrs = config.per_phase(config.lr)
        self.phase = 0
        self.steps_done = 0  # optimizer steps completed (kept in the method state, for export labels)

    # ------------------------------------------------------------------------------------------ phases

    @property
    def student_steps(self) -> int:
        """Steps of this phase's student; its teacher takes twice as many."""
        return self.config.start_steps >> (self.phase + 1)

    @property
    def current_teacher(self) -> torch.nn.Module:
        """This phase's teacher: the (guided) teacher in the first phase, then the previous phase's student."""
        return self.phase_teacher if self.phase > 0 and hasattr(self, "phase_teacher") else self.teacher

    def _phase_start(self, phase: int) -> int:
        return sum(self.iters[:phase])

    def grid(self, steps: int) -> torch.Tensor:
        """The student's sigma grid for ``steps`` steps: (steps + 1,) float64, descending to 0. A flow teacher's
        stock grid (``linspace(1, t_min, n)``) does not nest as steps halve, so its students take ``t = 1 - i / n``
        through the scheduler's shift, which a stock pipeline reproduces with ``sigmas=``."""
        if steps not in self._grids:
            sched = self.schedule
            if sched.kind == "flow":
                self._grids[steps] = sched.grid_from(sched.uniform(steps))
            else:
                self._grids[steps] = sched.grid(steps, self.config.spacing)
        return self._grids[steps]

    def _exported(self) -> torch.nn.Module:
        return self.student_ema if self.config.ema_decay > 0 else self.unwrap(self.student)

    def roles(self) -> dict[str, Role]:
        cycles = [Cycle(self._phase_start(p), self.iters[p], self.lrs[p]) for p in range(self.config.num_phases)]
        return {"student": Role(self.config.optimizer, cycles=cycles)}

    @torch.no_grad()
    def two_teacher_steps(self, x: torch.Tensor, s: torch.Tensor, s_mid: torch.Tensor, s_next: torch.Tensor,
                          **cond: torch.Tensor) -> torch.Tensor:
        """Two DDIM steps of the teacher, x (B, ...) at sigmas s (B,) -> s_mid (B,) -> s_next (B,)."""
        teacher = self.current_teacher
        x0 = teacher(x, s, **cond)
        x_mid = ddim_step(x, x0, s, s_mid)  # s may be inf (a flow teacher's t = 1)
        x0_mid = teacher(x_mid, s_mid, **cond)
        return ddim_step(x_mid, x0_mid, s_mid, s_next)

    def target(self, x: torch.Tensor, s: torch.Tensor, s_mid: torch.Tensor, s_next: torch.Tensor,
               **cond: torch.Tensor) -> torch.Tensor:
        """x_tilde: the x0 whose single DDIM step from (x, s) to s_next lands where two teacher steps do."""
        x2 = self.two_teacher_steps(x, s, s_mid, s_next, **cond)
        r = per_row(s_next / s, x)  # 0 at s = inf
        return (x2 - rescale(x, s, s_next)) / (1 - r)

    def loss(self, role: str, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = batch["image"]
        cond = self.cond(batch)
        n = self.student_steps
        fine = self.on_device(("grid", 2 * n), lambda: self.grid(2 * n), x0.device, torch.float32)  # the teacher's
        i = self.randint(0, n, x0)
        s, s_mid, s_next = fine[2 * i], fine[2 * i + 1], fine[2 * i + 2]
        x = add_noise(x0, self.randn_like(x0), s)
        x_tilde = self.target(x, s, s_mid, s_next, **cond)
        err = self.distance(self.student(x, s, **cond), x_tilde)
        if err.ndim == 0:
            err = err.expand(x0.shape[0])
        loss = (self.weight(s).to(err.dtype) * err).mean()
        return loss, {"distance": err.mean().detach(), "phase_steps": float(n)}

    def end_of_step(self, step: int) -> StepEvents | None:
        self.steps_done = step
        if step != self._phase_start(self.phase + 1):
            return None
        n = self.student_steps
        last = self.phase + 1 == self.config.num_phases
        done = self.copy_net(self._exported()).eval()
        # the last phase's student is also DIR/model, which the trainer evaluates at the end
        events = StepEvents(milestones=[Milestone(f"{n}-step", done, self._info(n), evaluate=not last)])
        if not last:
            # Algorithm 2: the student of this phase teaches the next one.
            (self.phase_teacher if hasattr(self, "phase_teacher") else self.teacher).load_state_dict(
                self._exported().state_dict())
            self.phase += 1
            if self.config.ema_decay > 0:
                self.unwrap(self.student).load_state_dict(self.student_ema.state_dict())
            events.reset_optimizers = self.config.reset_optimizer
        return events

    def _info(self, steps: int) -> dict[str, Any]:
        info = {"sampler": "ddim", "steps": [steps], "sigmas": {str(steps): self.grid(steps).tolist()}}
        if self.schedule.kind == "flow":  # what to pass a stock pipeline as sigmas= for this grid
            info["scheduler_sigmas"] = {str(steps): self.teacher.schedule.uniform(steps)}
        return info

    def method_state(self) -> dict[str, Any]:
        return {"phase": self.phase, "steps_done": self.steps_done}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.phase = int(state["phase"])
        self.steps_done = int(state.get("steps_done", -1))  # -1: a checkpoint from before this was recorded

    def export_denoiser(self) -> torch.nn.Module:
        return self._exported()

    def export_info(self) -> dict[str, Any]:
        # the current phase's student: end_steps once the run is done; for a `distill export` of an unfinished
        # run, the phase it is in, or at a phase boundary (no step of the new phase yet) the phase just finished
        n = self.student_steps
        if self.phase > 0 and self.steps_done == self._phase_start(self.phase):
            n *= 2
        return self._info(n)
