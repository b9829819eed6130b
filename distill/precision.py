"""Mixed precision on CPUs: attention over short sequences in fp32 under bf16 autocast.

Under CPU bf16 autocast, ``F.scaled_dot_product_attention`` runs torch's bf16 flash-attention kernel. Its backward
pass is many times slower than the fp32 kernel's on short sequences. The digits UNet attends over 16 tokens (its
4x4 feature map), and there one attention forward and backward at batch 128 took 16.7 ms in bf16 against 2.1 ms
in fp32 on an Intel Xeon with AMX (``evals/bench_step_intel/bench_step.md``). That made the whole bf16 training
step slower than fp32's there (0.90x), although its convolutions ran 1.6-2.3x faster. At 256 tokens the two
kernels are about as fast, and beyond that bf16 wins (``evals/bench_step.py --attention`` measures both). So
inside a ``ShortAttentionFP32`` mode, attention whose query and key lengths are both at most ``SHORT_ATTENTION``
runs in fp32 with autocast off, and longer attention keeps autocast's bf16. fp32 attention is also the more
accurate of the two.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SHORT_ATTENTION = 128  # tokens: up to here fp32 attention is the faster one on CPUs (evals/bench_step_intel/)

_SDPA = F.scaled_dot_product_attention
_NAMES = ("query", "key", "value")


class ShortAttentionFP32(TorchFunctionMode):
    """A torch function mode: ``scaled_dot_product_attention`` on CPU tensors under CPU autocast, with query and
    key of at most ``max_tokens`` tokens, runs in fp32 with autocast off. Its result is cast to autocast's dtype,
    the dtype autocast would have given. Every other call passes through unchanged."""

    def __init__(self, max_tokens: int = SHORT_ATTENTION) -> None:
        super().__init__()
        self.max_tokens = max_tokens
        self.calls = 0  # attention calls this mode moved to fp32 (tests read it)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is not _SDPA or not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        args = list(args)
        qkv = [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(_NAMES)]
        q, k = qkv[0], qkv[1]
        if (not all(isinstance(t, torch.Tensor) for t in qkv) or q.device.type != "cpu"
                or max(q.shape[-2], k.shape[-2]) > self.max_tokens):
            return func(*args, **kwargs)
        as_fp32 = [t.float() for t in qkv]
        for i, name in enumerate(_NAMES):
            if i < len(args):
                args[i] = as_fp32[i]
            else:
                kwargs[name] = as_fp32[i]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if isinstance(mask, torch.Tensor) and mask.is_floating_point():
            if len(args) > 3:
                args[3] = mask.float()
            else:
                kwargs["attn_mask"] = mask.float()
        self.calls += 1
        with torch.autocast("cpu", enabled=False):
            out = func(*args, **kwargs)
        return out.to(torch.get_autocast_dtype("cpu"))


def short_attention_fp32(device: torch.device, mixed_precision: str) -> ShortAttentionFP32 | nullcontext:
    """The mode for a training step under ``mixed_precision`` on ``device``: ``ShortAttentionFP32`` for bf16 on a
    CPU, nothing otherwise (GPUs' bf16 attention kernels are fast, and fp32 runs have no autocast)."""
    if device.type == "cpu" and mixed_precision == "bf16":
        return ShortAttentionFP32()
    return nullcontext()
