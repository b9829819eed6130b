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


def parity(folder: str | Path, steps: list[int] | None = None, n: int = 4, seed: int = 0) -> dict[int, float]:
    """How far stock diffusers' pipeline is from distill's own sampler on the same initial noise.

    For each step count ``k`` (default: every count a student supports; 1, 2, 4, 8 for a teacher) this runs
    ``DiffusionPipeline.from_pretrained(folder)(batch_size=n, num_inference_steps=k, generator=Generator(seed))``
    and distill's sampler for the folder (DDIM for a progressive student, or for a teacher against diffusers'
    ``DDIMScheduler`` with trailing spacing in place of its DDPM scheduler; multistep consistency for a
    consistency or adversarial student) from the same unit noise ``z`` and with the same generator for any
    re-noising, and returns the max abs difference of the images in [0, 1]. diffusers starts in the VP space
    (``x_t = z``); distill's variance-exploding state at the same point is ``z * sqrt(1 + sigma_max^2)``.
    """
    import torch
    from diffusers import DiffusionPipeline

    from distill.eval.harness import open_model
    from distill.eval.sweep import sigma_grid
    from distill.samplers import get_sampler

    m = open_model(folder)
    D = m.denoiser
    cfg = D.unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size, cfg.sample_size)
    shape = (n, cfg.in_channels, *size)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if m.method == "teacher":  # a teacher keeps its DDPMScheduler; compare DDIM with diffusers' own DDIMScheduler
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                   clip_sample=False, set_alpha_to_one=True)
    sample = get_sampler(m.samplers[0] if m.method != "teacher" else "ddim")
    out: dict[int, float] = {}
    for k in steps or list(m.steps or (1, 2, 4, 8)):
        with torch.no_grad():
            theirs = pipe(batch_size=n, num_inference_steps=k, generator=torch.Generator().manual_seed(seed),
                          output_type="np").images
            sigmas = (torch.tensor(m.sigmas[k], dtype=torch.float64) if k in m.sigmas else sigma_grid(D, k, "trailing"))
            g = torch.Generator().manual_seed(seed)
            z = torch.randn(shape, generator=g)
            ours = sample(D, z * float((1 + sigmas[0] ** 2).sqrt()), sigmas, generator=g)
        ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        out[k] = float(abs(ours - theirs).max())
    return out
