"""Builders: the networks a method starts from, built the same way by every method.

* :func:`load_teacher`: the recipe's teacher as a denoiser, checked against the data (channels, resolution,
  prediction type) before any training;
* :func:`started_from`: a copy of the teacher holding the weights of another run's student (``student.init``);
* :func:`freeze_unused`: freezes the parameters a network's forward never reaches.

A method calls :func:`load_teacher` itself; :meth:`Method.new_student <distill.methods.base.Method.new_student>`
and :meth:`Method.new_adapter <distill.methods.base.Method.new_adapter>` use the other two.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from distill.errors import DistillError
from distill.methods.context import Context


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
    net_size = pipeline.expected_shape(shape)[1:]  # a video network takes the data's frame count
    if tuple(net_size) != tuple(size):
        what = {1: "audio clips", 2: "images", 3: "video clips"}.get(len(net_size), "samples")
        problem = (f"it denoises {'x'.join(map(str, net_size))} {'latents' if pipeline.spec.latent else what}, the "
                   f"data's are {'x'.join(map(str, size))}")
        if len(net_size) != len(size):
            problem += f" (set data.layout to {({1: 'audio', 2: 'image', 3: 'video'}[len(net_size)])})"
        problems.append(problem)
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
