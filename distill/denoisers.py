"""The one denoiser convention, and the adapters that bring diffusers networks into it.

Every network inside distill is called as ``D(x, sigma, **cond) -> x0_hat``: ``x`` (B, ...) is ``x0 + sigma * eps``
(variance-exploding, Karras et al. 2022; any rank: images, latents, video latents), ``sigma`` a tensor of shape
(B,) (or a float). Samplers and methods only see this call. A network's native parameterization (eps / v / sample
/ flow-velocity prediction, discrete or continuous timesteps, VP / flow / EDM input scaling) is handled here, by
the network's :mod:`~distill.schedules` schedule, and nowhere else.

Conditioning travels as flat keyword tensors with one name each, whatever the network calls them:

| ``cond`` key | shape | what | network keyword |
|---|---|---|---|
| ``encoder_hidden_states`` | (B, L, D) | text encoder states | ``encoder_hidden_states`` |
| ``pooled`` | (B, P) | pooled text embedding | SD3 ``pooled_projections``; SDXL ``added_cond_kwargs["text_embeds"]`` |
| ``time_ids`` | (B, 6) | SDXL size / crop conditioning | ``added_cond_kwargs["time_ids"]`` |
| ``class_labels`` | (B,) | class index (DiT, class-conditional UNets) | ``class_labels`` |
| ``guidance`` | (B,) or float | guidance scale ``w`` of a guidance-embedded student | UNet ``timestep_cond``; transformers: see :mod:`distill.guidance` |

Networks are called by keyword (``sample=`` / ``hidden_states=``, ``timestep=``), so a transformer never receives
the timestep in its ``encoder_hidden_states`` slot.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from distill.errors import DistillError
from distill.schedules import (
    NoiseSchedule,
    default_prediction_type,
    schedule_from_config,
    schedule_kind,
    vp_from_x0,
    vp_to_x0,
)
from distill.tensors import per_row

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
COND_KEYS = ("encoder_hidden_states", "pooled", "time_ids", "class_labels", "guidance")


# ---------------------------------------------------------------------------------------------- VP helpers


def x0_from_prediction(pred: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 estimate from a VP network's native output (see :meth:`DiscreteVPSchedule.to_x0`)."""
    return vp_to_x0(pred, x, sigma, prediction_type)


def prediction_from_x0(x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Inverse of :func:`x0_from_prediction` (VP), ``sigma > 0``."""
    return vp_from_x0(x0, x, sigma, prediction_type)


def check_scheduler_config(config: Mapping[str, Any]) -> None:
    """Refuse a scheduler config distill cannot adapt, before any weights are loaded."""
    pred = default_prediction_type(config)
    kind = schedule_kind(config)
    allowed = {"vp": ("epsilon", "v_prediction", "sample"), "flow": ("flow", "epsilon", "sample"),
               "edm": ("epsilon", "v_prediction")}[kind]
    if pred not in allowed:
        raise DistillError(f"prediction_type {pred!r} is not supported for a {kind} scheduler "
                           f"({config.get('_class_name', 'DDPMScheduler')}); distill adapts {', '.join(allowed)} "
                           "(set it in the scheduler config).")
    if config.get("thresholding"):
        raise DistillError("scheduler config sets thresholding: true (dynamic thresholding, a sampling-time clamp); "
                           "distill's samplers do not apply it: set it to false or use a teacher without it.")


# ---------------------------------------------------------------------------------------------- networks


def _unet2d(cond: Mapping[str, Any]) -> dict[str, Any]:
    return {"class_labels": cond["class_labels"]} if "class_labels" in cond else {}


def _unet2d_condition(cond: Mapping[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {"encoder_hidden_states": cond.get("encoder_hidden_states")}
    if "class_labels" in cond:
        kw["class_labels"] = cond["class_labels"]
    if "pooled" in cond or "time_ids" in cond:
        kw["added_cond_kwargs"] = {"text_embeds": cond.get("pooled"), "time_ids": cond.get("time_ids")}
    return kw


def _unet3d_condition(cond: Mapping[str, Any]) -> dict[str, Any]:
    return {"encoder_hidden_states": cond.get("encoder_hidden_states")}


def _sd3(cond: Mapping[str, Any]) -> dict[str, Any]:
    return {"encoder_hidden_states": cond.get("encoder_hidden_states"), "pooled_projections": cond.get("pooled")}


def _dit(cond: Mapping[str, Any]) -> dict[str, Any]:
    return {"class_labels": cond.get("class_labels")}


@dataclass(frozen=True)
class NetworkSpec:
    """How a diffusers network class is called: the keyword of its noisy input, which ``cond`` keys it takes
    and needs, and how they become its keywords."""

    input: str
    takes: tuple[str, ...]
    needs: tuple[str, ...]
    kwargs: Callable[[Mapping[str, Any]], dict[str, Any]]
    dims: int = 2  # axes after the channels: 2 for images (H, W), 1 for audio (L), 3 for video (F, H, W)
    # a video network that takes clips of any length: its config fixes no frame count, and its sample_size is the
    # frames' (H, W) (UNet3DConditionModel: TextToVideoSDPipeline makes sample_size * vae_scale_factor pixels)
    any_frames: bool = False


# frames of a clip from a network that takes any number, where nothing else says how many: the stock
# TextToVideoSDPipeline's num_frames default
DEFAULT_FRAMES = 16

NETWORKS: dict[str, NetworkSpec] = {
    "UNet1DModel": NetworkSpec("sample", (), (), lambda cond: {}, dims=1),  # (B, C, L): audio-rank samples
    "UNet2DModel": NetworkSpec("sample", ("class_labels",), (), _unet2d),
    "UNet2DConditionModel": NetworkSpec("sample", ("encoder_hidden_states", "pooled", "time_ids", "class_labels"),
                                        ("encoder_hidden_states",), _unet2d_condition),
    # (B, C, F, H, W) video latents, natively: the network folds the frames into its batch itself
    "UNet3DConditionModel": NetworkSpec("sample", ("encoder_hidden_states",), ("encoder_hidden_states",),
                                        _unet3d_condition, dims=3, any_frames=True),
    "SD3Transformer2DModel": NetworkSpec("hidden_states", ("encoder_hidden_states", "pooled"),
                                         ("encoder_hidden_states", "pooled"), _sd3),
    "Transformer2DModel": NetworkSpec("hidden_states", ("class_labels",), ("class_labels",), _dit),
    "DiTTransformer2DModel": NetworkSpec("hidden_states", ("class_labels",), ("class_labels",), _dit),
}


def network_spec(net: nn.Module) -> NetworkSpec:
    name = type(net).__name__
    spec = NETWORKS.get(name)
    if spec is None:
        # anything else is called like a UNet (sample=, timestep=) with its cond passed through
        return NetworkSpec("sample", COND_KEYS, (), lambda cond: dict(cond))
    return spec


def sample_size(config: Mapping[str, Any], dims: int = 2) -> tuple[int, ...] | None:
    """A diffusers config's ``sample_size`` (an int, a list/tuple or null) as the ``dims`` sizes after the channels
    ((H, W) for an image network, (L,) for a 1-D one) or None: the one place it is normalised. An int is every
    axis's size; a list gives them in order (a 2-element list for a 2-D network, as diffusers writes (H, W))."""
    size = config.get("sample_size")
    if size is None:
        return None
    if isinstance(size, (list, tuple)):
        if len(size) == 1 or dims == 2 and len(size) > 2:
            return (int(size[0]),) * dims if len(size) == 1 else (int(size[0]), int(size[-1]))
        if len(size) != dims:
            raise DistillError(f"sample_size {list(size)} has {len(size)} sizes; this network takes {dims} axes "
                               "after the channels.")
        return tuple(int(s) for s in size)
    return (int(size),) * dims


def sample_dims(class_name: str, config: Mapping[str, Any]) -> int:
    """Axes after the channels of what a network of ``class_name`` denoises: its :class:`NetworkSpec`'s, or for a
    class distill does not list, as many as a list ``sample_size`` gives (else 2, an image)."""
    spec = NETWORKS.get(class_name)
    if spec is not None:
        return spec.dims
    size = config.get("sample_size")
    return len(size) if isinstance(size, (list, tuple)) and len(size) >= 1 else 2


def takes_any_frames(class_name: str) -> bool:
    """Whether a network of ``class_name`` denoises clips of any length (its config fixes no frame count)."""
    spec = NETWORKS.get(class_name)
    return spec is not None and spec.any_frames


def network_sizes(class_name: str, config: Mapping[str, Any], frames: int | None = None) -> tuple[int, ...] | None:
    """The sizes after the channels of what a network of ``class_name`` denoises, from its config (None without a
    ``sample_size``). For a network that takes clips of any length (:func:`takes_any_frames`) they are
    ``(frames, H, W)``: ``sample_size`` gives (H, W) and ``frames`` (default :data:`DEFAULT_FRAMES`) the length."""
    if not takes_any_frames(class_name):
        return sample_size(config, sample_dims(class_name, config))
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 3:
        raise DistillError(f"{class_name} takes clips of any length and its sample_size is the frames' (H, W), as "
                           f"the stock pipeline reads it; got {list(size)}. Set sample_size to the latent height "
                           "(an int) or [H, W].")
    hw = sample_size(config, 2)
    return None if hw is None else (int(frames or DEFAULT_FRAMES), *hw)


def network_shape(net: nn.Module, frames: int | None = None) -> tuple[int, ...]:
    """(C, *sizes) a network denoises, from its config: (C, H, W) for an image network, (C, L) for a 1-D one,
    (C, F, H, W) for a video one (``frames`` F, default :data:`DEFAULT_FRAMES`, where the network takes any)."""
    cfg = net.config
    sizes = network_sizes(type(net).__name__, cfg, frames)
    if sizes is None:
        raise DistillError(f"{type(net).__name__} has no sample_size in its config; set it to the latent/image size.")
    return int(cfg.in_channels), *sizes


def _cast(kw: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in (nested) keyword arguments to ``dtype``."""
    if isinstance(kw, torch.Tensor):
        return kw.to(dtype) if kw.is_floating_point() else kw
    if isinstance(kw, dict):
        return {k: _cast(v, dtype) for k, v in kw.items()}
    return kw


def guidance_scale_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of ``w`` (B,), scaled by 1000, as diffusers' ``get_guidance_scale_embedding``
    (Stable Diffusion and LCM pipelines, which pass ``guidance_scale - 1``)."""
    w = torch.as_tensor(w).reshape(-1) * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w.to(dtype)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def timestep_embedders(net: nn.Module) -> list[nn.Module]:
    """The modules whose output is a transformer's timestep embedding: SD3's ``time_text_embed.timestep_embedder``;
    in a DiT each block's ``norm1.emb.timestep_embedder`` and the output norm's."""
    from diffusers.models.embeddings import TimestepEmbedding

    found = [m for name, m in net.named_modules() if isinstance(m, TimestepEmbedding) and "timestep_embedder" in name]
    if not found:
        raise DistillError(f"{type(net).__name__} has no timestep embedder to add a guidance embedding to.")
    return found


class DiffusersDenoiser(nn.Module):
    """A diffusers network (UNet or transformer) + its noise schedule as ``D(x, sigma, **cond) -> x0_hat``.

    ``forward(x, sigma, **cond)``: x (B, ...) VE-noised, sigma (B,) or () -> x0_hat like x. The network sees
    ``c_in(sigma) x`` at its native timestep, by keyword; ``cond`` uses the keys in the module table.
    ``source`` is the pipeline folder the network came from: an export keeps that pipeline's other components.
    """

    def __init__(self, net: nn.Module, scheduler_config: Mapping[str, Any], *, prediction_type: str | None = None,
                 source: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.net = net
        self.scheduler_config = dict(scheduler_config)
        check_scheduler_config(self.scheduler_config)
        self.prediction_type = prediction_type or default_prediction_type(self.scheduler_config)
        self.schedule: NoiseSchedule = schedule_from_config(self.scheduler_config)
        self.schedule.check_prediction_type(self.prediction_type)
        self.spec = network_spec(net)
        self.source = None if source is None else str(source)
        self._guidance_vec: torch.Tensor | None = None  # set for one forward of a transformer w-student

    # ------------------------------------------------------------------------------------------ description

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    @property
    def takes_guidance(self) -> bool:
        """Whether ``guidance=w`` is a network input (a guidance-embedded student)."""
        cfg = getattr(self.net, "config", None)
        return getattr(cfg, "time_cond_proj_dim", None) is not None or hasattr(self, "guidance_embedder")

    @property
    def learned_sigma(self) -> bool:
        """Whether the network also outputs a variance (DiT): twice the input's channels."""
        cfg = getattr(self.net, "config", None)
        return getattr(cfg, "out_channels", None) == 2 * getattr(cfg, "in_channels", -1)

    def shape(self) -> tuple[int, ...]:
        """(C, *sizes) of what it denoises: (C, H, W) images or latents, (C, F, H, W) video, (C, L) audio; a network
        that takes clips of any length gives :data:`DEFAULT_FRAMES` frames (its pipeline knows better:
        :attr:`distill.pipelines.TeacherPipeline.sample_shape`)."""
        return network_shape(self.net)

    # ------------------------------------------------------------------------------------------ the call

    def _kwargs(self, cond: Mapping[str, Any], x: torch.Tensor) -> dict[str, Any]:
        unknown = [k for k in cond if k not in self.spec.takes and k != "guidance"]
        if unknown:
            raise DistillError(f"{type(self.net).__name__} takes no {', '.join(unknown)}; it takes "
                               f"{', '.join(self.spec.takes) or 'no conditioning'}.")
        missing = [k for k in self.spec.needs if k not in cond]
        if missing:
            raise DistillError(f"{type(self.net).__name__} is conditional and needs {', '.join(missing)} (a recipe "
                               "needs data with a caption or label column: data.caption_column / data.label_column).")
        kw = self.spec.kwargs(cond)
        w = cond.get("guidance")
        if self.takes_guidance:
            if w is None:
                raise DistillError("this student is guidance-embedded: call it with guidance=w (the guidance scale).")
            w = torch.as_tensor(w, device=x.device, dtype=torch.float32)
            w = w.expand(x.shape[0]) if w.ndim == 0 else w
            dim = getattr(self.net.config, "time_cond_proj_dim", None)
            if dim is not None:
                kw["timestep_cond"] = guidance_scale_embedding(w - 1, dim).to(x.dtype)
            else:
                self._guidance_vec = self.guidance_embedder(w)
        elif w is not None:
            raise DistillError("guidance=w was given to a network without a guidance input; wrap the teacher in "
                               "distill.guidance.CFGDenoiser for classifier-free guidance.")
        return kw

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        s64 = sigma.double()
        x_in = x * per_row(self.schedule.c_in(s64), x)
        t = self.schedule.timestep(sigma)
        kw = self._kwargs(cond, x)
        dtype = self.net.dtype if hasattr(self.net, "dtype") else x.dtype
        if dtype != x_in.dtype:  # a half-precision network (trainer.teacher_dtype): inputs in, the estimate out
            x_in = x_in.to(dtype)
            kw = _cast(kw, dtype)
        try:
            out = self.net(**{self.spec.input: x_in, "timestep": t}, **kw, return_dict=False)[0]
        finally:
            self._guidance_vec = None
        if self.learned_sigma:
            out = out[:, : x.shape[1]]  # the learned variance half (DiT, IF) is not used by ODE samplers
        return self.schedule.to_x0(out.to(x.dtype), x, s64, self.prediction_type)

    # ------------------------------------------------------------------------------------------ w-students

    def _add_guidance(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        vec = self._guidance_vec
        if vec is None:
            raise DistillError("this student is guidance-embedded: call it with guidance=w (the guidance scale).")
        return output + vec.to(output.dtype)

    def attach_guidance_hooks(self) -> None:
        for m in timestep_embedders(self.net):
            m.register_forward_hook(self._add_guidance)

    def remove_guidance_input(self) -> None:
        for m in timestep_embedders(self.net):
            for key, hook in list(m._forward_hooks.items()):
                if getattr(hook, "__self__", None) is self:
                    del m._forward_hooks[key]
        if hasattr(self, "guidance_embedder"):
            del self.guidance_embedder


class ConsistencyDenoiser(nn.Module):
    """A consistency function around a denoiser F, exactly as the stock scheduler that samples the exported
    student computes it.

    VP teachers (``LCMScheduler``): ``f(x, sigma) = c_skip(sigma) alpha(sigma) x + c_out(sigma) F(x, sigma)`` with
    the boundary scalings of latent consistency models (Luo et al. 2023), in the teacher's timestep units
    ``t(sigma)``::

        c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2),    c_out = s t / sqrt((s t)^2 + sigma_data^2)

    with ``s = timestep_scaling``; LCM applies ``c_skip`` to the VP sample ``x_t = alpha(sigma) x``, with
    ``alpha = 1 / sqrt(1 + sigma^2)``, so distill does too. At the schedule's smallest noise level ``sigma_min``
    (``t = 0``) ``c_skip = 1`` and ``c_out = 0``: ``f(x, sigma_min) = x_t``, the boundary condition of Song et
    al. 2023 in VP units (``alpha(sigma_min) x``; 1.8e-5 from ``x`` for the digits teacher). Applying ``c_skip``
    to ``x`` instead would differ from the stock pipeline by ``c_skip (1 - alpha) x``, up to 2e-4 at the cosine
    schedule's top timestep. With ``s = 10`` the network's own estimate dominates from ``t = 1`` on, so a student
    initialised from its teacher starts as (almost exactly) the teacher's one-step denoiser.

    Flow teachers (``FlowMatchLCMScheduler``): ``f = F``. The flow parameterization ``x0 = x_t - t v`` already
    gives ``f(x, 0) = x``, and the stock scheduler applies no scalings.
    """

    def __init__(self, inner: DiffusersDenoiser, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> None:
        super().__init__()
        if not isinstance(inner, DiffusersDenoiser):
            raise DistillError(f"a consistency student wraps a diffusers denoiser, got {type(inner).__name__}.")
        self.inner = inner
        self.timestep_scaling = float(timestep_scaling)
        self.sigma_data = float(sigma_data)

    @property
    def schedule(self) -> NoiseSchedule:
        return self.inner.schedule

    @property
    def net(self) -> nn.Module:
        """The diffusers network inside (its config gives channels and resolution)."""
        return self.inner.net

    @property
    def sigma_min(self) -> float:
        return self.inner.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.inner.sigma_max

    @property
    def prediction_type(self) -> str:
        return self.inner.prediction_type

    @property
    def takes_guidance(self) -> bool:
        return self.inner.takes_guidance

    @property
    def source(self) -> str | None:
        return self.inner.source

    def shape(self) -> tuple[int, ...]:
        return self.inner.shape()

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out)`` of shape (B,), float64, for noise levels ``sigma`` (B,) (VP only)."""
        st = self.schedule.sigma_to_t(torch.as_tensor(sigma)) * self.timestep_scaling
        sd2 = self.sigma_data**2
        return sd2 / (st**2 + sd2), st / (st**2 + sd2).sqrt()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        if self.schedule.kind != "vp":
            return self.inner(x, sigma, **cond)
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out = self.scalings(sigma)
        skip = per_row(c_skip * self.schedule.c_in(sigma.double()), x)
        return skip * x + per_row(c_out, x) * self.inner(x, sigma, **cond)


def stock_consistency_sigmas(schedule: NoiseSchedule, steps: int) -> list[float] | None:
    """What a stock pipeline must get as ``sigmas=`` to sample a consistency student of this teacher in ``steps``
    steps, or None where its scheduler's own grid is the student's (VP: ``LCMScheduler``).

    A flow teacher's ``FlowMatchLCMScheduler`` spaces its steps as ``linspace(1, t_min, steps)``, which puts the
    last of them at ``t_min`` (0.001): its 2-step grid is the 1-step grid plus a step that changes nothing. Its
    students take ``t = 1 - i / steps`` instead (through the scheduler's shift), which nests as steps halve."""
    if schedule.kind != "flow":
        return None
    return [1 - i / steps for i in range(steps)]


def consistency_scheduler_sigmas(schedule: NoiseSchedule, steps: list[int]) -> dict[str, Any]:
    """``{"scheduler_sigmas": {k: sigmas}}`` for distill.json where a stock pipeline needs ``sigmas=`` (flow
    teachers), else ``{}``."""
    got = {str(k): stock_consistency_sigmas(schedule, k) for k in steps}
    return {"scheduler_sigmas": got} if all(v is not None for v in got.values()) and got else {}


def consistency_timesteps(schedule: NoiseSchedule, original_steps: int, steps: int) -> list[float]:
    """The network timesteps the stock consistency scheduler samples ``steps`` steps at: ``LCMScheduler``'s pick
    from its ``original_steps``-point grid (VP), or ``FlowMatchLCMScheduler``'s at
    :func:`stock_consistency_sigmas` (flow)."""
    if schedule.kind == "flow":
        from diffusers import FlowMatchLCMScheduler

        sched = FlowMatchLCMScheduler.from_config(schedule.config)
        sched.set_timesteps(sigmas=stock_consistency_sigmas(schedule, steps))
        return sched.timesteps.tolist()
    if schedule.kind != "vp":
        raise DistillError(f"consistency students of a {schedule.kind} teacher have no stock scheduler; distill "
                           "distills VP (LCMScheduler) and flow (FlowMatchLCMScheduler) teachers this way.")
    from diffusers import LCMScheduler

    sched = LCMScheduler(num_train_timesteps=schedule.num_train_timesteps, original_inference_steps=original_steps)
    sched.set_timesteps(steps)
    return sched.timesteps.tolist()


def lcm_timesteps(num_train_timesteps: int, original_steps: int, steps: int) -> list[int]:
    """The teacher timesteps diffusers' ``LCMScheduler`` samples ``steps`` steps at, picked from its
    ``original_steps``-point grid."""
    from diffusers import LCMScheduler

    sched = LCMScheduler(num_train_timesteps=num_train_timesteps, original_inference_steps=original_steps)
    sched.set_timesteps(steps)
    return sched.timesteps.tolist()


def consistency_sigmas(schedule: NoiseSchedule, original_steps: int, steps: int) -> list[float]:
    """Descending sigma grid of the stock consistency scheduler: ``steps`` noise levels, then 0."""
    if schedule.kind == "flow":
        from diffusers import FlowMatchLCMScheduler

        sched = FlowMatchLCMScheduler.from_config(schedule.config)
        sched.set_timesteps(sigmas=stock_consistency_sigmas(schedule, steps))
        t = sched.sigmas.double()
        return (t / (1 - t)).tolist()
    t = torch.tensor(consistency_timesteps(schedule, original_steps, steps)).long()
    return schedule.sigmas[t].tolist() + [0.0]


def lcm_sigmas(schedule: NoiseSchedule, original_steps: int, steps: int) -> list[float]:
    """Descending sigma grid of :func:`lcm_timesteps`: ``steps`` noise levels, then 0."""
    return consistency_sigmas(schedule, original_steps, steps)


# ---------------------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DistillError(f"cannot read {path}: {exc}; the model folder is damaged or incomplete.") from exc


def load_network(folder: Path, what: str = "network") -> nn.Module:
    """Load a diffusers network from ``folder`` (holding ``config.json``); safetensors weights only."""
    import diffusers

    config = _read_json(folder / "config.json")
    cls_name = config.get("_class_name", "UNet2DModel")
    if cls_name not in NETWORKS:
        raise DistillError(f"{folder} holds a {cls_name}; distill adapts {', '.join(NETWORKS)}.")
    if not any(folder.glob("*.safetensors")):
        raise DistillError(
            f"{folder} has no .safetensors weights; distill never unpickles .bin/.pt files. Convert them with "
            "`model.save_pretrained(folder, safe_serialization=True)` on a machine you trust."
        )
    try:
        return getattr(diffusers, cls_name).from_pretrained(folder, use_safetensors=True)
    except Exception as exc:
        raise DistillError(f"cannot load the {what} in {folder}: {exc}") from exc


def load_unet(folder: Path) -> nn.Module:
    """Back-compatible name of :func:`load_network`."""
    return load_network(folder, "UNet")
