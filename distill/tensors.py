"""Small tensor helpers shared by denoisers, samplers, methods and losses."""

from __future__ import annotations

import torch


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
