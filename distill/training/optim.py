"""Optimization per role: one AdamW each (prepared by accelerate), its learning-rate schedule, and EMA updates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distill.errors import DistillError
from distill.guidance import is_guidance_layer

if TYPE_CHECKING:
    from accelerate import Accelerator

    from distill.config import OptimizerConfig
    from distill.methods import Method, Role


@torch.no_grad()
def ema_update(ema: nn.Module, source: nn.Module, decay: float, when: torch.Tensor | None = None) -> None:
    """``ema <- decay * ema + (1 - decay) * source`` for parameters (one fused multi-tensor op); buffers are copied.
    Tensors the two share (a LoRA student's frozen base) are left alone. ``when``: a boolean tensor on the device;
    where it is false the EMA stays as it was, without reading the flag on the host."""
    pe, ps = list(ema.parameters()), list(source.parameters())
    if len(pe) != len(ps):
        raise DistillError(f"an EMA of {len(ps)} parameters cannot follow a network of {len(pe)}.")
    pairs = [(a, b.detach()) for a, b in zip(pe, ps) if a is not b]
    pe, ps = [a for a, _ in pairs], [b for _, b in pairs]
    same = all(a.dtype == b.dtype and a.device == b.device for a, b in zip(pe, ps))
    if when is not None and same and pe:
        step = torch._foreach_sub(ps, pe)
        torch._foreach_mul_(step, (1.0 - decay) * when.to(pe[0].dtype))  # a tensor factor: no host read
        torch._foreach_add_(pe, step)
    elif when is not None:
        w = (1.0 - decay) * when.float()
        for a, b in zip(pe, ps):
            a.add_((b.to(a.dtype) - a) * w.to(a.dtype))
    elif same:
        torch._foreach_lerp_(pe, ps, 1.0 - decay)
    else:
        for a, b in zip(pe, ps):
            a.lerp_(b.to(a.dtype), 1.0 - decay)
    for be, bs in zip(ema.buffers(), source.buffers()):
        if be is not bs:
            be.copy_(bs)


def make_optimizer(module: nn.Module, cfg: OptimizerConfig, fused: bool = False,
                   embedding_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW over ``module``'s trainable parameters; ``fused``: the single-kernel AdamW, which skips an update on the
    device when its ``found_inf`` flag is set (the device-side non-finite guard). With ``embedding_lr_scale`` other
    than 1 a guidance embedding's parameters form a second group whose ``lr_scale`` multiplies the role's rate."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise DistillError(f"{type(module).__name__} has no trainable parameters to optimise.")
    emb = [p for n, p in named if is_guidance_layer(n)] if embedding_lr_scale != 1 else []
    emb_ids = {id(p) for p in emb}
    rest = [p for _, p in named if id(p) not in emb_ids]
    groups = [{"params": ps, "lr_scale": scale} for ps, scale in ((rest, 1.0), (emb, embedding_lr_scale)) if ps]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps,
                             fused=fused or None)


def prepare_optimizers(accelerator: Accelerator, method: Method, roles: dict[str, Role], *, sharded: bool,
                       fused: bool, embedding_lr_scale: float) -> dict[str, Any]:
    """One optimizer per role, prepared by accelerate with its network, which replaces the method's attribute
    (accelerate's wrapper: devices, DDP, autocast). Returns the optimizers by role."""
    optimizers: dict[str, Any] = {}
    for role, spec in roles.items():
        net = getattr(method, role)
        if sharded:  # FSDP2 reduces the gradients itself: only the optimizer goes through accelerate
            module, opt = net, accelerator.prepare(make_optimizer(net, spec.optimizer,
                                                                  embedding_lr_scale=embedding_lr_scale))
        else:
            module, opt = accelerator.prepare(net, make_optimizer(net, spec.optimizer, fused, embedding_lr_scale))
        setattr(method, role, module)
        optimizers[role] = opt
    return optimizers


def bare_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (or ``opt`` itself): its state and flags are set there."""
    return opt.optimizer if hasattr(opt, "optimizer") else opt


def role_lr(role: Role, step: int, max_steps: int) -> float:
    """The learning rate of ``role`` at ``step``: its optimizer's schedule (warm-up, then constant, linear or cosine
    decay) over the whole run, or restarted in each of its :class:`~distill.methods.Cycle` (the latest that has
    started)."""
    cfg = role.optimizer
    if not role.cycles:
        return cfg.lr_at(step, max_steps)
    cycle = next((c for c in reversed(role.cycles) if c.start <= step), role.cycles[0])
    return cfg.lr_at(step - cycle.start, cycle.length, cycle.lr)
