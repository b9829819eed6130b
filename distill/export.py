"""Students and teachers out as stock diffusers pipeline folders."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from distill.denoisers import DiffusersDenoiser
from distill.errors import DistillError


def save_pipeline(denoiser: nn.Module, folder: str | Path) -> Path:
    """Write ``denoiser`` as a ``DDPMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``).

    ``diffusers.DiffusionPipeline.from_pretrained(folder)`` loads it; weights are safetensors.
    """
    from diffusers import DDPMPipeline, DDPMScheduler

    if not isinstance(denoiser, DiffusersDenoiser):
        raise DistillError(f"only diffusers-backed denoisers can be exported, got {type(denoiser).__name__}.")
    folder = Path(folder)
    scheduler = DDPMScheduler.from_config(denoiser.scheduler_config)
    pipe = DDPMPipeline(unet=denoiser.unet, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
