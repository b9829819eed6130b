"""The trainer's speed options: a half-precision teacher (``trainer.teacher_dtype``), gradient checkpointing and
``torch.compile``, and the warning that half precision on a CPU without native instructions is slower, not faster.

Threads (``trainer.threads``) are set before anything is built, by the trainer; attention over short sequences in
fp32 under bf16 on a CPU is :mod:`distill.precision`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from distill.errors import DistillError

if TYPE_CHECKING:
    from distill.config import TrainerConfig
    from distill.methods import Method

CPU_BF16_NOTE = ("a digits UNet training step under bf16 autocast ran at 0.20 steps/s against 2.83 in fp32 on an AMD "
                 "EPYC held to AVX2, 14x slower; evals/bench_step_avx2/bench_step.md")
# /proc/cpuinfo flags that give a CPU native half-precision arithmetic (x86 AVX-512 / AMX; aarch64 "bf16")
NATIVE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16", "bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def cpu_has_native(dtype: str) -> bool:
    """Whether this CPU computes ``dtype`` ("bf16" or "fp16") natively, from /proc/cpuinfo's flags (False where
    they cannot be read). Without it, torch emulates half precision on the CPU and autocast makes a step slower."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return any(f in have for f in NATIVE_FLAGS[dtype])
    return False


def apply_speed_options(method: Method, roles: Iterable[str], tc: TrainerConfig, device: torch.device) -> None:
    """trainer.teacher_dtype, trainer.compile and trainer.gradient_checkpointing on ``method``'s trained networks
    (``roles``) and its teacher, and the bf16-on-a-CPU warning. Call it from the trainer's constructor: the
    warning points at the constructor's caller."""
    cpu = device.type == "cpu"
    half = "fp16" if tc.teacher_dtype == "fp16" else "bf16"
    if cpu and (tc.mixed_precision == "bf16" or tc.teacher_dtype != "fp32") and not cpu_has_native(half):
        warnings.warn(
            f"{half} on a CPU without native {half} instructions ({'mixed_precision: bf16' if tc.mixed_precision == 'bf16' else 'teacher_dtype: ' + tc.teacher_dtype}): "
            f"its convolutions are emulated, and runs get much slower, not faster ({CPU_BF16_NOTE}). These options "
            f"are meant for GPUs and CPUs with {NATIVE_FLAGS[half][0]}; use fp32 here.", stacklevel=3)
    teacher = getattr(method, "teacher", None)
    if tc.teacher_dtype != "fp32" and isinstance(teacher, nn.Module):
        # the frozen teacher only makes targets: half precision halves its memory and time on GPUs; the
        # denoiser casts its inputs to the network's dtype and its estimate back to the caller's
        teacher.to({"bf16": torch.bfloat16, "fp16": torch.float16}[tc.teacher_dtype])
    networks = [getattr(method, r) for r in roles]
    if isinstance(teacher, nn.Module):
        networks.append(teacher)
    if tc.gradient_checkpointing:
        found = 0
        for net in networks:
            for m in net.modules():
                if getattr(m, "_supports_gradient_checkpointing", False) and hasattr(m, "enable_gradient_checkpointing"):
                    m.enable_gradient_checkpointing()
                    found += 1
        if not found:
            raise DistillError("trainer.gradient_checkpointing: none of this method's networks supports it (a "
                               "diffusers model does); set it to false.")
    if tc.compile:
        for net in networks:
            net.compile(backend=tc.compile)  # in place: parameter names (and checkpoints) are unchanged
