"""Students and teachers out as stock diffusers pipeline folders."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from distill.denoisers import ConsistencyDenoiser, DiffusersDenoiser
from distill.errors import DistillError


def save_pipeline(denoiser: nn.Module, folder: str | Path, sampler: str | None = None,
                  original_inference_steps: int | None = None) -> Path:
    """Write ``denoiser`` as a ``DDPMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``).

    ``diffusers.DiffusionPipeline.from_pretrained(folder)`` loads it; weights are safetensors. A teacher keeps
    a ``DDPMScheduler``; a student that samples with ``ddim`` gets a ``DDIMScheduler`` with trailing spacing
    (its grid), so that ``pipe(num_inference_steps=k)`` runs DDIM. A consistency student
    (:class:`~distill.denoisers.ConsistencyDenoiser`) gets an ``LCMScheduler`` that applies its boundary
    scalings and picks its timesteps from the ``original_inference_steps``-point training grid, so
    ``pipe(num_inference_steps=k)`` runs multistep consistency sampling.
    """
    from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, LCMScheduler

    folder = Path(folder)
    if isinstance(denoiser, ConsistencyDenoiser):
        inner = denoiser.inner
        kwargs = {"original_inference_steps": original_inference_steps} if original_inference_steps else {}
        scheduler = LCMScheduler.from_config(inner.scheduler_config, timestep_scaling=denoiser.timestep_scaling,
                                             clip_sample=False, thresholding=False, set_alpha_to_one=True,
                                             timestep_spacing="trailing", **kwargs)
        DDPMPipeline(unet=inner.unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
        return folder
    if not isinstance(denoiser, DiffusersDenoiser):
        raise DistillError(f"only diffusers-backed denoisers can be exported, got {type(denoiser).__name__}.")
    if sampler == "ddim":
        scheduler = DDIMScheduler.from_config(denoiser.scheduler_config, timestep_spacing="trailing",
                                              clip_sample=False, set_alpha_to_one=True)
    else:
        scheduler = DDPMScheduler.from_config(denoiser.scheduler_config)
    pipe = DDPMPipeline(unet=denoiser.unet, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_student(denoiser: nn.Module, folder: str | Path, info: dict) -> Path:
    """A pipeline folder plus ``distill.json`` (method, sampler, step counts, sigma grids) for the harness."""
    import json

    folder = save_pipeline(denoiser, folder, info.get("sampler"), info.get("original_inference_steps"))
    (folder / "distill.json").write_text(json.dumps(info, indent=1))
    return folder
