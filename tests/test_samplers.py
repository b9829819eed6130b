"""Sampler behaviour beyond parity: Heun on a known ODE, the consistency sampler, per-sample seeds."""

from __future__ import annotations

import pytest
import torch

from distill.samplers import (SAMPLERS, SCHEDULER_SAMPLERS, get_sampler, nfe, randn, sample_consistency, sample_euler,
                              sample_heun, scheduler_sigmas)
from distill.errors import DistillError
from distill.schedules import karras_sigmas


class Gaussian:
    """Exact denoiser for data ~ N(0, c^2): D(x, sigma) = x c^2 / (c^2 + sigma^2). Counts its calls."""

    def __init__(self, c: float = 0.5):
        self.c2 = c * c
        self.calls = 0

    def __call__(self, x, sigma):
        self.calls += 1
        s = sigma.to(x.dtype)[:, None, None, None]
        return x * self.c2 / (self.c2 + s**2)


def test_heun_is_second_order_and_counts_calls():
    # PF-ODE solution for Gaussian data: x(sigma) = x(sigma_0) * sqrt(c^2 + sigma^2) / sqrt(c^2 + sigma_0^2).
    D = Gaussian()
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    exact = (D.c2 + 0.01**2) ** 0.5 / (D.c2 + 10.0**2) ** 0.5
    errs = {}
    for n in (8, 16):
        sig = torch.cat([karras_sigmas(n, 0.01, 10.0)[:-1], torch.tensor([0.01], dtype=torch.float64)])
        D.calls = 0
        out = sample_heun(D, x * 1.0, sig)
        assert D.calls == 2 * n  # final sigma 0.01 > 0, so every step is a Heun step
        errs[n] = abs(out.flatten()[0].item() - exact)
        euler_err = abs(sample_euler(D, x * 1.0, sig).flatten()[0].item() - exact)
        assert errs[n] < euler_err
    assert errs[8] / errs[16] > 3.0  # ~4x for a 2nd-order method
    assert nfe("heun", 8) == 15 and nfe("ddim", 8) == 8


def test_consistency_sampler_renoises_between_steps():
    D = Gaussian()
    sig = torch.tensor([10.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    x = 10.0 * torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []
    out = sample_consistency(D, x, sig, generator=torch.Generator().manual_seed(1), callback=seen.append)
    assert D.calls == 3 and len(seen) == 3
    # after step i the state is x0_hat + sigma_{i+1} z with the generator's z
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(seen[0]["x"], seen[0]["denoised"] + 2.0 * z1)
    torch.testing.assert_close(out, seen[-1]["denoised"])


# The stock solvers (DPM-Solver++, UniPC) are deterministic and need a real schedule; they are tested against the
# stock pipelines in test_pipelines.py and below.
@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - set(SCHEDULER_SAMPLERS)))
def test_per_sample_generators_do_not_depend_on_batching(name):
    D = Gaussian()
    sig = karras_sigmas(4, 0.02, 20.0)
    gens = lambda lo, hi: [torch.Generator().manual_seed(100 + i) for i in range(lo, hi)]
    x_all = randn((9, 1, 4, 4), gens(0, 9)) * 20.0
    kwargs = {"eta": 1.0} if name == "ddim" else {}
    full = get_sampler(name)(D, x_all, sig, generator=gens(0, 9), **kwargs)
    parts = [get_sampler(name)(D, randn((hi - lo, 1, 4, 4), gens(lo, hi)) * 20.0, sig, generator=gens(lo, hi), **kwargs)
             for lo, hi in ((0, 2), (2, 9))]
    assert torch.equal(full, torch.cat(parts))


def test_unknown_sampler_lists_choices():
    with pytest.raises(DistillError, match="choose one of consistency, ddim, dpmpp_2m, dpmpp_2m_karras, euler, heun, unipc"):
        get_sampler("dpm")


@pytest.mark.parametrize("steps", [4, 8])
def test_stock_solvers_step_through_coinciding_timesteps(steps, one_thread):
    """Karras sigmas on the digits teacher's 1000-step grid round to the same integer timestep twice at the top
    (998, 998, ...). A solver that looks its place up by timestep then skips a step and indexes past its grid; the
    driver steps by position instead: one call a step, ending on the data."""
    from distill.pipelines import load_denoiser
    from distill.quickstart import benchmark

    D = load_denoiser(benchmark("digits").teacher)
    sigmas = scheduler_sigmas(D, "dpmpp_2m_karras", steps)
    calls = []
    x = randn((2, 1, 8, 8), [torch.Generator().manual_seed(i) for i in range(2)]) * float(sigmas[0])
    out = get_sampler("dpmpp_2m_karras")(D, x, sigmas, callback=calls.append)
    assert [c["i"] for c in calls] == list(range(steps))
    assert torch.isfinite(out).all() and out.abs().max() < 5
