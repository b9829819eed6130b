"""distill: turn a pretrained diffusion teacher into a few-step student, and measure quality against steps."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["evaluate", "load_denoiser", "train"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import distill` (and the CLI's start-up) does not import torch and diffusers.
    if name == "evaluate":
        from distill.eval.harness import evaluate

        return evaluate
    if name == "load_denoiser":
        from distill.pipelines import load_denoiser

        return load_denoiser
    if name == "train":
        from distill.trainer import train

        return train
    raise AttributeError(f"module 'distill' has no attribute {name!r}")
