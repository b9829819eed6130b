"""Methods: what is trained and with which losses. The loop that trains them is :mod:`distill.trainer`.

A method is one file with a config dataclass and a :class:`Method` subclass. It says

* ``roles()``: its trainable networks, each an attribute of the method, with an optimizer config and how often
  it is updated (an attribute ``self.student`` is role ``"student"``);
* ``loss(role, batch, step)``: the scalar loss that role minimises on one micro-batch, plus numbers to log;
* ``ema``: which attributes are exponential moving averages of which roles, and at what decay;
* ``method_state()`` / ``load_method_state()``: its own JSON bookkeeping (a phase counter, say);
* ``export_denoiser()``: the network that becomes ``DIR/model/``.

The trainer owns everything else: devices and accelerate, optimizers, accumulation, EMA updates, clipping,
non-finite guards, checkpoints and resume. Methods are named in YAML by a built-in name (``METHODS``) or by a
dotted path ``package.module:Class``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from distill.config import OptimizerConfig
from distill.errors import DistillError

METHODS: dict[str, str] = {
    "teacher": "distill.methods.teacher:TeacherTraining",
}


@dataclass
class Role:
    """A trainable network's optimizer and update schedule: updated on steps where ``step % every == 0``."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    every: int = 1


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

    def __init__(self, config: Any, ctx: Context) -> None:
        super().__init__()
        self.config = config
        self.ctx = ctx

    def roles(self) -> dict[str, Role]:
        raise NotImplementedError

    def loss(self, role: str, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def end_of_step(self, step: int) -> None:
        """Called after every optimizer step (``step`` counts completed steps); phase changes go here."""

    def method_state(self) -> dict[str, Any]:
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        pass

    def export_denoiser(self) -> nn.Module:
        raise NotImplementedError


def resolve_method(name: str) -> type[Method]:
    """A method class from a built-in name or ``package.module:Class``; unknown names list the choices."""
    target = METHODS.get(name, name)
    if ":" not in target:
        raise DistillError(
            f"unknown method {name!r}; choose one of {', '.join(METHODS)} or name your own as package.module:Class."
        )
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise DistillError(f"cannot import method {target!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Method) and hasattr(cls, "Config")):
        raise DistillError(f"{target!r} is not a distill Method subclass with a Config dataclass.")
    return cls
