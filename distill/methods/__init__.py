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

Building blocks every method uses the same way: :func:`load_teacher` (the teacher's denoiser, checked against the
data), :meth:`Method.guided` (the teacher under the recipe's classifier-free guidance) and
:meth:`Method.new_student` (a trainable copy, guidance-embedded when the recipe asks for a ``w``-conditioned
student; with ``student.lora`` the teacher's network with low-rank adapters, sharing its base weights). The
learning rate follows each role's :class:`~distill.config.OptimizerConfig` (warm-up, then constant,
linear or cosine decay), owned by the trainer; a role may restart it in cycles (progressive distillation's phases).

The trainer owns everything else: devices and accelerate, optimizers, accumulation, EMA updates, clipping,
non-finite guards, checkpoints and resume. Methods are named in YAML by a built-in name (``METHODS``) or by a
dotted path ``package.module:Class``.
"""

from __future__ import annotations

import copy
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
    "distribution_matching": "distill.methods.distribution_matching:DistributionMatching",
}


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


@dataclass
class Context:
    """What the trainer tells a method when building it."""

    teacher: str | None  # teacher folder or hub id from the recipe
    sample_shape: tuple[int, ...]  # (C, H, W) of what the networks denoise: a training image, or its latent
    seed: int
    device: torch.device
    pipeline: Any = None  # the teacher's TeacherPipeline (distill.pipelines); None without a teacher
    guidance: Any = None  # the recipe's GuidanceConfig (distill.config)
    student: Any = None  # the recipe's StudentConfig (distill.config); None: a full student


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


def freeze_unused(net: nn.Module, ctx: Context) -> list[str]:
    """Freeze the parameters of ``net`` (a denoiser) that one forward and backward on a probe sample leave without
    a gradient; returns their names. The probe draws no random numbers."""
    shape = tuple(ctx.sample_shape)
    device = next(net.parameters()).device
    x = torch.zeros(1, *shape, device=device)
    cond: dict[str, Any] = {}
    if ctx.pipeline is not None and ctx.pipeline.conditioning is not None:
        cond = {k: v.to(device) for k, v in ctx.pipeline.unconditional().items()}
    if getattr(net, "takes_guidance", False):
        cond["guidance"] = torch.ones(1, device=device)
    was = {n: p.grad for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = None
    net(x, torch.ones(1, dtype=torch.float64, device=device), **cond).float().sum().backward()
    frozen = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in net.named_parameters():
        p.grad = was[n]
        if n in frozen:
            p.requires_grad_(False)
    return frozen


def load_teacher(ctx: Context, method: str, prediction_types: tuple[str, ...] | None = None,
                 source: str | None = None) -> nn.Module:
    """The recipe's teacher as a :class:`~distill.denoisers.DiffusersDenoiser` (unguided), checked against the data.

    Refused before any training, each with what to change: no ``teacher:``; a consistency student given as
    teacher; a network whose input/output channels or resolution differ from what the data gives (images, or
    latents for a latent teacher; a student starts as a copy of its teacher, so this is also the teacher/student
    check); a prediction type the method cannot take (``prediction_types``). ``source`` loads another folder than
    ``ctx.teacher`` (a teacher's ``init``).
    """
    from distill.denoisers import DiffusersDenoiser
    from distill.pipelines import load_pipeline

    source = source or ctx.teacher
    if source is None:
        raise DistillError(f"{method} needs a teacher: set `teacher:` in the recipe.")
    pipeline = ctx.pipeline if ctx.pipeline is not None and source == ctx.teacher else load_pipeline(source)
    teacher = pipeline.load_denoiser()
    if not isinstance(teacher, DiffusersDenoiser):
        raise DistillError(f"{source} is already a consistency model; {method} distills a diffusion teacher.")
    cfg, shape = teacher.net.config, tuple(ctx.sample_shape)
    c, size = shape[0], shape[1:]
    problems = []
    out_c = cfg.out_channels if not teacher.learned_sigma else cfg.in_channels
    if cfg.in_channels != c or out_c != c:
        problems.append(f"its {type(teacher.net).__name__} takes {cfg.in_channels} and gives {out_c} channels, the "
                        f"data has {c}")
    net_size = pipeline.sample_shape[1:]
    if tuple(net_size) != tuple(size):
        problems.append(f"it denoises {net_size[0]}x{net_size[1]} {'latents' if pipeline.spec.latent else 'images'}, "
                        f"the data's are {'x'.join(map(str, size))}")
    if prediction_types is not None and teacher.prediction_type not in prediction_types:
        problems.append(f"it predicts {teacher.prediction_type!r}; {method} takes {' or '.join(prediction_types)}")
    if problems:
        raise DistillError(f"the teacher {source} does not fit this recipe: {'; '.join(problems)}. Choose a "
                           "teacher trained on this data (`data:` in the recipe), or data of the teacher's shape.")
    return teacher


def started_from(teacher: nn.Module, source: str) -> nn.Module:
    """A copy of the ``teacher`` denoiser whose network holds the weights of ``source``'s network (``student.init``):
    a pipeline folder with the same network class and config, and the same noise schedule and prediction type (a
    student of this teacher, such as a consistency student's ``DIR/model``). Refused, with the difference, otherwise.
    """
    from pathlib import Path

    from distill.pipelines import load_pipeline

    if not Path(source).exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise DistillError(f"student.init: {source} does not exist. It is the pipeline folder of the student this one "
                           "starts from (another run's DIR/model): run that recipe first (the recipe's header says "
                           "which), or set student.init to your own student's folder.")
    pipeline = load_pipeline(source)
    net = pipeline.load_network()
    mine = teacher.net
    problems = []
    if type(net) is not type(mine):
        problems.append(f"its network is a {type(net).__name__}, the teacher's a {type(mine).__name__}")
    else:
        theirs, ours = dict(net.config), dict(mine.config)
        differ = sorted(k for k in set(theirs) | set(ours)
                        if not k.startswith("_") and theirs.get(k) != ours.get(k))
        if differ:
            problems.append("its network differs from the teacher's in " + ", ".join(
                f"{k} ({theirs.get(k)!r}, the teacher's {ours.get(k)!r})" for k in differ[:4]))
    sched, mine_sched = pipeline.scheduler_config, teacher.scheduler_config
    for key in ("num_train_timesteps", "beta_schedule", "prediction_type"):
        if key in sched and key in mine_sched and sched[key] != mine_sched[key]:
            problems.append(f"its scheduler's {key} is {sched[key]!r}, the teacher's {mine_sched[key]!r}")
    if problems:
        raise DistillError(f"student.init {source} cannot start a student of this teacher: {'; '.join(problems)}. "
                           "Give a network trained from this teacher (a student's DIR/model), or remove student.init.")
    start = copy.deepcopy(teacher)
    start.net.load_state_dict(net.state_dict())
    return start


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
