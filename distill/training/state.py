"""Checkpoint state and resume: everything a run needs to continue bitwise where it stopped.

A checkpoint holds the trained networks, EMAs and the method's other checkpointed modules, each optimizer, the
torch and Python random streams, the run's position (step, data epoch and offset, skipped updates), the method's
own state, the process layout and the fp16 grad scaler. The files are :mod:`distill.checkpoint`'s; a sharded run
gathers whole tensors first (:mod:`distill.sharding`), so either kind of run resumes the other's.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distill import sharding
from distill.checkpoint import list_checkpoints, load_checkpoint, load_module_state, save_checkpoint
from distill.errors import DistillError
from distill.training.optim import bare_optimizer

if TYPE_CHECKING:
    from accelerate import Accelerator

    from distill.config import TrainerConfig
    from distill.methods import Method


@dataclass
class Position:
    """Where a run stands: optimizer steps taken, the data stream's epoch and offset in it, skipped updates. The
    fields' order is state.json's."""

    step: int
    epoch: int
    offset: int
    skipped: int


def batch_layout(tc: TrainerConfig, world: int) -> dict[str, int]:
    """The process layout a checkpoint records: a resume is exact at the same global batch and micro-batch."""
    return {"processes": world, "global_batch": tc.batch_size * world,
            "global_micro_batch": tc.batch_size * world // tc.grad_accum}


def ensure_layout(saved: dict[str, int] | None, now: dict[str, int], path: Path) -> None:
    """A resume continues exactly when the global batch and micro-batch are the checkpoint's, on any number
    of processes (data order and noise are laid out globally); anything else is refused."""
    if saved is None or all(saved[k] == now[k] for k in ("global_batch", "global_micro_batch")):
        return
    n = now["processes"]
    raise DistillError(
        f"{path} was written by {saved['processes']} process(es) at a global batch of {saved['global_batch']} "
        f"(micro-batches of {saved['global_micro_batch']}); this run has {n} process(es) at "
        f"{now['global_batch']} (micro-batches of {now['global_micro_batch']}). A resume is exact only at the "
        f"same global batch: set trainer.batch_size={saved['global_batch'] // n} and trainer.grad_accum="
        f"{saved['global_batch'] // saved['global_micro_batch']} for {n} process(es) (the global batch must "
        "divide evenly), or start over with --fresh."
    )


class RunState:
    """Saves a run's checkpoints under ``root`` and resumes from the newest complete one.

    ``roles``: the trained networks' attribute names on ``method`` (with its EMAs and ``checkpointed`` modules,
    what a checkpoint holds); ``optimizers``: their optimizers by role, as accelerate prepared them; ``fused``: this
    run's optimizers are the fused AdamW (the device-side guard), whatever the checkpoint's were."""

    def __init__(self, root: Path, accelerator: Accelerator, method: Method, roles: list[str],
                 optimizers: dict[str, Any], tc: TrainerConfig, *, sharded: bool, fused: bool):
        self.root = root
        self.accelerator = accelerator
        self.method = method
        self.roles = roles
        self.optimizers = optimizers
        self.tc = tc  # read when used: keep_checkpoints and the batch layout as they stand then
        self.sharded = sharded
        self.fused = fused

    def modules(self) -> dict[str, nn.Module]:
        """The checkpointed modules by name, unwrapped from accelerate (their parameter names are the network's)."""
        names = list(self.roles) + list(self.method.ema) + list(self.method.checkpointed)
        return {n: self.accelerator.unwrap_model(getattr(self.method, n)) for n in names}

    def save(self, position: Position) -> Path | None:
        """Write the checkpoint of ``position.step``. Every process calls it (a sharded run gathers its tensors in
        collectives); the first writes it and gets its path, the others None."""
        modules: dict[str, Any] = self.modules()
        opts: dict[str, Any] = {r: bare_optimizer(o) for r, o in self.optimizers.items()}
        if self.sharded:  # whole tensors, gathered by every process (collectives), written by the first
            modules = {n: sharding.full_state(m) for n, m in modules.items()}
            opts = {r: sharding.full_optimizer_state(o) for r, o in opts.items()}
        if not self.accelerator.is_main_process:
            return None
        state = {
            **asdict(position),
            "python_random": _jsonable_random_state(random.getstate()),
            "method": self.method.method_state(),
            "layout": batch_layout(self.tc, self.accelerator.num_processes),
        }
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return save_checkpoint(self.root, position.step, modules, opts, state,
                               self.tc.keep_checkpoints, shared=self.method.shared_base)

    def resume(self, check_layout: bool = True) -> Position | None:
        """Load the newest complete checkpoint into the networks, optimizers, random streams, grad scaler and
        method, falling back past damaged ones; returns its position, or None if there is none.

        ``check_layout=False`` skips the global-batch check (to export a checkpoint made on other processes)."""
        ckpts = list_checkpoints(self.root)
        if not ckpts:
            return None
        ck = None
        for path in reversed(ckpts):
            try:
                ck = load_checkpoint(path)
                break
            except DistillError as exc:
                warnings.warn(f"{exc} Falling back to the previous checkpoint.", stacklevel=3)
        if ck is None:
            raise DistillError(f"no usable checkpoint in {self.root} (all damaged); "
                               "start over with --fresh or another --out.")
        try:
            for name, module in self.modules().items():
                if self.sharded:
                    sharding.load_full_state(module, ck["modules"][name])
                else:
                    load_module_state(module, ck["modules"][name], self.method.shared_base)
            for role, opt in self.optimizers.items():
                inner = bare_optimizer(opt)
                if self.sharded:
                    sharding.load_full_optimizer_state(inner, ck["optimizers"][role])
                else:
                    inner.load_state_dict(ck["optimizers"][role])
                for g in inner.param_groups:  # the kernel is this run's choice, not the checkpoint's
                    g["fused"], g["foreach"] = (True, None) if self.fused else (None, g.get("foreach"))
                if self.fused:  # fused AdamW keeps its step counts as float32 beside the weights
                    for p, st in inner.state.items():
                        if torch.is_tensor(st.get("step")):
                            st["step"] = st["step"].to(p.device, torch.float32)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise DistillError(
                f"the checkpoint in {path} does not fit this recipe ({type(exc).__name__}: {str(exc)[:200]}); it was "
                "made with another method or model. Use --fresh to start over, or another --out."
            ) from exc
        device = self.accelerator.device
        torch.set_rng_state(ck["rng"]["torch_cpu"])
        if device.type == "cuda" and "torch_cuda" in ck["rng"]:
            torch.cuda.set_rng_state(ck["rng"]["torch_cuda"], device)  # rank 0's stream, on this rank's GPU
        st = ck["state"]
        if check_layout:
            ensure_layout(st.get("layout"), batch_layout(self.tc, self.accelerator.num_processes), path)
        if self.accelerator.scaler is not None and "scaler" in st:
            self.accelerator.scaler.load_state_dict(st["scaler"])
        random.setstate(_random_state_from_json(st["python_random"]))
        self.method.load_method_state(st["method"])
        return Position(st["step"], st["epoch"], st["offset"], st["skipped"])


def _jsonable_random_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _random_state_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
