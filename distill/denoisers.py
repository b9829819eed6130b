"""The one denoiser convention, and the adapters that bring diffusers models into it.

Every network inside distill is called as ``D(x, sigma, **cond) -> x0_hat`` where ``x`` (B, C, H, W) is
``x0 + sigma * eps`` (variance-exploding, Karras et al. 2022) and ``sigma`` is a tensor of shape (B,).
Samplers and methods only see this call. A model's native parameterization (eps / v / sample prediction,
discrete DDPM timesteps, VP input scaling) is handled here, at the edge, and nowhere else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from distill.errors import DistillError
from distill.schedules import DiscreteVPSchedule, vp_alpha, vp_sigma

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sigma of shape (B,) or () -> (B, 1, 1, ...) in x's dtype, for elementwise math with x."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def x0_from_prediction(pred: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 estimate from a native model output.

    ``x`` is the VE input ``x0 + sigma * eps``; in VP terms ``x_t = alpha_t x`` with ``alpha_t = 1/sqrt(1+sigma^2)``.
    epsilon: ``x0 = x - sigma * eps``; v (Salimans & Ho 2022, ``v = alpha_t eps - sigma_t x0``):
    ``x0 = alpha_t x_t - sigma_t v``; sample: ``x0 = pred``.
    """
    s = _bcast(sigma, x)
    if prediction_type == "epsilon":
        return x - s * pred
    if prediction_type == "v_prediction":
        a, st = vp_alpha(s), vp_sigma(s)
        return a * (a * x) - st * pred
    if prediction_type == "sample":
        return pred
    raise DistillError(_bad_prediction_type(prediction_type))


def prediction_from_x0(x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Inverse of :func:`x0_from_prediction`: the native output that yields ``x0`` at input ``x``, ``sigma > 0``."""
    s = _bcast(sigma, x)
    eps = (x - x0) / s
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return vp_alpha(s) * eps - vp_sigma(s) * x0
    if prediction_type == "sample":
        return x0
    raise DistillError(_bad_prediction_type(prediction_type))


def _bad_prediction_type(prediction_type: str) -> str:
    return (
        f"prediction_type {prediction_type!r} is not supported; distill adapts "
        f"{', '.join(PREDICTION_TYPES)} (set it in the scheduler config)."
    )


def check_scheduler_config(config: Mapping[str, Any]) -> None:
    """Refuse a scheduler config distill cannot adapt, before any weights are loaded."""
    from distill.schedules import BETA_SCHEDULES

    pred = config.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise DistillError(_bad_prediction_type(pred))
    unsupported = {
        "rescale_betas_zero_snr": (True, "zero-terminal-SNR rescaling"),
        "thresholding": (True, "dynamic thresholding"),
    }
    for key, (bad, what) in unsupported.items():
        if config.get(key) == bad:
            raise DistillError(f"scheduler config sets {key}: {bad} ({what}), which distill does not adapt; "
                               "set it to false or use a teacher without it.")
    if str(config.get("variance_type", "fixed_small")).startswith("learned"):
        raise DistillError("scheduler config has a learned variance (variance_type: learned*): the UNet outputs "
                           "2x channels, which distill does not adapt; use a fixed-variance teacher.")
    beta = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is None and beta not in BETA_SCHEDULES:
        raise DistillError(
            f"beta_schedule {beta!r} is not supported; distill adapts {', '.join(BETA_SCHEDULES)} "
            "(or explicit trained_betas)."
        )


class DiffusersDenoiser(nn.Module):
    """A diffusers UNet (``UNet2DModel`` or ``UNet2DConditionModel``) + DDPM-family schedule as ``D(x, sigma)``.

    ``forward(x, sigma, **cond)``: x (B, C, H, W) VE-noised, sigma (B,) or () -> x0_hat (B, C, H, W).
    The UNet sees ``x_t = x / sqrt(1 + sigma^2)`` at the (fractional) timestep whose noise level is sigma,
    and ``cond`` is passed through (``class_labels=...``, ``encoder_hidden_states=...``).
    """

    def __init__(self, unet: nn.Module, scheduler_config: Mapping[str, Any]) -> None:
        super().__init__()
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)
        check_scheduler_config(self.scheduler_config)
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        self.schedule = DiscreteVPSchedule.from_config(self.scheduler_config)

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        t = self.schedule.sigma_to_t(sigma).to(torch.float32)
        x_t = x * _bcast(vp_alpha(sigma.double()), x)
        out = self.unet(x_t, t, **cond, return_dict=False)[0]
        return x0_from_prediction(out, x, sigma.double(), self.prediction_type)


class ConsistencyDenoiser(nn.Module):
    """A consistency function ``f(x, sigma) = c_skip(sigma) alpha(sigma) x + c_out(sigma) F(x, sigma)`` around a
    denoiser F, exactly as diffusers' ``LCMScheduler`` computes it when it samples the exported student.

    The boundary scalings are those of latent consistency models (Luo et al. 2023), in the teacher's timestep
    units ``t(sigma)``::

        c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2),    c_out = s t / sqrt((s t)^2 + sigma_data^2)

    with ``s = timestep_scaling``; LCM applies ``c_skip`` to the VP sample ``x_t = alpha(sigma) x``, with
    ``alpha = 1 / sqrt(1 + sigma^2)``, so distill does too. At the schedule's smallest noise level ``sigma_min``
    (``t = 0``) ``c_skip = 1`` and ``c_out = 0``: ``f(x, sigma_min) = x_t``, the boundary condition of Song et
    al. 2023 in VP units (``alpha(sigma_min) x``; 1.8e-5 from ``x`` for the digits teacher). Applying ``c_skip``
    to ``x`` instead would differ from the stock pipeline by ``c_skip (1 - alpha) x``, up to 2e-4 at the cosine
    schedule's top timestep, where ``x`` is 2e4 times the unit noise. With ``s = 10`` the network's own
    estimate dominates from ``t = 1`` on, so a student initialised from its teacher starts as (almost exactly)
    the teacher's one-step denoiser.
    """

    def __init__(self, inner: DiffusersDenoiser, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> None:
        super().__init__()
        if not isinstance(inner, DiffusersDenoiser):
            raise DistillError(f"a consistency student wraps a diffusers denoiser, got {type(inner).__name__}.")
        self.inner = inner
        self.timestep_scaling = float(timestep_scaling)
        self.sigma_data = float(sigma_data)

    @property
    def schedule(self) -> DiscreteVPSchedule:
        return self.inner.schedule

    @property
    def unet(self) -> nn.Module:
        """The diffusers UNet inside (its config gives channels and resolution)."""
        return self.inner.unet

    @property
    def sigma_min(self) -> float:
        return self.inner.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.inner.sigma_max

    @property
    def prediction_type(self) -> str:
        return self.inner.prediction_type

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out)`` of shape (B,), float64, for noise levels ``sigma`` (B,)."""
        st = self.schedule.sigma_to_t(torch.as_tensor(sigma)) * self.timestep_scaling
        sd2 = self.sigma_data**2
        return sd2 / (st**2 + sd2), st / (st**2 + sd2).sqrt()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out = self.scalings(sigma)
        skip = _bcast(c_skip * vp_alpha(sigma.double()), x)
        return skip * x + _bcast(c_out, x) * self.inner(x, sigma, **cond)


def lcm_timesteps(num_train_timesteps: int, original_steps: int, steps: int) -> list[int]:
    """The teacher timesteps diffusers' ``LCMScheduler`` samples ``steps`` steps at, picked from its
    ``original_steps``-point grid: the grid an exported consistency student is sampled on, in stock diffusers
    and in distill alike."""
    from diffusers import LCMScheduler

    sched = LCMScheduler(num_train_timesteps=num_train_timesteps, original_inference_steps=original_steps)
    sched.set_timesteps(steps)
    return sched.timesteps.tolist()


def lcm_sigmas(schedule: DiscreteVPSchedule, original_steps: int, steps: int) -> list[float]:
    """Descending sigma grid of :func:`lcm_timesteps`: ``steps`` noise levels, then 0."""
    t = torch.tensor(lcm_timesteps(schedule.num_train_timesteps, original_steps, steps))
    return schedule.sigmas[t].tolist() + [0.0]


# ---------------------------------------------------------------------------------------------- loading


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local folder for ``name_or_path``: the folder itself, or a hub snapshot when online.

    Raises a one-sentence :class:`DistillError` for a missing folder, or a hub id while offline.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DistillError(f"{path} is a file; give the model's folder (a diffusers pipeline or UNet folder).")
        return path
    name = str(name_or_path)
    if not _looks_like_hub_id(name):
        raise DistillError(f"model folder {name} does not exist; give a diffusers pipeline folder or a hub id.")
    if _hub_offline():
        raise DistillError(
            f"{name} is not a local folder and the Hugging Face hub is offline (HF_HUB_OFFLINE=1); "
            "download it on a connected machine with `huggingface-cli download "
            f"{name} --local-dir DIR` and pass DIR instead."
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as exc:  # any hub failure is one sentence for the user
        raise DistillError(
            f"could not download {name} from the Hugging Face hub ({type(exc).__name__}); check the id and the "
            "network, or download it elsewhere and pass the local folder."
        ) from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DistillError(f"cannot read {path}: {exc}; the model folder is damaged or incomplete.") from exc


def load_unet(folder: Path) -> nn.Module:
    """Load a diffusers UNet from ``folder`` (holding ``config.json``); safetensors weights only."""
    import diffusers

    config = _read_json(folder / "config.json")
    cls_name = config.get("_class_name", "UNet2DModel")
    if cls_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise DistillError(
            f"{folder} holds a {cls_name}; distill adapts UNet2DModel and UNet2DConditionModel teachers."
        )
    if not any(folder.glob("*.safetensors")):
        raise DistillError(
            f"{folder} has no .safetensors weights; distill never unpickles .bin/.pt files. Convert them with "
            "`model.save_pretrained(folder, safe_serialization=True)` on a machine you trust."
        )
    try:
        return getattr(diffusers, cls_name).from_pretrained(folder, use_safetensors=True)
    except Exception as exc:
        raise DistillError(f"cannot load the UNet in {folder}: {exc}") from exc


def load_denoiser(name_or_path: str | os.PathLike) -> DiffusersDenoiser | ConsistencyDenoiser:
    """Load a teacher or student as a :class:`DiffusersDenoiser` (a :class:`ConsistencyDenoiser` around one when
    the folder's scheduler is an ``LCMScheduler``: a consistency student).

    Accepts a diffusers pipeline folder (``model_index.json`` with ``unet/`` and ``scheduler/``), a folder
    holding ``unet/`` and ``scheduler/`` without a model index, or a hub id when online.
    """
    root = resolve_model_path(name_or_path)
    unet_dir, sched_dir = root / "unet", root / "scheduler"
    if not unet_dir.is_dir() or not (sched_dir / "scheduler_config.json").is_file():
        raise DistillError(
            f"{root} is not a diffusers pipeline folder: it needs unet/ and scheduler/scheduler_config.json "
            "(save one with `pipeline.save_pretrained(folder)`)."
        )
    sched = _read_json(sched_dir / "scheduler_config.json")
    check_scheduler_config(sched)
    unet = load_unet(unet_dir)
    denoiser = DiffusersDenoiser(unet, sched)
    if sched.get("_class_name") == "LCMScheduler":
        # a consistency student: diffusers' LCMScheduler applies the boundary scalings, so distill does too
        return ConsistencyDenoiser(denoiser, sched.get("timestep_scaling", 10.0))
    return denoiser
