"""Sample grids as PNG files, upscaled with nearest-neighbour so 8x8 digits stay crisp.

The implementation lives in :mod:`distill.media` (which also writes video and audio); this module keeps the
evaluation harness's and the CLI's imports working.
"""

from __future__ import annotations

from distill.media import save_grid, save_prompt_grid

__all__ = ["save_grid", "save_prompt_grid"]
