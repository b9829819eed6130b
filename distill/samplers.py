"""Samplers: pure functions ``sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None)``.

Each takes ``x`` (B, ...) already at noise level ``sigmas[0]`` (VE: pure noise is ``sigma_max * randn``, made by
:func:`distill.schedules.scale_noise`; at ``sigma = inf``, a flow teacher's ``t = 1``, the state is the unit noise
itself) and a descending grid ``sigmas`` of shape (n + 1,) that ends at the final noise level (usually 0). It
returns the sample at ``sigmas[-1]``. ``denoiser`` is any ``D(x, sigma, **cond) -> x0_hat``; ``cond`` (prompt
embeddings, class labels, ``guidance=w`` for a guided teacher or a guidance-embedded student) is passed to every
call.

``generator`` is a ``torch.Generator`` or a list of B generators, one per sample; with a list, sample i's
noise comes from generator i alone, so results do not depend on how samples are batched.
``callback(dict(i=, x=, sigma=, sigma_next=, denoised=))`` is called after every step.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch

from distill.errors import DistillError
from distill.schedules import add_noise, noise_estimate

Denoiser = Callable[..., torch.Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {}


def _register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    SAMPLERS[fn.__name__.removeprefix("sample_")] = fn
    return fn


def randn(shape: Sequence[int], generator: Generator = None, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Standard normal noise of ``shape``; with a list of generators, row i is drawn from generator i."""
    # Noise is drawn on the generator's own device, then moved, so a CPU generator gives the same numbers
    # whether the model runs on CPU or GPU.
    if generator is None:
        return torch.randn(tuple(shape), dtype=dtype, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=generator.device).to(device)
    if len(generator) != shape[0]:
        raise DistillError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample.")
    rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=dtype, device=g.device) for g in generator]
    return torch.stack(rows).to(device)


def _d(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any] | None) -> torch.Tensor:
    # the grid lives on the host; a blocking copy of its level to a GPU would wait for the device's queued work at
    # every step (a non-blocking one from pageable memory is staged at once, and waits for nothing)
    return denoiser(x, sigma.to(x.device, torch.float64, non_blocking=True).expand(x.shape[0]), **(cond or {}))


@_register
@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    generator: Generator = None,
    callback: Callable[[dict], None] | None = None,
    cond: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) written in VE sigmas.

    With ``eps_hat = (x - x0_hat) / sigma``, one step to ``sigma'`` is
    ``x' = x0_hat + sigma_down * eps_hat + sigma_up * z`` where
    ``sigma_up = eta * sigma' * sqrt(1 - sigma'^2 / sigma^2)`` and ``sigma_down = sqrt(sigma'^2 - sigma_up^2)``:
    Eq. 12 divided by ``sqrt(alpha_bar')``. ``eta = 0`` is deterministic (= Euler on the PF-ODE),
    ``eta = 1`` is DDPM's ancestral sampler. For ``eta > 0`` one ``z`` is drawn at every step, the last included,
    as diffusers' ``DDIMScheduler`` draws it, so the two agree on the same generator.
    """
    sigmas = sigmas.double()
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = _d(denoiser, x, s, cond)
        eps = noise_estimate(x, x0, s)
        sigma_up = eta * s_next * (1 - s_next**2 / s**2).clamp(min=0).sqrt()
        sigma_down = (s_next**2 - sigma_up**2).clamp(min=0).sqrt()
        x = x0 + sigma_down.to(x.dtype) * eps
        if eta > 0:
            x = x + sigma_up.to(x.dtype) * randn(x.shape, generator, dtype=x.dtype, device=x.device)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": x0})
    return x


@_register
@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generator = None,
    callback: Callable[[dict], None] | None = None,
    cond: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` (EDM Eq. 3).

    A step from ``sigma = inf`` (a flow teacher's ``t = 1``) is taken in its limit form ``x0 + sigma' eps_hat``, the
    same map (a DDIM step), which is also what flow Euler (``x_t + (t' - t) v``) does there."""
    sigmas = sigmas.double()
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = _d(denoiser, x, s, cond)
        if torch.isinf(s):
            x = add_noise(x0, x, s_next)  # x holds the unit noise at inf: eps_hat = x
        else:
            d = (x - x0) / s.to(x.dtype)
            x = x + (s_next - s).to(x.dtype) * d
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": x0})
    return x


@_register
@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generator = None,
    callback: Callable[[dict], None] | None = None,
    cond: Mapping[str, Any] | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Heun's 2nd-order method, EDM Algorithm 2 (Algorithm 1 when ``s_churn = 0``, the default).

    ``2n - 1`` denoiser calls for n steps: the last step, to ``sigma = 0``, is plain Euler.
    """
    sigmas = sigmas.double()
    if torch.isinf(sigmas[0]):
        raise DistillError("Heun's trapezoid step is not defined from sigma = inf (a flow teacher's t = 1); sample "
                           "Heun on a karras grid (a finite sigma_max), or use euler / ddim.")
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= float(s) <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            z = randn(x.shape, generator, dtype=x.dtype, device=x.device)
            x = x + ((s_hat**2 - s**2).sqrt() * s_noise).to(x.dtype) * z
        x0 = _d(denoiser, x, s_hat, cond)
        d = (x - x0) / s_hat.to(x.dtype)
        x_next = x + (s_next - s_hat).to(x.dtype) * d
        if s_next > 0:
            x0_next = _d(denoiser, x_next, s_next, cond)
            d_next = (x_next - x0_next) / s_next.to(x.dtype)
            x_next = x + (s_next - s_hat).to(x.dtype) * (d + d_next) / 2
        x = x_next
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": x0})
    return x


@_register
@torch.no_grad()
def sample_consistency(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generator = None,
    callback: Callable[[dict], None] | None = None,
    cond: Mapping[str, Any] | None = None,
    sigma_min: float = 0.0,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1).

    Denoise to ``x0_hat = f(x, sigma_i)``, then re-noise to the next level:
    ``x = x0_hat + sqrt(sigma_{i+1}^2 - sigma_min^2) * z``. The last grid entry is the final level (usually 0,
    where no noise is added). One denoiser call per step.
    """
    sigmas = sigmas.double()
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = _d(denoiser, x, s, cond)
        if s_next > 0:
            scale = (s_next**2 - sigma_min**2).clamp(min=0).sqrt()
            x = add_noise(x0, randn(x.shape, generator, dtype=x.dtype, device=x.device), scale)
        else:
            x = x0
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": x0})
    return x


# ---------------------------------------------------------------------------------------------- stock solvers

# The training-free solvers a user would pick instead of distilling, run as diffusers implements them: the
# teacher's own schedule in the solver's class, stepping in its native state, fed the network's native output
# (distill's x0 estimate converted back), at the solver's own (integer) timesteps.
SCHEDULER_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def stock_scheduler(denoiser: Denoiser, name: str) -> Any:
    """The diffusers scheduler behind sampler ``name``, built from the denoiser's own scheduler config."""
    import diffusers

    cls_name, kwargs = SCHEDULER_SAMPLERS[name]
    schedule = denoiser.schedule
    config = dict(schedule.config)
    native = denoiser.prediction_type
    kwargs = {**kwargs, "prediction_type": "flow_prediction" if native == "flow" else native}
    if schedule.kind == "flow":
        kwargs.update(use_flow_sigmas=True, flow_shift=float(config.get("shift", 1.0)))
    elif schedule.kind != "vp":
        raise DistillError(f"{name} drives a VP or flow schedule; this teacher's is {schedule.kind}.")
    return getattr(diffusers, cls_name).from_config(config, **kwargs)


def _ve(schedule: Any, sigma: float) -> float:
    """A solver's own sigma as distill's VE sigma (flow solvers hold t)."""
    return sigma / (1 - sigma) if schedule.kind == "flow" else sigma


def scheduler_sigmas(denoiser: Denoiser, name: str, num_steps: int) -> torch.Tensor:
    """The VE grid (num_steps + 1,) float64 stock solver ``name`` samples on for ``num_steps`` steps."""
    sched = stock_scheduler(denoiser, name)
    sched.set_timesteps(num_steps)
    return torch.tensor([_ve(denoiser.schedule, float(v)) for v in sched.sigmas], dtype=torch.float64)


def _stock_solver(name: str) -> Callable[..., torch.Tensor]:
    def sample(
        denoiser: Denoiser,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        generator: Generator = None,
        callback: Callable[[dict], None] | None = None,
        cond: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        steps = len(sigmas) - 1
        sched = stock_scheduler(denoiser, name)
        sched.set_timesteps(steps)
        # Step by position: a solver that finds its place by looking the timestep up skips a step when two of its
        # (integer) timesteps coincide, as Karras sigmas on a 1000-step grid make them at the top end.
        sched.set_begin_index(0)
        own = torch.tensor([_ve(denoiser.schedule, float(v)) for v in sched.sigmas], dtype=torch.float64)
        if not torch.allclose(own, sigmas.double().cpu(), rtol=1e-5, atol=0):
            raise DistillError(f"{name} samples on its scheduler's own grid; pass "
                               f"distill.samplers.scheduler_sigmas(denoiser, {name!r}, {steps}).")
        schedule = denoiser.schedule
        z = x * schedule.c_in(own[:1]).item()  # the solver's native state (VP x_t, or the flow's x_t)
        for i, t in enumerate(sched.timesteps):
            # the network sees the solver's state at the solver's timestep (diffusers rounds some to integers,
            # off its own sigma: the same quirk, reproduced); the solver converts the native output itself
            s = schedule.sigma_of(t.double()).reshape(1)
            x_ve = z / schedule.c_in(s).item()
            x0 = _d(denoiser, x_ve, s[0], cond)
            native = schedule.from_x0(x0, x_ve, s.expand(len(x0)), denoiser.prediction_type)
            z = sched.step(native, t, z, return_dict=False)[0]
            if callback is not None:
                callback({"i": i, "x": z, "sigma": own[i], "sigma_next": own[i + 1], "denoised": x0})
        return z

    sample.__name__ = f"sample_{name}"
    sample.__doc__ = (f"The stock diffusers {SCHEDULER_SAMPLERS[name][0]} ({name}) on the denoiser's schedule; one "
                      "denoiser call per step. ``sigmas`` must be its grid (:func:`scheduler_sigmas`).")
    return _register(torch.no_grad()(sample))


sample_dpmpp_2m = _stock_solver("dpmpp_2m")
sample_dpmpp_2m_karras = _stock_solver("dpmpp_2m_karras")
sample_unipc = _stock_solver("unipc")


def nfe(sampler: str, num_steps: int) -> int:
    """Denoiser evaluations a sampler makes for ``num_steps`` steps ending at sigma 0."""
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise DistillError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(SAMPLERS))}.")
    return SAMPLERS[name]
