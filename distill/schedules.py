"""Noise schedules: one protocol, three kinds, every noise level a variance-exploding sigma.

Inside distill a noise level is the VE sigma of Karras et al. 2022 (EDM): ``x = x0 + sigma * eps``. A teacher's
native process, the network input it expects and the timestep it is told are the schedule's business:

| kind | diffusers schedulers | native state | VE sigma | network input | network timestep |
|---|---|---|---|---|---|
| ``vp`` | DDPM, DDIM, Euler, LCM, DPM-Solver, UniPC, TCD, ... | ``alpha_t x0 + sigma_t eps`` | ``sigma_t / alpha_t`` | ``alpha_t x`` | fractional ``t`` of ``alphas_cumprod`` |
| ``flow`` | FlowMatchEulerDiscrete, FlowMatchLCM (SD3, rectified flow) | ``(1 - t) x0 + t eps`` | ``t / (1 - t)`` | ``(1 - t) x`` | ``t * T`` |
| ``edm`` | EDMEuler, EDMDPMSolverMultistep (continuous VE) | ``x0 + sigma eps`` | ``sigma`` | ``x / sqrt(sigma^2 + sigma_data^2)`` | ``ln(sigma) / 4`` |

with ``alpha_t = 1 / sqrt(1 + sigma^2)`` for VP. Each schedule is built from the teacher's own diffusers scheduler
object (:func:`schedule_from_config`), so sigmoid or trained betas, zero-terminal-SNR rescaling and a flow model's
``shift`` come from diffusers itself, with no hand-copied beta formulas.

**sigma = inf.** A flow teacher's ``t = 1`` is pure noise, ``sigma = t / (1 - t) = inf``. A state at ``sigma = inf``
is carried as its limit ``x / sigma = eps``, the unit noise; :func:`add_noise`, :func:`noise_estimate` and
:func:`over_sigma` implement that, so samplers and methods can start from, and train at, ``sigma = inf``
without special cases of their own.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch

from distill.errors import DistillError
from distill.tensors import per_row

SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


# ---------------------------------------------------------------------------------------------- VP <-> VE


def vp_alpha(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """VP signal scale ``alpha_t = 1 / sqrt(1 + sigma^2)`` for a VE ``sigma`` (0 at ``sigma = inf``)."""
    if isinstance(sigma, torch.Tensor):
        return (1.0 + sigma**2).rsqrt()
    return 1.0 / math.sqrt(1.0 + sigma**2)


def vp_sigma(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """VP noise scale ``sigma_t = sigma / sqrt(1 + sigma^2)`` for a VE ``sigma``."""
    if isinstance(sigma, torch.Tensor):
        return sigma * (1.0 + sigma**2).rsqrt()
    return sigma / math.sqrt(1.0 + sigma**2)


def ve_sigma(alphas_cumprod: torch.Tensor | float) -> torch.Tensor | float:
    """VE ``sigma = sqrt((1 - abar) / abar)`` for a VP ``alphas_cumprod`` value ``abar``."""
    if isinstance(alphas_cumprod, torch.Tensor):
        return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
    return math.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


# ---------------------------------------------------------------------------------------------- sigma = inf


def _where_inf(sigma: torch.Tensor | float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, inf)``: sigma as (B, 1, ...) in x's dtype with inf rows replaced by 0, and the inf mask. No branch on
    the mask's values: these helpers never wait for the device (the finite rows compute exactly the plain formula)."""
    s = per_row(sigma, x)
    inf = torch.isinf(s)
    return torch.where(inf, torch.zeros_like(s), s), inf


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x0 + sigma * noise`` (B, ...); rows at ``sigma = inf`` are the unit noise itself (the module convention)."""
    s, inf = _where_inf(sigma, x0)
    return torch.where(inf, noise, x0 + s * noise)


def scale_noise(noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The starting state at noise level ``sigma`` for unit noise: ``sigma * noise``, or ``noise`` at inf."""
    s, inf = _where_inf(sigma, noise)
    return torch.where(inf, noise, s * noise)


def over_sigma(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x / sigma``; at ``sigma = inf`` the state already holds that limit (the unit noise), so ``x``."""
    s, inf = _where_inf(sigma, x)
    return torch.where(inf, x, x / torch.where(inf, torch.ones_like(s), s))


def noise_estimate(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``eps_hat = (x - x0) / sigma``, the noise a denoiser's estimate implies; ``x`` itself at ``sigma = inf``."""
    s, inf = _where_inf(sigma, x)
    return torch.where(inf, x, (x - x0) / torch.where(inf, torch.ones_like(s), s))


def rescale(x: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """``(sigma_to / sigma) x`` for (B,) noise levels; ``sigma_to x`` where ``sigma = inf`` (``x`` the unit noise)."""
    inf = torch.isinf(per_row(sigma, x))
    return torch.where(inf, per_row(sigma_to, x) * x, per_row(sigma_to / sigma, x) * x)


def ddim_step(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM step (= Euler on the PF-ODE) from ``sigma`` to ``sigma_to`` (B,):
    ``x0 + (sigma_to / sigma)(x - x0)``; from ``sigma = inf``, where ``x`` is the unit noise, ``x0 + sigma_to x``."""
    inf = torch.isinf(per_row(sigma, x))
    return torch.where(inf, x0 + per_row(sigma_to, x) * x, x0 + per_row(sigma_to / sigma, x) * (x - x0))


# ---------------------------------------------------------------------------------------------- the protocol


class NoiseSchedule(abc.ABC):
    """A teacher's noise levels and how its network sees them.

    ``sigmas`` (T,) float64, ascending: the teacher's training noise levels (its discrete timesteps for VP and
    flow, a dense grid for EDM). ``config`` is the diffusers scheduler config it was built from.
    """

    kind: ClassVar[str]
    prediction_types: ClassVar[tuple[str, ...]]
    config: dict[str, Any]
    sigmas: torch.Tensor
    final_sigma: float = 0.0  # noise level after a sampler's last step (0, unless a DDIM config says otherwise)

    def __init__(self) -> None:
        self._device_cache: dict[tuple[str, str], torch.Tensor] = {}

    # -- tensors on the model's device, copied once (not on every denoiser call)
    def on(self, name: str, device: torch.device | str) -> torch.Tensor:
        """The float64 tensor attribute ``name`` on ``device``, cached."""
        key = (name, str(device))
        t = self._device_cache.get(key)
        if t is None:
            t = getattr(self, name).to(device)
            self._device_cache[key] = t
        return t

    @property
    def num_train_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @property
    def sigma_max_finite(self) -> float:
        """The largest finite training noise level (``sigma_max`` unless that is inf)."""
        finite = self.sigmas[torch.isfinite(self.sigmas)]
        return float(finite[-1])

    @abc.abstractmethod
    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        """Network input scale (B,) float64 for noise levels (B,): the network sees ``c_in * x``."""

    @abc.abstractmethod
    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's native timestep (B,) float32 for noise levels (B,)."""

    @abc.abstractmethod
    def sigma_of(self, timestep: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`timestep`: the noise level (float64) a network timestep stands for."""

    @abc.abstractmethod
    def to_x0(self, pred: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """x0 estimate from a native network output ``pred`` at VE input ``x``, noise level ``sigma`` (B,)."""

    @abc.abstractmethod
    def from_x0(self, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """Inverse of :meth:`to_x0`: the native output that yields ``x0`` (finite ``sigma > 0``)."""

    @abc.abstractmethod
    def grid(self, num_steps: int, spacing: str = "trailing") -> torch.Tensor:
        """Descending sampling grid ``(num_steps + 1,)`` float64 of the teacher's scheduler, ending at
        ``final_sigma``."""

    def check_prediction_type(self, prediction_type: str) -> None:
        if prediction_type not in self.prediction_types:
            raise DistillError(
                f"prediction_type {prediction_type!r} does not go with a {self.kind} schedule "
                f"({type(self).__name__}); it takes {', '.join(self.prediction_types)}."
            )
        if prediction_type == "epsilon" and math.isinf(self.sigma_max):
            raise DistillError(
                f"an epsilon-prediction network has no x0 estimate at this {self.kind} schedule's top level, pure noise "
                "(sigma = inf: zero terminal SNR, or a flow's t = 1); use v_prediction (or flow) for such a schedule."
            )

    def describe(self) -> str:
        return f"{self.kind} ({self.config.get('_class_name', 'scheduler')}, {self.num_train_timesteps} levels)"


# ---------------------------------------------------------------------------------------------- discrete VP


def discrete_timesteps(
    num_steps: int, num_train_timesteps: int, spacing: str = "trailing", steps_offset: int = 0
) -> np.ndarray:
    """Descending integer timesteps for ``num_steps`` sampling steps, as diffusers' DDIM/DDPM schedulers space them.

    ``leading``: ``t = k * (T // n) + offset`` (DDIM paper); ``trailing``: ``t = round(T - k * T / n) - 1``
    (Lin et al. 2024, starts at the last timestep); ``linspace``: ``round(linspace(0, T - 1, n))``.
    """
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise DistillError(
            f"cannot take {num_steps} steps on a {num_train_timesteps}-timestep schedule; "
            f"choose 1 <= steps <= {num_train_timesteps}."
        )
    T = num_train_timesteps
    if spacing == "leading":
        ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        # not np.arange(T, 0, -T / n): its float step overshoots for 62 values of n at T = 1000 (n = 61, ...)
        # and yields n + 1 timesteps ending in -1; diffusers has that bug, distill does not copy it.
        ts = np.round(T - np.arange(num_steps) * T / num_steps) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()[::-1]
    else:
        raise DistillError(f"timestep spacing {spacing!r} is unknown; use one of {', '.join(SPACINGS)}.")
    ts = ts.astype(np.int64).copy()
    assert len(ts) == num_steps and ts.min() >= 0 and ts.max() < T, (spacing, num_steps, ts)
    return ts


def _scheduler_object(config: Mapping[str, Any], default: str) -> Any:
    """The diffusers scheduler the config names (``_class_name``), built from the config itself."""
    import diffusers

    name = config.get("_class_name") or default
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise DistillError(f"scheduler class {name!r} is not in diffusers {diffusers.__version__}; "
                           "save the teacher with a diffusers scheduler.")
    try:
        return cls.from_config(dict(config))
    except Exception as exc:  # diffusers' own validation of the config
        raise DistillError(f"diffusers cannot build {name} from the teacher's scheduler config: {exc}") from exc


def vp_to_x0(pred: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 from a VP network's output at VE input ``x``: epsilon: ``x0 = x - sigma eps``; v (Salimans & Ho 2022,
    ``v = alpha_t eps - sigma_t x0``): ``x0 = alpha_t x_t - sigma_t v``; sample: ``x0 = pred``. At ``sigma = inf``
    (zero terminal SNR) v gives ``-v``; epsilon has no estimate there."""
    s = per_row(sigma, x)
    if prediction_type == "epsilon":  # (no estimate at sigma = inf: refused where the denoiser is built)
        return x - s * pred
    if prediction_type == "v_prediction":
        a, st = vp_alpha(s), vp_sigma(s)
        return torch.where(torch.isinf(s), -pred, a * (a * x) - st * pred)
    if prediction_type == "sample":
        return pred
    raise DistillError(_bad_prediction_type(prediction_type))


def vp_from_x0(x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Inverse of :func:`vp_to_x0`: the native output that yields ``x0`` at input ``x``, ``0 < sigma < inf``."""
    s = per_row(sigma, x)
    eps = (x - x0) / s
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return vp_alpha(s) * eps - vp_sigma(s) * x0
    if prediction_type == "sample":
        return x0
    raise DistillError(_bad_prediction_type(prediction_type))


class DiscreteVPSchedule(NoiseSchedule):
    """A DDPM-family schedule seen in VE sigmas.

    ``sigmas[t]`` (float64, ``(T,)``, ascending) is the VE noise level of discrete timestep ``t``, derived from the
    float32 ``alphas_cumprod`` of the diffusers scheduler object exactly as diffusers derives it. Between integer
    timesteps ``t <-> sigma`` is piecewise linear in sigma, as diffusers' ``EulerDiscreteScheduler`` interpolates.
    """

    kind = "vp"
    prediction_types = ("epsilon", "v_prediction", "sample")

    def __init__(self, alphas_cumprod: torch.Tensor, steps_offset: int = 0, final_sigma: float = 0.0,
                 config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.alphas_cumprod = alphas_cumprod  # (T,) float32, as diffusers holds it
        self.sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).double()  # float32 like diffusers, widened
        self.steps_offset = steps_offset
        self.final_sigma = final_sigma
        self.config = dict(config or {})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DiscreteVPSchedule":
        """From a diffusers scheduler config (``scheduler_config.json`` of DDPM/DDIM/Euler/LCM/...): the
        ``alphas_cumprod`` of the scheduler object diffusers builds from it."""
        config = dict(config)
        sched = _scheduler_object(config, "DDPMScheduler")
        acp = getattr(sched, "alphas_cumprod", None)
        if acp is None:
            raise DistillError(f"{type(sched).__name__} has no alphas_cumprod; it is not a discrete VP scheduler.")
        out = cls(torch.as_tensor(acp, dtype=torch.float32).clone(), int(config.get("steps_offset", 0)), 0.0, config)
        if not config.get("set_alpha_to_one", True):  # DDIM's last step lands on timestep 0's level, not on 0
            out.final_sigma = float(out.sigmas[0])
        return out

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma of (possibly fractional) timesteps ``t``, linear in sigma between integers. Returns float64."""
        t = t.double().clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - lo
        s = self.on("sigmas", t.device)
        return (1 - w) * s[lo] + w * s[lo + 1]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`t_to_sigma` (float64); sigmas outside the schedule clamp to its ends (a zero-terminal-SNR
        schedule's last level is inf: its timestep is T - 1)."""
        sigma = torch.as_tensor(sigma)
        s = self.on("sigmas", sigma.device)
        sigma = sigma.double().clamp(s[0], s[-1])
        hi = torch.searchsorted(s, sigma).clamp(1, self.num_train_timesteps - 1)
        lo = hi - 1
        w = (sigma - s[lo]) / (s[hi] - s[lo])
        t = lo.double() + w
        if bool(torch.isinf(self.sigmas[-1])):  # read on the host copy: no wait for the device
            t = torch.where(torch.isinf(sigma), torch.full_like(t, self.num_train_timesteps - 1),
                            torch.where(torch.isinf(s[hi]), lo.double(), t))
        return t

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        # alpha_t, and 1 at sigma = inf, where the state is the unit noise and x_t = eps
        sigma = torch.as_tensor(sigma).double()
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), vp_alpha(sigma))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.sigma_to_t(sigma).to(torch.float32)

    def sigma_of(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.t_to_sigma(torch.as_tensor(timestep))

    def to_x0(self, pred: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
        return vp_to_x0(pred, x, sigma, prediction_type)

    def from_x0(self, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
        return vp_from_x0(x0, x, sigma, prediction_type)

    def timesteps(self, num_steps: int, spacing: str = "trailing") -> np.ndarray:
        return discrete_timesteps(num_steps, self.num_train_timesteps, spacing, self.steps_offset)

    def grid(self, num_steps: int, spacing: str = "trailing") -> torch.Tensor:
        """The teacher's timesteps for ``num_steps`` steps (diffusers' spacing), then ``final_sigma``."""
        ts = torch.from_numpy(self.timesteps(num_steps, spacing))
        return torch.cat([self.sigmas[ts], torch.tensor([self.final_sigma], dtype=torch.float64)])


# ---------------------------------------------------------------------------------------------- rectified flow


class FlowMatchSchedule(NoiseSchedule):
    """Rectified flow / flow matching (SD3): ``x_t = (1 - t) x0 + t eps``, so ``sigma = t / (1 - t)``.

    The training levels are ``FlowMatchEulerDiscreteScheduler``'s own (its ``shift`` applied by diffusers), from
    ``t = 1`` (``sigma = inf``) down; the network sees ``x_t = (1 - t) x`` at timestep ``t * T`` and predicts the
    velocity ``v = eps - x0`` (prediction type ``flow``), so ``x0 = x_t - t v``.
    """

    kind = "flow"
    prediction_types = ("flow", "epsilon", "sample")

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        if self.config.get("use_dynamic_shifting"):
            raise DistillError("the teacher's flow scheduler uses resolution-dependent shifting "
                               "(use_dynamic_shifting: true, as Flux does), which needs the image size at every "
                               "call; distill adapts a fixed shift (SD3). Set use_dynamic_shifting: false and shift.")
        if self.config.get("invert_sigmas"):
            raise DistillError("the teacher's flow scheduler inverts its sigmas (invert_sigmas: true); distill "
                               "adapts t = 1 as noise, t = 0 as data.")
        self._sched = _scheduler_object(self.config, "FlowMatchEulerDiscreteScheduler")
        self.T = int(self.config.get("num_train_timesteps", 1000))
        t = self._sched.sigmas.double().flip(0)  # ascending native t, float32 as diffusers holds them
        self.t = t
        self.sigmas = self.t_to_sigma(t)

    @staticmethod
    def t_to_sigma(t: torch.Tensor) -> torch.Tensor:
        """VE ``sigma = t / (1 - t)`` (float64; inf at ``t = 1``)."""
        t = t.double()
        return t / (1 - t)

    @staticmethod
    def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
        """Native ``t = sigma / (1 + sigma)``, written ``1 / (1 + 1 / sigma)`` so ``sigma = inf`` gives 1 (float64)."""
        sigma = torch.as_tensor(sigma).double()
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        # 1 - t; at sigma = inf the state already is x_t = eps (the module's convention), so 1 there
        sigma = torch.as_tensor(sigma).double()
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), 1 - self.sigma_to_t(sigma))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return (self.sigma_to_t(sigma) * self.T).to(torch.float32)

    def sigma_of(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.t_to_sigma(torch.as_tensor(timestep).double() / self.T)

    def _in(self, sigma: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = torch.as_tensor(sigma, device=x.device).double()
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        t = self.sigma_to_t(sigma)
        c = torch.where(torch.isinf(sigma), torch.ones_like(t), 1 - t)
        return per_row(t, x), per_row(c, x)

    def to_x0(self, pred: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """flow: ``x0 = x_t - t v``; epsilon: ``x0 = (x_t - t eps) / (1 - t)``; sample: ``pred``."""
        t, c = self._in(sigma, x)
        x_t = c * x
        if prediction_type == "flow":
            return x_t - t * pred
        if prediction_type == "epsilon":  # (no estimate at t = 1: refused where the denoiser is built)
            return (x_t - t * pred) / (1 - t)
        if prediction_type == "sample":
            return pred
        raise DistillError(_bad_prediction_type(prediction_type, self))

    def from_x0(self, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
        t, c = self._in(sigma, x)
        x_t = c * x
        eps = (x_t - (1 - t) * x0) / t
        if prediction_type == "flow":
            return eps - x0
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        raise DistillError(_bad_prediction_type(prediction_type, self))

    def grid(self, num_steps: int, spacing: str = "trailing") -> torch.Tensor:
        """``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps)``'s grid (starting at ``t = 1``, sigma inf),
        then 0. A flow schedule has one grid: ``spacing`` is not used."""
        if num_steps < 1:
            raise DistillError(f"cannot take {num_steps} steps; choose steps >= 1.")
        self._sched.set_timesteps(num_steps)
        t = self._sched.sigmas.double()  # (n + 1,) descending native t, ending at 0
        return self.t_to_sigma(t)


    def grid_from(self, sigmas: list[float]) -> torch.Tensor:
        """The grid the stock scheduler makes from unshifted ``sigmas`` (its ``set_timesteps(sigmas=...)``, which a
        stock pipeline's ``sigmas=`` argument reaches): shifted, then 0 appended; as VE sigmas."""
        self._sched.set_timesteps(sigmas=list(sigmas))
        return self.t_to_sigma(self._sched.sigmas.double())

    @staticmethod
    def uniform(num_steps: int) -> list[float]:
        """Unshifted ``t`` uniform from 1 in ``num_steps`` steps (``1 - i / n``): nested, as halving grids must be."""
        return [1 - i / num_steps for i in range(num_steps)]


# ---------------------------------------------------------------------------------------------- continuous EDM


class EDMSchedule(NoiseSchedule):
    """Continuous VE with EDM's preconditioning (Karras et al. 2022, Table 1), as diffusers' ``EDMEulerScheduler``:
    the network ``F`` sees ``c_in x`` at ``c_noise = ln(sigma) / 4`` and ``x0 = c_skip x + c_out F`` with
    ``c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)`` and ``c_out = +- sigma sigma_data / sqrt(sigma^2 +
    sigma_data^2)`` (minus for ``v_prediction``)."""

    kind = "edm"
    prediction_types = ("epsilon", "v_prediction")

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        self._sched = _scheduler_object(self.config, "EDMEulerScheduler")
        self.sigma_data = float(self.config.get("sigma_data", 0.5))
        self.sigmas = self._sched.sigmas[:-1].double().flip(0)  # ascending training levels
        self.final_sigma = float(self._sched.sigmas[-1])

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma).double()
        return (sigma**2 + self.sigma_data**2).rsqrt()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return (0.25 * torch.as_tensor(sigma).double().log()).to(torch.float32)

    def sigma_of(self, timestep: torch.Tensor) -> torch.Tensor:
        return (4 * torch.as_tensor(timestep).double()).exp()

    def _scalings(self, sigma: torch.Tensor, x: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        if prediction_type not in self.prediction_types:
            raise DistillError(_bad_prediction_type(prediction_type, self))
        s = torch.as_tensor(sigma, device=x.device).double()
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        if prediction_type == "v_prediction":
            c_out = -c_out
        return per_row(c_skip, x), per_row(c_out, x)

    def to_x0(self, pred: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
        c_skip, c_out = self._scalings(sigma, x, prediction_type)
        return c_skip * x + c_out * pred

    def from_x0(self, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
        c_skip, c_out = self._scalings(sigma, x, prediction_type)
        return (x0 - c_skip * x) / c_out

    def grid(self, num_steps: int, spacing: str = "trailing") -> torch.Tensor:
        """``EDMEulerScheduler.set_timesteps(num_steps)``'s grid; ``spacing`` is not used."""
        if num_steps < 1:
            raise DistillError(f"cannot take {num_steps} steps; choose steps >= 1.")
        self._sched.set_timesteps(num_steps)
        return self._sched.sigmas.double()


# ---------------------------------------------------------------------------------------------- choosing


def _bad_prediction_type(prediction_type: str, schedule: NoiseSchedule | None = None) -> str:
    allowed = schedule.prediction_types if schedule is not None else PREDICTION_TYPES
    return (f"prediction_type {prediction_type!r} is not supported here; distill adapts {', '.join(allowed)} "
            "(set it in the scheduler config).")


SCHEDULE_KINDS: dict[str, Callable[[Mapping[str, Any]], NoiseSchedule]] = {
    "vp": DiscreteVPSchedule.from_config,
    "flow": FlowMatchSchedule,
    "edm": EDMSchedule,
}


def schedule_kind(config: Mapping[str, Any]) -> str:
    """``vp``, ``flow`` or ``edm`` for a diffusers scheduler config, by its class."""
    name = str(config.get("_class_name") or "DDPMScheduler")
    if name.startswith("FlowMatch"):
        return "flow"
    if name.startswith("EDM"):
        return "edm"
    return "vp"


def schedule_from_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """The noise schedule of a diffusers scheduler config (``scheduler/scheduler_config.json``)."""
    return SCHEDULE_KINDS[schedule_kind(config)](config)


def default_prediction_type(config: Mapping[str, Any]) -> str:
    """The network's output type: the config's ``prediction_type``, or ``flow`` for flow-matching schedulers
    (which have none)."""
    if "prediction_type" in config and config["prediction_type"] is not None:
        return str(config["prediction_type"])
    return "flow" if schedule_kind(config) == "flow" else "epsilon"


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's grid (Karras et al. 2022, Eq. 5): ``(num_steps + 1,)`` float64, descending, ending in 0."""
    if num_steps < 1:
        raise DistillError(f"num_steps must be >= 1, got {num_steps}.")
    if not 0 < sigma_min < sigma_max or math.isinf(sigma_max):
        raise DistillError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
    i = torch.arange(num_steps, dtype=torch.float64)
    denom = max(num_steps - 1, 1)
    inv = sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1, dtype=torch.float64)])
