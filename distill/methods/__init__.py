"""Methods: what is trained and with which losses. The loop that trains them is :mod:`distill.trainer`.

A method is one file with a config dataclass and a :class:`Method` subclass. It says

* ``roles()``: its trainable networks, each an attribute of the method, with an optimizer config and how often
  it is updated (an attribute ``self.student`` is role ``"student"``);
* ``loss(role, batch, step)``: the scalar loss that role minimises on one micro-batch, plus numbers to log;
* ``ema``: which attributes are exponential moving averages of which roles, and at what decay;
* ``method_state()`` / ``load_method_state()``: its own JSON bookkeeping (a phase counter, say);
* ``export_denoiser()``: the network that becomes ``DIR/model/``; ``export_info()``: for a student, how it
  samples (``{"sampler": ..., "steps": [...], "sigmas": {k: [...]}}``), written as ``distill.json`` beside it;
* randomness through ``self.randn_like(x)`` and ``self.randint(low, high, x)`` (not ``torch.randn_like``): on
  several processes every rank draws the global micro-batch's numbers from one shared stream and keeps its own
  rows, so a run gives the same numbers on 1 or N processes at the same global batch;
* optionally ``end_of_step(step)`` returning :class:`StepEvents` (reset the optimizers, export and evaluate a
  student now), ``lr(role, step)`` to own the learning-rate schedule, and ``checkpointed``: extra module
  attributes a resume needs (a phase's teacher). A config with ``total_steps()`` decides the run's length.

The trainer owns everything else: devices and accelerate, optimizers, accumulation, EMA updates, clipping,
non-finite guards, checkpoints and resume. Methods are named in YAML by a built-in name (``METHODS``) or by a
dotted path ``package.module:Class``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from distill.config import OptimizerConfig
from distill.errors import DistillError

METHODS: dict[str, str] = {
    "teacher": "distill.methods.teacher:TeacherTraining",
    "progressive": "distill.methods.progressive:ProgressiveDistillation",
    "consistency": "distill.methods.consistency:ConsistencyDistillation",
    "adversarial": "distill.methods.adversarial:AdversarialDistillation",
}


@dataclass
class Role:
    """A trainable network's optimizer and update schedule: updated on steps where ``step % every == 0``."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    every: int = 1


@dataclass
class Milestone:
    """A student to export to ``DIR/students/<name>/`` and evaluate now (e.g. at the end of a phase)."""

    name: str
    denoiser: nn.Module
    info: dict[str, Any]  # distill.json: sampler, steps, sigmas
    evaluate: bool = True  # False when DIR/model (evaluated at the end) is the same network


@dataclass
class StepEvents:
    """What a method asks of the trainer after a step."""

    reset_optimizers: bool = False  # fresh optimizer state (moments, step counts) for every role
    milestones: list[Milestone] = field(default_factory=list)


@dataclass
class Context:
    """What the trainer tells a method when building it."""

    teacher: str | None  # teacher folder or hub id from the recipe
    sample_shape: tuple[int, int, int]  # (C, H, W) of a training image
    seed: int
    device: torch.device


class Method(nn.Module):
    """Base class of methods; see the module docstring for the contract."""

    Config: ClassVar[type]
    ema: ClassVar[dict[str, tuple[str, float]]] = {}  # overridden per instance: {ema_attr: (role_attr, decay)}
    checkpointed: ClassVar[tuple[str, ...]] = ()  # further module attributes saved in checkpoints

    def __init__(self, config: Any, ctx: Context) -> None:
        super().__init__()
        self.config = config
        self.ctx = ctx

    shard: tuple[int, int] = (0, 1)  # (rank, world size), set by the trainer

    def _rows(self, n: int) -> slice:
        rank, _ = self.shard
        return slice(rank * n, (rank + 1) * n)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``x``, whose first dimension is this rank's micro-batch: its rows of
        one draw for the global micro-batch (contiguous, whatever ``x``'s memory format)."""
        world, n = self.shard[1], x.shape[0]
        full = torch.randn((world * n, *x.shape[1:]), dtype=x.dtype, device=x.device)
        return full if world == 1 else full[self._rows(n)]

    def randint(self, low: int, high: int, like: torch.Tensor) -> torch.Tensor:
        """One integer in ``[low, high)`` per row of ``like`` (on its device), drawn like :meth:`randn_like`."""
        world, n = self.shard[1], like.shape[0]
        full = torch.randint(low, high, (world * n,), device=like.device)
        return full if world == 1 else full[self._rows(n)]

    def unwrap(self, module: nn.Module) -> nn.Module:
        """The bare network behind a role attribute (the trainer wraps roles for DDP); use it to copy weights."""
        return module

    def roles(self) -> dict[str, Role]:
        raise NotImplementedError

    def loss(self, role: str, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def end_of_step(self, step: int) -> StepEvents | None:
        """Called after every optimizer step (``step`` counts completed steps); phase changes go here."""
        return None

    def lr(self, role: str, step: int) -> float | None:
        """Learning rate of ``role`` at ``step``; None keeps the trainer's (optimizer config, with warm-up)."""
        return None

    def export_info(self) -> dict[str, Any] | None:
        """``distill.json`` for ``DIR/model`` when the export is a student; None for a teacher."""
        return None

    def method_state(self) -> dict[str, Any]:
        """JSON state saved in checkpoints. Rank 0's copy is saved, so keep it the same on every rank."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        pass

    def export_denoiser(self) -> nn.Module:
        raise NotImplementedError


def load_teacher(ctx: Context, method: str, prediction_types: tuple[str, ...] | None = None,
                 source: str | None = None) -> nn.Module:
    """The recipe's teacher as a :class:`~distill.denoisers.DiffusersDenoiser`, checked against the data.

    Refused before any training, each with what to change: no ``teacher:``; a consistency student given as
    teacher; a UNet whose input/output channels or resolution differ from the data's images (a student starts
    as a copy of its teacher, so this is also the teacher/student check); a prediction type the method cannot
    take (``prediction_types``). ``source`` loads another folder than ``ctx.teacher`` (a teacher's ``init``).
    """
    from distill.denoisers import DiffusersDenoiser, load_denoiser

    source = source or ctx.teacher
    if source is None:
        raise DistillError(f"{method} needs a teacher: set `teacher:` in the recipe.")
    teacher = load_denoiser(source)
    if not isinstance(teacher, DiffusersDenoiser):
        raise DistillError(f"{source} is already a consistency model; {method} distills a diffusion teacher.")
    cfg, (c, h, w) = teacher.unet.config, ctx.sample_shape
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size, cfg.sample_size)
    problems = []
    if cfg.in_channels != c or cfg.out_channels != c:
        problems.append(f"its UNet takes {cfg.in_channels} and gives {cfg.out_channels} channels, the data has {c}")
    if size[0] is not None and tuple(size) != (h, w):
        problems.append(f"its UNet is for {size[0]}x{size[1]} images, the data's are {h}x{w}")
    if prediction_types is not None and teacher.prediction_type not in prediction_types:
        problems.append(f"it predicts {teacher.prediction_type!r}; {method} takes {' or '.join(prediction_types)}")
    if problems:
        raise DistillError(f"the teacher {source} does not fit this recipe: {'; '.join(problems)}. Choose a "
                           "teacher trained on this data (`data:` in the recipe), or data of the teacher's shape.")
    return teacher


def describe_methods() -> dict[str, tuple[str, str]]:
    """``{name: (package.module:Class, first line of its docstring)}`` for the built-in methods."""
    out = {}
    for name, target in METHODS.items():
        cls = resolve_method(name)
        out[name] = (target, ((cls.__doc__ or "").strip().splitlines() or [""])[0])
    return out


def resolve_method(name: str) -> type[Method]:
    """A method class from a built-in name or ``package.module:Class``; unknown names list the choices."""
    target = METHODS.get(name, name)
    if ":" not in target:
        raise DistillError(
            f"unknown method {name!r}; choose one of {', '.join(METHODS)} or name your own as package.module:Class "
            "or path/to/file.py:Class."
        )
    from distill.plugins import load_object

    cls = load_object(target, "method")
    if not (isinstance(cls, type) and issubclass(cls, Method) and hasattr(cls, "Config")):
        raise DistillError(f"{target!r} is not a distill Method subclass with a Config dataclass.")
    return cls
