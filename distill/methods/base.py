"""Methods: what is trained and with which losses. The loop that trains them is :mod:`distill.trainer`.

A method is one file with a config dataclass and a :class:`Method` subclass. It says

* ``roles()``: its trainable networks, each an attribute of the method, with an optimizer config and how often
  it is updated (an attribute ``self.student`` is role ``"student"``);
* ``loss(role, batch, step)``: the scalar loss that role minimises on one micro-batch, plus numbers to log;
  ``batch["image"]`` is what the teacher denoises (pixels, or VAE latents for a latent teacher) and
  ``self.cond(batch)`` the conditioning to pass to every network call (``teacher(x, sigma, **cond)``): prompt
  embeddings or class labels, and ``guidance=w`` per sample for a guidance-embedded student;
* ``ema``: which attributes are exponential moving averages of which roles, and at what decay;
* ``method_state()`` / ``load_method_state()``: its own JSON bookkeeping (a phase counter, say);
* ``export_denoiser()``: the network that becomes ``DIR/model/``; ``export_info()``: for a student, how it
  samples (``{"sampler": ..., "steps": [...], "sigmas": {k: [...]}}``), written as ``distill.json`` beside it;
* randomness through ``self.randn_like(x)`` and ``self.randint(low, high, x)`` (not ``torch.randn_like``): on
  several processes every rank draws the global micro-batch's numbers from one shared stream and keeps its own
  rows, so a run gives the same numbers on 1 or N processes at the same global batch;
* ``self.memo(name, make)`` to compute a value once per micro-batch and step and share it between roles (a
  generator's sample that its own loss and the discriminator's or fake score's loss both need): the trainer
  updates roles in ``roles()`` order on the same micro-batches and clears the memo after each step;
* copies of a student (EMA targets, a phase's teacher, an exported milestone) through :meth:`Method.copy_net`, and
  further trainable copies of the teacher (DMD2's fake denoiser) through :meth:`Method.new_adapter`: with
  ``student.lora`` (:mod:`distill.lora`) they share the teacher's frozen base weights instead of copying them;
* optionally ``end_of_step(step)`` returning :class:`StepEvents` (reset the optimizers, export and evaluate a
  student now), and ``checkpointed``: extra module attributes a resume needs (a phase's teacher). A config with
  ``total_steps()`` decides the run's length.

Building blocks every method uses the same way: :func:`~distill.methods.builders.load_teacher` (the teacher's
denoiser, checked against the data), :meth:`Method.guided` (the teacher under the recipe's classifier-free
guidance) and :meth:`Method.new_student` (a trainable copy, guidance-embedded when the recipe asks for a
``w``-conditioned student; with ``student.lora`` the teacher's network with low-rank adapters, sharing its base
weights). The
learning rate follows each role's :class:`~distill.config.OptimizerConfig` (warm-up, then constant,
linear or cosine decay), owned by the trainer; a role may restart it in cycles (progressive distillation's phases).

The trainer owns everything else: devices and accelerate, optimizers, accumulation, EMA updates, clipping,
non-finite guards, checkpoints and resume. Methods are named in YAML by a built-in name
(:data:`~distill.methods.registry.METHODS`) or by a dotted path ``package.module:Class``.

This module is the contract: :class:`Method`, :class:`Role`, :class:`Cycle`, :class:`Milestone`,
:class:`StepEvents` and :class:`~distill.methods.context.Context` (re-exported here). Import them from
:mod:`distill.methods`, which re-exports the builders and the registry too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from distill.config import OptimizerConfig
from distill.methods.builders import freeze_unused, started_from
from distill.methods.context import Context

__all__ = ["Context", "Cycle", "Method", "Milestone", "Role", "StepEvents"]


@dataclass
class Cycle:
    """A stretch of ``length`` steps from ``start`` over which a role's learning-rate schedule runs once from its
    warm-up, peaking at ``lr`` (progressive distillation: one per phase)."""

    start: int
    length: int
    lr: float


@dataclass
class Role:
    """A trainable network's optimizer and update schedule: updated on steps where ``step % every == 0``.

    ``cycles``: restarts of the learning-rate schedule; None is one cycle over the whole run at ``optimizer.lr``."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    every: int = 1
    cycles: list[Cycle] | None = None


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


class Method(nn.Module):
    """Base class of methods; see the module docstring for the contract."""

    Config: ClassVar[type]
    ema: ClassVar[dict[str, tuple[str, float]]] = {}  # overridden per instance: {ema_attr: (role_attr, decay)}
    checkpointed: ClassVar[tuple[str, ...]] = ()  # further module attributes saved in checkpoints
    has_student: ClassVar[bool] = True  # False: the method trains a network in full (teacher training: no student.lora)

    def __init__(self, config: Any, ctx: Context) -> None:
        super().__init__()
        self.config = config
        self.ctx = ctx

    shard: tuple[int, int] = (0, 1)  # (rank, world size), set by the trainer
    # {id: tensor} of the teacher's frozen base weights that LoRA students, their copies and adapters share (not
    # copied, never checkpointed: the teacher's folder holds them); empty for full students
    shared_base: dict[int, torch.Tensor] = {}
    micro: int = 0  # index of the micro-batch being computed, set by the trainer

    def memo(self, name: str, make: Any) -> Any:
        """``make()`` computed once per micro-batch within an optimizer step and shared by every role's loss: a
        value the first role computes (a generator sample, detached) is reused by the next instead of a second
        forward. Cleared by the trainer after every step (:meth:`clear_memo`)."""
        store = self.__dict__.setdefault("_memo", {})
        key = (name, self.micro)
        if key not in store:
            store[key] = make()
        return store[key]

    def remember(self, name: str, value: Any) -> Any:
        """Store ``value`` for :meth:`memo` under ``name`` for this micro-batch and step; returns it."""
        self.__dict__.setdefault("_memo", {})[(name, self.micro)] = value
        return value

    def clear_memo(self) -> None:
        self.__dict__["_memo"] = {}

    def on_device(self, key: Any, make: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The host tensor ``make()`` on ``device`` (as ``dtype``), copied once and cached under ``key``: a method's
        fixed grids and noise levels. On CUDA a host-to-device copy at every step makes the host wait for the device."""
        store = self.__dict__.setdefault("_on_device", {})
        k = (key, str(device), dtype)
        if k not in store:
            store[k] = make().to(device, dtype) if dtype is not None else make().to(device)
        return store[k]

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

    def rand(self, like: torch.Tensor) -> torch.Tensor:
        """One uniform number in [0, 1) per row of ``like``, drawn like :meth:`randn_like`."""
        world, n = self.shard[1], like.shape[0]
        full = torch.rand((world * n,), device=like.device)
        return full if world == 1 else full[self._rows(n)]

    # ------------------------------------------------------------------------------------------ conditioning

    @property
    def w_student(self) -> bool:
        """Whether the student takes the guidance scale as an input (``guidance.range`` set)."""
        g = self.ctx.guidance
        return g is not None and g.range is not None

    def cond(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The conditioning of a micro-batch, to pass to the teacher, the student and any discriminator: its
        prompt embeddings or class labels, and for a ``w``-conditioned student ``guidance``, one ``w`` per sample
        drawn uniformly from ``guidance.range`` (call once per loss: each call draws anew)."""
        from distill.denoisers import COND_KEYS

        out = {k: v for k, v in batch.items() if k in COND_KEYS}
        if self.w_student:
            lo, hi = self.ctx.guidance.range
            x = batch["image"]
            out["guidance"] = lo + (hi - lo) * self.rand(x)
        return out

    def guided(self, teacher: nn.Module) -> nn.Module:
        """The teacher under the recipe's classifier-free guidance (a :class:`~distill.guidance.CFGDenoiser` at
        ``guidance.scale``, which also takes ``guidance=w`` per sample), or the teacher itself when the recipe
        asks for none."""
        g = self.ctx.guidance
        if g is None or (g.scale is None and g.range is None):
            return teacher
        from distill.guidance import CFGDenoiser

        return CFGDenoiser(teacher, self.ctx.pipeline.unconditional(), g.scale if g.scale is not None else 1.0)

    @property
    def lora(self) -> Any:
        """The recipe's ``student.lora`` (:class:`~distill.config.LoraConfig`), or None for a full student."""
        student = self.ctx.student
        return None if student is None else student.lora

    def new_student(self, teacher: nn.Module) -> nn.Module:
        """A trainable copy of the (unguided) teacher; with ``guidance.range`` it takes ``guidance=w`` as an input
        (:func:`distill.guidance.add_guidance_input`), starting equal to the teacher for every ``w``. With
        ``student.lora`` it is the teacher's network with low-rank adapters (:func:`distill.lora.lora_student`):
        the base weights are the teacher's own tensors, frozen; only the adapters (and a guidance embedding) train.

        Parameters the network's forward never reaches (SD3's last joint block computes text queries whose output
        it discards) are frozen: they would never change, and several processes (DDP) refuse unused parameters."""
        if self.lora is not None:
            return self.new_adapter(teacher, self.ctx.guidance.embedding_dim if self.w_student else None)
        init = getattr(self.ctx.student, "init", None)
        start = teacher if init is None else started_from(teacher, init)
        if self.w_student:
            from distill.guidance import add_guidance_input

            student = add_guidance_input(start, self.ctx.guidance.embedding_dim).requires_grad_(True).train()
        else:
            student = copy.deepcopy(start).requires_grad_(True).train()
        freeze_unused(student, self.ctx)
        return student

    def new_adapter(self, teacher: nn.Module, guidance_dim: int | None = None) -> nn.Module:
        """A trainable copy of the (unguided) teacher for a role other than the student (DMD2's fake denoiser): a
        full copy, or with ``student.lora`` one more set of adapters on the shared base weights (its own, trained
        by its own optimizer). ``guidance_dim``: with LoRA, add a guidance embedding of that width."""
        if self.lora is None:
            return copy.deepcopy(teacher).requires_grad_(True).train()
        from distill.lora import base_tensors, lora_student

        self.shared_base = {**self.shared_base, **base_tensors(teacher)}
        net = lora_student(teacher, self.lora, guidance_dim).train()
        freeze_unused(net, self.ctx)
        return net

    def copy_net(self, module: nn.Module) -> nn.Module:
        """A deep copy of ``module`` (an EMA target, a phase's teacher, a milestone), sharing the teacher's frozen
        base weights with it when the student is a LoRA student (:attr:`shared_base`): only adapters and other
        trained tensors are copied. A network sharded by ``trainer.fsdp`` is copied whole (gathered from every
        process: all of them call this at the same point, as they do from a method's hooks)."""
        from distill.sharding import gathered

        return copy.deepcopy(gathered(module), dict(self.shared_base))

    def student_guidance(self) -> float | None:
        """The ``guidance`` a stock pipeline passes as ``guidance_scale`` to reproduce this run's student: ``w``
        for a ``w``-conditioned student; 1.0 for a student distilled at a fixed ``w`` (it needs no guidance, and
        stock pipelines skip classifier-free guidance at 1: None would make them fail); None without guidance."""
        g = self.ctx.guidance
        if g is None:
            return None
        if g.range is None:
            return 1.0
        return float(g.scale if g.scale is not None else sum(g.range) / 2)

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
