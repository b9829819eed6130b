"""Classifier-free guidance (Ho & Salimans 2022) in the denoiser convention, and guidance-embedded students.

A guided estimate is ``D_w(x, sigma, c) = D(x, sigma, u) + w (D(x, sigma, c) - D(x, sigma, u))`` with ``u`` the
unconditional input (the empty prompt's embedding, or the null class). Guidance is linear in the network's
native output and the native output is affine in x0 at fixed ``(x, sigma)``, so guiding x0 estimates is the same
as diffusers guiding noise predictions. ``w`` is diffusers' ``guidance_scale``: 1 is the conditional model alone.

Across distill the keyword ``guidance=w`` (a float or a (B,) tensor) asks a denoiser for its estimate under
guidance ``w``: a :class:`CFGDenoiser` computes it from two halves of one batched forward; a guidance-embedded
student (:func:`add_guidance_input`) takes ``w`` as a network input and needs one forward. So a method calls
the guided teacher and a ``w``-conditioned student the same way.

Guidance embeddings (Meng et al. 2023; LCM, Luo et al. 2023):

* ``UNet2DConditionModel``: ``time_cond_proj_dim`` / ``timestep_cond``, the sinusoidal embedding of ``w - 1``
  exactly as diffusers' ``StableDiffusionPipeline`` computes it, so a stock pipeline called with
  ``guidance_scale=w`` feeds the exported student the same ``w`` (and skips classifier-free guidance).
* transformers (``SD3Transformer2DModel``, DiT): an embedding of ``w - 1`` added to the output of the network's
  timestep embedder(s), as Flux's guidance embedding is. Stock pipelines have no input for it, so an exported
  student gets ``w`` baked in: at a fixed ``w`` the added vector is a constant, folded into the timestep
  embedder's output bias (:func:`bake_guidance`). The new layers start at zero: the student starts as its teacher.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from distill.denoisers import DiffusersDenoiser, guidance_scale_embedding, timestep_embedders
from distill.errors import DistillError
from distill.tensors import per_row

# the parameter-name parts of the layers a guidance input adds (add_guidance_input; distill.lora.lora_student): a
# UNet's time_embedding.cond_proj, a transformer's guidance_embedder
GUIDANCE_LAYERS = ("guidance_embedder.", "time_embedding.cond_proj.")


def is_guidance_layer(name: str) -> bool:
    """Whether parameter ``name`` belongs to a guidance embedding that distill added."""
    return any(k in name for k in GUIDANCE_LAYERS)


def as_scale(w: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A guidance scale as a (B,) float64 tensor on x's device."""
    w = torch.as_tensor(w, device=x.device, dtype=torch.float64)
    return w.expand(x.shape[0]) if w.ndim == 0 else w


class CFGDenoiser(nn.Module):
    """Classifier-free guidance around any conditional denoiser ``D(x, sigma, **cond)``.

    ``forward(x, sigma, guidance=None, **cond)``: x (B, ...), sigma (B,) -> x0 (B, ...). ``guidance`` is ``w``
    (float or (B,)); default ``scale``. The conditional and unconditional halves run as one forward of batch 2B.
    ``uncond`` holds the unconditional inputs for one sample (each (1, ...)); keys it lacks (SDXL's ``time_ids``)
    are taken from ``cond`` for both halves. Where every ``w`` is 1 only the conditional half runs (decided without
    reading a GPU tensor back: a ``w`` tensor on a GPU always runs both halves).
    """

    def __init__(self, inner: nn.Module, uncond: Mapping[str, torch.Tensor], scale: float = 1.0) -> None:
        super().__init__()
        self.inner = inner
        self.scale = float(scale)
        self.uncond_keys = tuple(uncond)
        for k, v in uncond.items():  # buffers: they follow the module to its device, and are not trained or saved
            self.register_buffer(f"uncond_{k}", v.detach()[:1].clone(), persistent=False)

    def uncond_like(self, cond: Mapping[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        """The unconditional counterpart of ``cond`` for ``n`` samples."""
        out = {}
        for k, v in cond.items():
            u = getattr(self, f"uncond_{k}") if k in self.uncond_keys else None
            out[k] = v if u is None else u.to(v.dtype).expand(n, *u.shape[1:])
        return out

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, guidance: float | torch.Tensor | None = None,
                **cond: torch.Tensor) -> torch.Tensor:
        g = self.scale if guidance is None else guidance
        w = as_scale(g, x)
        if not cond:
            raise DistillError("classifier-free guidance needs the conditional inputs (a prompt's embedding or a "
                               "class label); got none.")
        # decided on the host: a w tensor on a GPU (a w-student's draws) is not read back, which would make the step
        # wait for the device; both halves run then, as they do whenever some w is not 1
        on_host = not torch.is_tensor(g) or g.device.type == "cpu"
        if on_host and bool((torch.as_tensor(g, dtype=torch.float64) == 1).all()):
            return self.inner(x, sigma, **cond)
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.expand(n) if sigma.ndim == 0 else sigma
        u = self.uncond_like(cond, n)
        both = {k: torch.cat([u[k], v]) for k, v in cond.items()}
        x0_u, x0_c = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return x0_u + per_row(w, x0_c) * (x0_c - x0_u)

    # the wrapped denoiser's schedule and attributes, so a guided teacher is used like the teacher
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


# ---------------------------------------------------------------------------------------------- w-students


class GuidanceEmbedder(nn.Module):
    """``w -> linear_2(silu(linear_1(sinusoid(w - 1))))`` (B, out_dim), zero at initialisation; added to a
    transformer's timestep embedding(s) by forward hooks."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.linear_1 = nn.Linear(dim, out_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(out_dim, out_dim)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        emb = guidance_scale_embedding(w.float() - 1, self.dim).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(emb)))


def add_guidance_input(denoiser: nn.Module, dim: int = 256) -> nn.Module:
    """A copy of ``denoiser`` (a :class:`~distill.denoisers.DiffusersDenoiser`) that takes ``guidance=w`` as a
    network input; its outputs equal the original's for every ``w`` until it is trained.

    UNet2DConditionModel: rebuilt with ``time_cond_proj_dim = dim`` and the original weights; the new
    ``time_embedding.cond_proj`` starts at zero. Transformers: a :class:`GuidanceEmbedder` (zero output at first)
    hooked onto every timestep embedder.
    """
    import copy

    if not isinstance(denoiser, DiffusersDenoiser):
        raise DistillError(f"a guidance input is added to a diffusers denoiser, got {type(denoiser).__name__}.")
    if denoiser.takes_guidance:
        return copy.deepcopy(denoiser)
    out = copy.deepcopy(denoiser)
    net = out.net
    kind = type(net).__name__
    if kind == "UNet2DConditionModel":
        cls = type(net)
        config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
        config["time_cond_proj_dim"] = dim
        new = cls(**config)
        missing, unexpected = new.load_state_dict(net.state_dict(), strict=False)
        if unexpected or any("cond_proj" not in k for k in missing):
            raise DistillError(f"cannot add a guidance input to this UNet: missing {missing}, unexpected {unexpected}.")
        nn.init.zeros_(new.time_embedding.cond_proj.weight)
        out.net = new.to(next(net.parameters()).device)
        return out
    if kind in ("SD3Transformer2DModel", "Transformer2DModel", "DiTTransformer2DModel"):
        width = timestep_embedders(net)[0].linear_2.out_features
        out.guidance_embedder = GuidanceEmbedder(dim, width).to(next(net.parameters()).device)
        out.attach_guidance_hooks()
        return out
    raise DistillError(f"distill has no guidance embedding for {kind}; use a fixed guidance scale (guidance.range: "
                       "null).")


@torch.no_grad()
def bake_guidance(denoiser: nn.Module, w: float) -> nn.Module:
    """A copy of a transformer ``w``-student whose network has ``w`` folded in: the embedder's (constant) output at
    ``w`` is added to each hooked timestep embedder's output bias, and the embedder removed. Exactly the same
    outputs at ``w``; what a stock pipeline (which has no guidance input for these networks) can load."""
    import copy

    emb = getattr(denoiser, "guidance_embedder", None)
    if emb is None:
        return denoiser
    out = copy.deepcopy(denoiser)
    vec = out.guidance_embedder(torch.tensor([float(w)], device=out.guidance_embedder.linear_1.weight.device))[0]
    for m in timestep_embedders(out.net):
        m.linear_2.bias.add_(vec.to(m.linear_2.bias.dtype))
    out.remove_guidance_input()
    return out
