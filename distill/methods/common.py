"""Pieces several methods share; a method takes them from here, never from another method's module.

Distances (progressive and consistency distillation's ``method.distance``):

* :data:`DISTANCES`: the built-in names;
* :func:`resolve_distance`: a name or a user's dotted path to ``d(pred, target) -> (B,)``;
* :class:`LPIPSDistance`: the ``lpips`` distance.

Feature discriminators on a denoiser's own network (adversarial distillation's teacher-feature backbone, DMD2's
GAN classifier on the fake denoiser):

* :func:`feature_points`: the blocks of a diffusers network whose outputs are the features, with how to read them
  (register :func:`feature_hook` on each);
* :class:`StopForward`: raised by the forward hook on the last block needed, to skip the rest of the forward;
* :func:`head_kind` and :class:`Head`: a small trainable head that turns one feature into a logit per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill import losses
from distill.errors import DistillError

# ---------------------------------------------------------------------------------------------- distances

DISTANCES = ("l2", "l1", "pseudo_huber", "lpips")


class LPIPSDistance:
    """LPIPS (Zhang et al. 2018) through the ``lpips`` package; images are upsampled to 224 as in Song et al.

    ``d(pred, target)``: images (B, C, H, W) in [-1, 1] (one channel is repeated to three) -> (B,)."""

    def __init__(self, net: str = "vgg") -> None:
        try:
            import lpips
        except ImportError as exc:
            raise DistillError(
                "distance: lpips needs the `lpips` package and its network weights (pip install lpips; the VGG "
                "weights download on first use, so fetch them on a connected machine). Or use l2 / pseudo_huber."
            ) from exc
        try:
            self.net = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)
        except Exception as exc:  # weights missing offline, most likely
            raise DistillError(f"cannot load the LPIPS {net} weights ({type(exc).__name__}: {exc}); place them in "
                               "the torch hub cache on this machine, or use distance l2 / pseudo_huber.") from exc

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.net.to(pred.device)

        def prep(x: torch.Tensor) -> torch.Tensor:
            x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
            return F.interpolate(x, size=224, mode="bilinear", align_corners=False)

        return self.net(prep(pred), prep(target)).flatten()


def resolve_distance(name: str, huber_c: float = 0.00054) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``d(pred, target) -> (B,)`` for a built-in name, a dotted path ``package.module:function`` or a file
    ``path/to/file.py:function`` (a class there is instantiated without arguments). ``pred`` and ``target`` are
    (B, ...) images or latents; ``huber_c`` is ``pseudo_huber``'s ``c`` (scaled by ``sqrt(dims)``)."""
    if name == "l2":
        return losses.l2
    if name == "l1":
        return losses.l1
    if name == "pseudo_huber":
        return lambda pred, target: losses.pseudo_huber(pred, target, c=huber_c)
    if name == "lpips":
        return LPIPSDistance()
    from distill.plugins import load_object

    fn = load_object(name, "distance")
    if isinstance(fn, type):
        fn = fn()
    if not callable(fn):
        raise DistillError(f"distance {name!r} is not callable; give a function (pred, target) -> (B,) tensor.")
    return fn


# ---------------------------------------------------------------------------------------------- feature discriminators


class StopForward(Exception):
    """Raised by the last feature hook: the rest of the network's forward is not needed. The caller runs the
    forward inside ``try: ... except StopForward: pass``."""


Picker = Callable[[Any, dict[str, Any]], torch.Tensor]  # (a block's raw output, its keyword arguments) -> feature


def _first(out: Any, kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _second(out: Any, kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    return out[1]  # SD3's joint blocks return (text tokens, image tokens)


def _clips(out: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """A video UNet's block output (B * F, C, H, W), its frames folded into the batch clip by clip (the block was
    called with ``num_frames=F``), as the clips' maps (B, C, F, H, W)."""
    f = _first(out)
    return f.unflatten(0, (-1, int(kwargs["num_frames"]))).movedim(1, 2)


def feature_points(net: nn.Module) -> list[tuple[nn.Module, Picker]]:
    """(module, output picker) of the blocks of a diffusers network ``net`` whose outputs are a discriminator's
    features, shallowest first: a UNet's ``conv_in``, down blocks and middle block (feature maps (B, C, H, W),
    (B, C, L), or a video UNet's (B, C, F, H, W)); a transformer's blocks (image tokens (B, N, C)). The picker takes
    a block's raw output (a tensor or a tuple) and the keyword arguments it was called with to the feature tensor;
    register it on the module with :func:`feature_hook`."""
    kind = type(net).__name__
    if kind == "UNet3DConditionModel":
        # its blocks see the frames folded into the batch; each is called with num_frames=, which unfolds them.
        # conv_in is called without it, so transformer_in (conv_in's output after temporal attention) stands in
        points = [(net.transformer_in, _clips)] + [(b, _clips) for b in net.down_blocks]
        return points + ([(net.mid_block, _clips)] if net.mid_block is not None else [])
    if kind in ("UNet2DModel", "UNet2DConditionModel"):
        points = [(net.conv_in, _first)] + [(b, _first) for b in net.down_blocks]
        return points + ([(net.mid_block, _first)] if net.mid_block is not None else [])
    if kind == "UNet1DModel":  # (B, C, L) feature maps of an audio-rank UNet; it has no conv_in
        return [(b, _first) for b in net.down_blocks] + ([(net.mid_block, _first)] if net.mid_block is not None else [])
    if kind == "SD3Transformer2DModel":
        return [(b, _second) for b in net.transformer_blocks]
    if kind in ("Transformer2DModel", "DiTTransformer2DModel"):
        return [(b, _first) for b in net.transformer_blocks]
    raise DistillError(f"the teacher-feature discriminator does not know {kind}'s blocks; name a backbone module "
                       "instead (backbone: package.module:factory).")


def feature_hook(module: nn.Module, pick: Picker, sink: Callable[[torch.Tensor], None]) -> Any:
    """Register a forward hook on ``module`` that hands ``pick(output, kwargs)`` to ``sink`` (which may raise
    :class:`StopForward`); returns the handle to remove."""

    def hook(m: nn.Module, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        sink(pick(out, kwargs))

    return module.register_forward_hook(hook, with_kwargs=True)


def maps_of(net: nn.Module) -> bool | None:
    """Whether the features :func:`feature_points` reads from ``net`` are channels-first maps (UNets: (B, C, H, W),
    (B, C, L), (B, C, F, H, W)) rather than tokens (B, N, C) (transformers); None for a network it does not know."""
    kind = type(net).__name__
    if kind.startswith("UNet"):
        return True
    if "Transformer" in kind:
        return False
    return None


SPATIAL_KINDS = {1: "spatial-1d", 2: "spatial", 3: "spatial-3d"}  # channels-first maps by their number of axes


def head_kind(f: torch.Tensor, maps: bool | None = None) -> tuple[int, str]:
    """(channels, kind) of a feature, for :class:`Head`: channels-first maps (B, C, H, W) ``spatial``, (B, C, L)
    ``spatial-1d`` and (B, C, F, H, W) ``spatial-3d``; tokens (B, N, C) ``tokens``; (B, C) ``vector``.

    A 3-D feature is a 1-D map or tokens: ``maps`` (from :func:`maps_of`) says which; None keeps the reading of
    a backbone that does not say, tokens."""
    if f.ndim in (4, 5) or f.ndim == 3 and maps:
        return f.shape[1], SPATIAL_KINDS[f.ndim - 2]
    if f.ndim == 3:
        return f.shape[2], "tokens"
    return f.shape[1], "vector"


class Head(nn.Module):
    """A small trainable head: a feature map (B, C, H, W) (or (B, C, L), (B, C, F, H, W)), tokens (B, N, C) or a
    vector (B, C) -> one logit per sample (B,), the mean over positions. ``channels`` and ``kind`` come from :func:`head_kind`; ``hidden`` is its
    hidden width."""

    def __init__(self, channels: int, hidden: int, kind: str) -> None:
        super().__init__()
        # no bias on the logit: an offset shared by real and fake gets no gradient from the hinge loss while
        # every sample lies inside the margin, so it would only drift
        self.kind = kind
        if kind in SPATIAL_KINDS.values():
            conv = {"spatial-1d": nn.Conv1d, "spatial": nn.Conv2d, "spatial-3d": nn.Conv3d}[kind]
            self.net = nn.Sequential(conv(channels, hidden, 3, padding=1), nn.SiLU(), conv(hidden, 1, 1, bias=False))
        else:  # tokens or vector: per position
            self.net = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1, bias=False))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f).flatten(1).mean(1)
