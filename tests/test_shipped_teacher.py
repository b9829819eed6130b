"""The shipped digits teacher: loads in stock diffusers, samples digits, and distill's DDIM matches diffusers'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.pipelines import load_denoiser
from distill.benchmarks.digits.judge import load_digits_net
from distill.samplers import sample_ddim
from distill.schedules import vp_alpha

TEACHER = Path(__file__).resolve().parent.parent / "distill" / "assets" / "digits-teacher"


def test_teacher_loads_in_stock_diffusers_and_samples_digits():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(TEACHER)
    assert type(pipe).__name__ == "DDPMPipeline"
    out = pipe(batch_size=64, num_inference_steps=50, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (64, 8, 8, 1)
    # The digits classifier should be confident on most samples: they look like digits, not noise.
    x = torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1
    probs = load_digits_net()(x).softmax(-1)
    assert (probs.max(-1).values > 0.9).float().mean() > 0.8
    assert len(set(probs.argmax(-1).tolist())) >= 8  # and they are not all one digit


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_ddim_parity_on_trained_teacher_absolute(steps):
    from diffusers import DDIMScheduler

    D = load_denoiser(TEACHER).eval()
    sched = DDIMScheduler.from_config(D.scheduler_config, timestep_spacing="trailing", clip_sample=False)
    sched.set_timesteps(steps)
    latents = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = latents.clone()
    for t in sched.timesteps:
        with torch.no_grad():
            x = sched.step(D.net(x, t).sample, t, x).prev_sample
    sigmas = D.schedule.grid(steps, "trailing")
    ours = sample_ddim(D, latents / vp_alpha(sigmas[0].item()), sigmas)
    assert (ours - x).abs().max().item() <= 1e-4
