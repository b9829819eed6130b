"""distill's samplers against diffusers' own scheduler loops on the same UNet and initial noise.

The bound is a max abs difference of 1e-4 on image-scale outputs. A randomly initialised eps/v UNet is a
poor denoiser, so its samples can reach magnitudes near sigma_max (about 150 for the linear schedule, 3e4 for
the cosine one), where float32's own spacing exceeds 1e-4; there the bound scales with the output's size
(``close``). ``test_shipped_teacher_parity`` checks the plain absolute bound on a trained teacher.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from conftest import tiny_unet
from distill.denoisers import DiffusersDenoiser
from distill.samplers import sample_ddim, sample_euler
from distill.schedules import vp_alpha

SCHED = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02}


def close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> bool:
    scale = max(1.0, ref.abs().max().item())
    return (ours - ref).abs().max().item() <= tol * scale


def _diffusers_loop(unet, scheduler, latents, generator=None, **step_kwargs):
    x = latents.clone()
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        with torch.no_grad():
            out = unet(inp, t).sample
        x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 4, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddim_matches_diffusers(prediction_type, steps, spacing, beta_schedule):
    unet = tiny_unet()
    cfg = dict(SCHED, beta_schedule=beta_schedule, prediction_type=prediction_type, clip_sample=False,
               timestep_spacing=spacing)
    sched = DDIMScheduler(**cfg)
    sched.set_timesteps(steps)
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = _diffusers_loop(unet, sched, latents, eta=0.0)

    D = DiffusersDenoiser(unet, cfg)
    sigmas = D.schedule.grid(steps, spacing)
    assert torch.equal(torch.from_numpy(D.schedule.timesteps(steps, spacing)), sched.timesteps)
    x = latents / vp_alpha(sigmas[0].item())  # VP latent at t -> VE x at sigma(t)
    ours = sample_ddim(D, x, sigmas)
    assert close(ours, ref)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta_matches_diffusers(prediction_type):
    unet = tiny_unet()
    cfg = dict(SCHED, beta_schedule="linear", prediction_type=prediction_type, clip_sample=False,
               timestep_spacing="trailing")
    sched = DDIMScheduler(**cfg)
    sched.set_timesteps(10)
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = _diffusers_loop(unet, sched, latents, generator=torch.Generator().manual_seed(5), eta=0.7)

    D = DiffusersDenoiser(unet, cfg)
    sigmas = D.schedule.grid(10, "trailing")
    ours = sample_ddim(D, latents / vp_alpha(sigmas[0].item()), sigmas, eta=0.7,
                       generator=torch.Generator().manual_seed(5))
    assert close(ours, ref)
    # and eta really changes the result
    det = sample_ddim(D, latents / vp_alpha(sigmas[0].item()), sigmas)
    assert (det - ours).abs().max().item() > 1e-2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 4, 50])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_euler_matches_diffusers(prediction_type, steps, spacing):
    unet = tiny_unet()
    cfg = dict(SCHED, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               prediction_type=prediction_type, timestep_spacing=spacing)
    sched = EulerDiscreteScheduler(**cfg)
    sched.set_timesteps(steps)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    latents = noise * sched.init_noise_sigma
    ref = _diffusers_loop(unet, sched, latents)

    D = DiffusersDenoiser(unet, cfg)
    # diffusers' Euler uses fractional timesteps under linspace spacing: the same grid through t_to_sigma
    sigmas = torch.cat([D.schedule.t_to_sigma(sched.timesteps.double()), torch.zeros(1)])
    ours = sample_euler(D, latents, sigmas)
    assert close(ours, ref)


@pytest.mark.parametrize("steps", [1, 4])
def test_ddim_from_zero_terminal_snr_matches_diffusers(steps):
    """A zero-terminal-SNR v-prediction teacher (Lin et al. 2024) starts at sigma = inf; distill carries that state
    as the unit noise and takes x0 = -v there, as diffusers' DDIM does at alpha = 0."""
    unet = tiny_unet()
    cfg = dict(SCHED, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
               rescale_betas_zero_snr=True, clip_sample=False, timestep_spacing="trailing")
    sched = DDIMScheduler(**cfg)
    sched.set_timesteps(steps)
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    ref = _diffusers_loop(unet, sched, latents, eta=0.0)
    D = DiffusersDenoiser(unet, cfg)
    sigmas = D.schedule.grid(steps, "trailing")
    assert torch.isinf(sigmas[0])
    ours = sample_ddim(D, latents, sigmas)  # at sigma = inf the state is the unit noise itself
    assert torch.isfinite(ours).all() and close(ours, ref)
