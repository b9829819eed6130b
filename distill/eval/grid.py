"""Sample grids as PNG files, upscaled with nearest-neighbour so 8x8 digits stay crisp."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from distill.errors import DistillError


def _uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] as uint8 (N, C, H, W)."""
    if images.ndim != 4:
        raise DistillError(f"a sample grid takes images (N, C, H, W); got shape {tuple(images.shape)}.")
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def _write(cells: dict[tuple[int, int], np.ndarray], shape: tuple[int, int, int, int], path: str | Path,
           scale: int, pad: int) -> Path:
    """Write ``cells`` ({(row, col): image (C, H, W)}) on a ``shape`` = (rows, cols, ...) canvas; empty cells and
    the padding are dark grey."""
    from PIL import Image

    rows, cols, (c, h, w) = shape[0], shape[1], next(iter(cells.values())).shape
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 64, dtype=np.uint8)
    for (r, col), img in cells.items():
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img.transpose(1, 2, 0)
    canvas = canvas.repeat(scale, 0).repeat(scale, 1)
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 8, pad: int = 1) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid; each pixel becomes ``scale x scale``."""
    x = _uint8(images)
    n = len(x)
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    return _write({divmod(i, nrow): x[i] for i in range(n)}, (rows, nrow, 0, 0), path, scale, pad)


def save_prompt_grid(images: torch.Tensor, n_prompts: int, path: str | Path, rows: int = 8, cols: int = 8,
                     scale: int = 8, pad: int = 1) -> Path:
    """Write samples of a prompt set as a PNG grid with one prompt per row: sample i was made for prompt
    ``i % n_prompts`` (the harness's order), so row p holds samples p, p + P, p + 2P, ... of prompt p. Shows the
    first ``rows`` prompts with up to ``cols`` samples each (a prompt with fewer leaves its row's end empty).
    Images (N, C, H, W) in [-1, 1], grayscale (C = 1) or RGB (C = 3); each pixel becomes ``scale x scale``."""
    if n_prompts < 1 or rows < 1 or cols < 1:
        raise DistillError(f"a prompt grid needs at least one prompt, row and column; got n_prompts={n_prompts}, "
                           f"rows={rows}, cols={cols}.")
    x = _uint8(images)
    n = len(x)
    if n == 0:
        raise DistillError("a prompt grid needs at least one sample.")
    shown = min(rows, n_prompts, n)
    per = min(cols, math.ceil(n / n_prompts))
    cells = {(p, j): x[p + j * n_prompts] for p in range(shown) for j in range(per) if p + j * n_prompts < n}
    return _write(cells, (shown, per, 0, 0), path, scale, pad)
