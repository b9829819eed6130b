"""Small tensor helpers shared by denoisers, samplers, methods and losses."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``v`` of shape (B,) (or ()) -> (B, 1, ..., 1) with ``ndim`` dims in all, for elementwise math with a
    (B, C, H, W) image, a (B, C, F, H, W) video latent, or any other rank."""
    v = torch.as_tensor(v)
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a {v.ndim}-D tensor to {ndim} dims")
    return v.reshape(*v.shape, *([1] * (ndim - v.ndim)))


def per_row(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A per-sample value (B,), a 0-d tensor or a float -> (B, 1, ...) in ``x``'s dtype and device, ready to
    multiply ``x`` (B, ...)."""
    v = torch.as_tensor(v, device=x.device)
    if v.ndim == 0:
        v = v.expand(x.shape[0])
    return append_dims(v.to(x.dtype), x.ndim)


def weights_hash(net: nn.Module) -> str:
    """First 16 hex digits of a sha256 over the state dict (names, dtypes, shapes and raw bytes, sorted by name).

    Keys cached reference statistics: any change to any weight changes the hash.
    """
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        # Reinterpreting as bytes works for every dtype, including bfloat16 which numpy cannot hold.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
