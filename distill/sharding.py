"""Fully sharded training (``trainer.fsdp: true``): every network of a method, the frozen teacher included, split
across the processes with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each process keeps a 1/N slice of every parameter, gradient and optimizer moment (a ``DTensor`` sharded on its first
dimension); a network's blocks gather their weights just before their forward and free them after it. So a teacher
and a student that do not fit one device side by side fit N of them. The rest of the trainer is unchanged: the
data and the random draws are laid out globally as for data-parallel runs, so a sharded run trains like one process
at the same global batch.

What changes at the edges, all collective (every process calls them in the same order):

* checkpoints hold whole tensors, as unsharded runs write them (:func:`full_state`, :func:`full_optimizer_state`),
  so a sharded run resumes an unsharded one's checkpoint and the other way round (:func:`load_full_state`,
  :func:`load_full_optimizer_state`);
* an exported student, or a copy a method takes (a milestone), is gathered whole into an ordinary module built
  from a weightless (``meta``) template of the network, kept from before sharding (:func:`gathered`).

Why the trainer calls ``fully_shard`` itself instead of accelerate's FSDP plugin: accelerate routes FSDP only on
accelerators (on CPU processes it runs plain data parallelism), and it prepares only networks that have an
optimizer, so a frozen teacher would stay whole on every process. FSDP2 itself runs on CPU processes (gloo), which
is how the tests check it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

TEMPLATE = "_distill_fsdp_template"  # the weightless copy of a sharded network, in its __dict__ (not a submodule)


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a shard (a ``DTensor``)."""
    dt = _dtensor()
    return any(isinstance(p, dt) for p in module.parameters())


def _units(module: nn.Module) -> list[nn.Module]:
    """The parts of ``module`` that gather their weights on their own, innermost first.

    Inside a diffusers network every direct child is one: each block of its block lists (a UNet's down and up
    blocks, a transformer's blocks) and every other layer (``conv_in``, the time embedding, ``conv_out``...), then
    the network itself. A layer is a unit of its own because FSDP2 gathers a unit's weights again for the backward
    pass only when that unit's outputs are in the loss's graph: the adversarial discriminator reads a teacher
    network's encoder features and never its output, so ``conv_in`` would find its weights freed if the network
    owned it. Outside networks (wrappers, heads), every element of a ``ModuleList`` is a unit; the root the caller
    shards takes the rest."""
    from diffusers import ModelMixin

    units: list[nn.Module] = []

    def has_params(m: nn.Module) -> bool:
        return any(True for _ in m.parameters())

    def network(net: nn.Module) -> None:
        for child in net.children():
            if isinstance(child, nn.ModuleList):
                units.extend(c for c in child if has_params(c))
            elif has_params(child):
                units.append(child)

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if not has_params(child):
                continue
            if isinstance(child, ModelMixin):
                network(child)
                units.append(child)
            elif isinstance(child, nn.ModuleList):
                units.extend(c for c in child if has_params(c))
            else:
                visit(child)

    if isinstance(module, ModelMixin):
        network(module)
    else:
        visit(module)
    return units


def weightless(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are on the ``meta`` device (no memory); buffers and attributes are
    copied. :func:`gathered` fills it with whole weights."""
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def shard(module: nn.Module) -> nn.Module:
    """Shard ``module`` in place over every process (its blocks, then the rest at its root), keeping a weightless
    template of it for :func:`gathered`. A module without parameters, or sharded already, is left as it is."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(module) or not any(True for _ in module.parameters()):
        return module
    template = weightless(module)
    for unit in _units(module):
        fully_shard(unit)
    fully_shard(module)
    module.__dict__[TEMPLATE] = template
    return module


def reshard(module: nn.Module) -> None:
    """Put every sharded part of ``module`` back to its shards. FSDP2 keeps a root's weights gathered after a
    forward until its backward; a network that only ran forward (an EMA target, a teacher) would otherwise hold
    whole, ordinary tensors where the optimizer and the EMA update expect shards."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, _dtensor()) else t


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with whole tensors (collective: every process gets them)."""
    return {k: _full(v.detach()) for k, v in module.state_dict().items()}


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole tensors (a checkpoint's) into a sharded ``module``: each process keeps its own slice."""
    from torch.distributed.tensor import distribute_tensor

    live = module.state_dict()
    out = {}
    for k, v in state.items():
        ref = live.get(k)
        if isinstance(ref, _dtensor()):  # this process's rows; no communication (every process read the file)
            v = distribute_tensor(v.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)
        out[k] = v
    module.load_state_dict(out)


def _opt_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` with whole moment tensors (collective)."""
    sd = opt.state_dict()
    state = {pid: {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
             for pid, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load an optimizer state with whole tensors into the optimizer of sharded parameters."""
    from torch.distributed.tensor import distribute_tensor

    params = _opt_params(opt)
    state = {}
    for pid, st in sd["state"].items():
        p = params[int(pid)]
        state[pid] = {}
        for k, v in st.items():
            if isinstance(p, _dtensor()) and isinstance(v, torch.Tensor) and v.shape == p.shape:
                v = distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            state[pid][k] = v
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def gathered(module: nn.Module) -> nn.Module:
    """An ordinary (unsharded) copy of a sharded ``module``, whole on every process (collective); ``module`` itself
    when it is not sharded."""
    if not is_sharded(module):
        return module
    template = module.__dict__.get(TEMPLATE)
    if template is None:
        from distill.errors import DistillError

        raise DistillError(f"cannot gather a {type(module).__name__} whose weights are shards of another network: "
                           "with trainer.fsdp a method exports or copies one of its own module attributes (a role, "
                           "an EMA, the teacher), not a new wrapper around them. Return the attribute itself, or "
                           "set trainer.fsdp: false.")
    out = copy.deepcopy(template)
    for name, p in module.named_parameters():
        owner, _, leaf = name.rpartition(".")
        sub = out.get_submodule(owner)
        sub._parameters[leaf] = nn.Parameter(_full(p.detach()).clone(), requires_grad=p.requires_grad)
    for name, b in module.named_buffers():
        owner, _, leaf = name.rpartition(".")
        out.get_submodule(owner)._buffers[leaf] = b.detach().clone()
    out.train(module.training)
    return out
