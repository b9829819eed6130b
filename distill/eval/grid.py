"""Sample grids as PNG files, upscaled with nearest-neighbour so 8x8 digits stay crisp."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 8, pad: int = 1) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid; each pixel becomes ``scale x scale``."""
    from PIL import Image

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 64, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = x[i].transpose(1, 2, 0)
    canvas = canvas.repeat(scale, 0).repeat(scale, 1)
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
