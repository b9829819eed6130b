"""``trainer.fsdp``: which of a method's networks are sharded across the processes, and when that is refused.

The sharding itself (FSDP2, whole-tensor checkpoints, gathering for export) is :mod:`distill.sharding`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from torch import nn

from distill import sharding
from distill.errors import DistillError

if TYPE_CHECKING:
    from distill.methods import Method


def shard_networks(method: Method, world: int, *, compile: str | None, announce: bool) -> bool:
    """Shard every network of ``method`` that has weights across ``world`` processes (a collective: every process
    calls it). Returns whether it did (not on one process, where there is nothing to shard across). ``announce``:
    print how much of the weights this process holds (the first process). Call it from the trainer's ``_shard``:
    the one-process warning points at the trainer's caller."""
    if world == 1:
        warnings.warn("trainer.fsdp: true on one process: nothing to shard across, so the networks stay whole. "
                      "Launch with torchrun --nproc_per_node N or accelerate launch to shard them.", stacklevel=4)
        return False
    if method.shared_base:
        raise DistillError("trainer.fsdp does not shard LoRA students: their adapters share the teacher's frozen "
                           "weights, which would be sharded twice. LoRA adapters are small; set trainer.fsdp: "
                           "false (the processes then replicate them, data parallel).")
    if compile:
        raise DistillError("trainer.fsdp with trainer.compile is not supported yet; set one of them off.")
    children = [m for _, m in method.named_children() if any(True for _ in m.parameters())]
    # a network inside another (a discriminator built on the teacher's blocks) is sharded first, on its own
    children.sort(key=lambda m: sum(1 for other in children if other is not m and _contains(m, other)))
    for net in children:
        sharding.shard(net)
    params = {id(p): p for net in children for p in net.parameters()}.values()
    whole = sum(p.numel() * p.element_size() for p in params)
    local = sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else 0 for p in params)
    if announce:
        names = ", ".join(n for n, m in method.named_children() if any(m is c for c in children))
        print(f"fsdp: {names} sharded over {world} processes: {local / 2**20:.1f} MiB of weights on "
              f"this process instead of {whole / 2**20:.1f} MiB", flush=True)
    return True


def reshard_networks(method: Method) -> None:
    """Put every network of ``method`` back to its shards after a step (:func:`distill.sharding.reshard`): one that
    only ran forward would otherwise still hold its gathered weights."""
    for _, m in method.named_children():
        sharding.reshard(m)


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    """Whether ``inner`` is ``outer`` or one of its submodules."""
    return any(m is inner for m in outer.modules())
