"""Round trips of the conventions: timestep <-> sigma, eps <-> x0 <-> v, and the adapter's VP scaling."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from conftest import tiny_unet
from distill.denoisers import DiffusersDenoiser, check_scheduler_config, prediction_from_x0, x0_from_prediction
from distill.errors import DistillError
from distill.schedules import DiscreteVPSchedule, discrete_timesteps, karras_sigmas, vp_alpha, vp_sigma


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_sigmas_match_diffusers_alphas(beta_schedule):
    sched = DDPMScheduler(beta_schedule=beta_schedule)
    s = DiscreteVPSchedule.from_config(sched.config)
    assert torch.equal(s.alphas_cumprod, sched.alphas_cumprod)
    expected = ((1 - sched.alphas_cumprod.double()) / sched.alphas_cumprod.double()).sqrt()
    torch.testing.assert_close(s.sigmas, expected, rtol=1e-6, atol=0)
    assert torch.all(s.sigmas[1:] > s.sigmas[:-1])


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_timestep_sigma_round_trip(beta_schedule):
    s = DiscreteVPSchedule.from_config({"beta_schedule": beta_schedule})
    t_int = torch.arange(0, 1000, dtype=torch.float64)
    assert torch.equal(s.sigma_to_t(s.t_to_sigma(t_int)), t_int)
    t_frac = torch.rand(500, dtype=torch.float64) * 999
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t_frac)), t_frac, rtol=0, atol=1e-9)
    sig = s.sigmas[0] + torch.rand(200, dtype=torch.float64) * (s.sigmas[-1] - s.sigmas[0])
    torch.testing.assert_close(s.t_to_sigma(s.sigma_to_t(sig)), sig, rtol=1e-10, atol=0)


def test_vp_ve_identities():
    sigma = torch.logspace(-3, 3, 50, dtype=torch.float64)
    a, st = vp_alpha(sigma), vp_sigma(sigma)
    torch.testing.assert_close(a**2 + st**2, torch.ones_like(sigma))
    torch.testing.assert_close(st / a, sigma)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_round_trip(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.logspace(-2, 2, 6, dtype=torch.float64)
    x = x0 + sigma[:, None, None, None] * eps
    pred = prediction_from_x0(x0, x, sigma, prediction_type)
    torch.testing.assert_close(x0_from_prediction(pred, x, sigma, prediction_type), x0)
    # The native targets are the textbook ones: eps, v = alpha_t eps - sigma_t x0, x0.
    a, st = vp_alpha(sigma)[:, None, None, None], vp_sigma(sigma)[:, None, None, None]
    target = {"epsilon": eps, "v_prediction": a * eps - st * x0, "sample": x0}[prediction_type]
    torch.testing.assert_close(pred, target)


def test_denoiser_feeds_unet_vp_input_and_integer_timestep():
    seen = {}

    class Spy(torch.nn.Module):  # called by keyword, as every network is
        def forward(self, sample, timestep, return_dict=False, **cond):
            seen.update(x=sample, t=timestep, cond=cond)
            return (torch.zeros_like(sample),)

    D = DiffusersDenoiser(Spy(), {"prediction_type": "epsilon"})
    t = torch.tensor([10, 500, 999])
    sigma = D.schedule.sigmas[t]
    x = torch.randn(3, 1, 8, 8)
    out = D(x, sigma, class_labels=torch.tensor([1, 2, 3]))
    assert torch.equal(seen["t"], t.float())
    torch.testing.assert_close(seen["x"], x * vp_alpha(sigma.float())[:, None, None, None])
    assert "class_labels" in seen["cond"]
    torch.testing.assert_close(out, x)  # eps = 0 -> x0 = x


def test_unsupported_scheduler_configs_are_refused():
    with pytest.raises(DistillError, match="prediction_type 'flow' is not supported for a vp scheduler"):
        check_scheduler_config({"prediction_type": "flow"})
    with pytest.raises(DistillError, match="thresholding"):
        check_scheduler_config({"thresholding": True})
    with pytest.raises(DistillError, match="cannot build DDPMScheduler"):
        DiscreteVPSchedule.from_config({"beta_schedule": "no-such-schedule"})
    with pytest.raises(DistillError):
        DiffusersDenoiser(tiny_unet(), {"prediction_type": "flow"})


@pytest.mark.parametrize("config", [
    {"beta_schedule": "sigmoid"},
    {"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    {"trained_betas": [0.01 * (i + 1) / 50 for i in range(50)], "num_train_timesteps": 50},
])
def test_alphas_come_from_the_diffusers_scheduler(config):
    """Sigmoid betas, zero-terminal-SNR rescaling and trained betas need no formula of distill's own."""
    sched = DDPMScheduler(**config)
    s = DiscreteVPSchedule.from_config({"_class_name": "DDPMScheduler", **config})
    assert torch.equal(s.alphas_cumprod, sched.alphas_cumprod)
    if config.get("rescale_betas_zero_snr"):
        assert s.sigma_max == float("inf")  # zero terminal SNR: the last timestep is pure noise
        assert s.sigma_to_t(torch.tensor([float("inf"), s.sigmas[998]])).tolist() == [999, 998]


def test_spacings_match_diffusers_ddim():
    from diffusers import DDIMScheduler

    for spacing in ("leading", "trailing", "linspace"):
        for n in (1, 3, 10, 50):
            sched = DDIMScheduler(timestep_spacing=spacing)
            sched.set_timesteps(n)
            assert discrete_timesteps(n, 1000, spacing).tolist() == sched.timesteps.tolist(), (spacing, n)
    with pytest.raises(DistillError, match="cannot take 0 steps"):
        discrete_timesteps(0, 1000)


def test_karras_grid():
    s = karras_sigmas(5, 0.002, 80.0)
    assert s.shape == (6,) and s[-1] == 0
    torch.testing.assert_close(s[0], torch.tensor(80.0, dtype=torch.float64))
    torch.testing.assert_close(s[-2], torch.tensor(0.002, dtype=torch.float64))
    assert torch.all(s[:-1] > s[1:])


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_consistency_grid_steps_where_the_steps_change_something(shift):
    """A flow teacher's consistency students sample at t = 1 - i / k through the scheduler's shift, as the stock
    FlowMatchLCMScheduler does when given those as sigmas=; its own grid (linspace(1, 0.001, k)) would put the
    second of 2 steps at t = 0.001, where a step changes nothing."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler

    from distill.denoisers import consistency_sigmas, consistency_timesteps, stock_consistency_sigmas
    from distill.schedules import schedule_from_config

    schedule = schedule_from_config({**FlowMatchEulerDiscreteScheduler(shift=shift).config,
                                     "_class_name": "FlowMatchEulerDiscreteScheduler"})
    stock = FlowMatchLCMScheduler(shift=shift)
    for k in (1, 2, 4):
        assert stock_consistency_sigmas(schedule, k) == [1 - i / k for i in range(k)]
        stock.set_timesteps(sigmas=stock_consistency_sigmas(schedule, k))
        t = torch.tensor(consistency_sigmas(schedule, 50, k), dtype=torch.float64)
        t = torch.where(torch.isinf(t), torch.ones_like(t), t / (1 + t))  # VE sigma -> flow t
        torch.testing.assert_close(t, stock.sigmas.double(), rtol=1e-6, atol=1e-6)
        assert consistency_timesteps(schedule, 50, k) == stock.timesteps.tolist()
    assert 0.4 < float(t[2]) < 0.9  # the 4-step grid's third level: mid-trajectory, not near 0
    stock.set_timesteps(2)
    assert float(stock.sigmas[1]) < 0.01  # the stock default's second step, for contrast
    vp = schedule_from_config({**DDPMScheduler().config, "_class_name": "DDPMScheduler"})
    assert stock_consistency_sigmas(vp, 2) is None  # VP: LCMScheduler's own pick is the student's grid
