"""A teacher is a whole diffusers pipeline: its network and schedule, its VAE, its text encoders or classes.

``load_pipeline(folder_or_hub_id)`` reads ``model_index.json`` and the component configs, checks that the parts fit
together, and returns a :class:`TeacherPipeline`; weights are loaded only when a part is used (the denoiser for
training and sampling, the VAE to encode data or decode samples, the text encoders to encode prompts), and
always as safetensors.

| pipeline class | network | conditioning | latent | stock export |
|---|---|---|---|---|
| ``DDPMPipeline`` | ``UNet2DModel`` | none (or class labels) | no | ``DDPMPipeline`` |
| ``StableDiffusionPipeline`` | ``UNet2DConditionModel`` | one CLIP text encoder | yes | ``StableDiffusionPipeline`` |
| ``StableDiffusionXLPipeline`` | ``UNet2DConditionModel`` | two CLIP text encoders, pooled + size ids | yes | ``StableDiffusionXLPipeline`` |
| ``StableDiffusion3Pipeline`` | ``SD3Transformer2DModel`` | two CLIP (+ optional T5), pooled | yes | ``StableDiffusion3Pipeline`` |
| ``DiTPipeline`` | ``Transformer2DModel`` | class labels (null class for guidance) | yes | ``DiTPipeline`` |
| ``TextToVideoSDPipeline`` | ``UNet3DConditionModel`` | one CLIP text encoder | yes, per frame | ``TextToVideoSDPipeline`` |

A video teacher's samples are clips [B, C, F, H, W] (latents [B, 4, F, h, w]); its 2-D VAE codes each frame, so
:meth:`TeacherPipeline.encode_images` and :meth:`TeacherPipeline.decode` fold the frames into the batch
([B, C, F, H, W] -> [B * F, C, H, W]) and back, here and nowhere else. Its network takes clips of any length:
training takes the frame count from the data, sampling from :attr:`TeacherPipeline.num_frames`.

Text is encoded by the stock pipeline's own ``encode_prompt`` (built around the loaded text components only), so
embeddings, pooled outputs, SDXL's zeroed empty prompt and SD3's missing-T5 zeros are exactly what the stock
pipeline feeds its network.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from distill.denoisers import (DEFAULT_FRAMES, ConsistencyDenoiser, DiffusersDenoiser, check_scheduler_config,
                               load_network, network_sizes, sample_dims, takes_any_frames)
from distill.errors import DistillError
from distill.hub import resolve_model_path


@dataclass(frozen=True)
class PipelineSpec:
    """What distill needs to know about a diffusers pipeline class."""

    network: str  # the component holding the denoising network: unet | transformer
    conditioning: str | None  # None | "text" | "class"
    latent: bool  # the network denoises VAE latents
    text_encoders: tuple[str, ...] = ()  # component names, in the pipeline's order
    tokenizers: tuple[str, ...] = ()
    required_text: int = 0  # how many of the text encoders must be present (SD3's T5 is optional)
    vae_shift: bool = False  # the pipeline subtracts the VAE's shift_factor before scaling (SD3); SD, SDXL, DiT do not
    vae_per_frame: bool = False  # clips (B, C, F, H, W) through a 2-D VAE, one frame at a time (TextToVideoSD)


PIPELINES: dict[str, PipelineSpec] = {
    "DDPMPipeline": PipelineSpec("unet", None, False),
    "StableDiffusionPipeline": PipelineSpec("unet", "text", True, ("text_encoder",), ("tokenizer",), 1),
    "StableDiffusionXLPipeline": PipelineSpec("unet", "text", True, ("text_encoder", "text_encoder_2"),
                                              ("tokenizer", "tokenizer_2"), 2),
    "StableDiffusion3Pipeline": PipelineSpec("transformer", "text", True,
                                             ("text_encoder", "text_encoder_2", "text_encoder_3"),
                                             ("tokenizer", "tokenizer_2", "tokenizer_3"), 2, vae_shift=True),
    "DiTPipeline": PipelineSpec("transformer", "class", True),
    # ModelScope text-to-video (damo-vilab/text-to-video-ms-1.7b, zeroscope): SD's text encoder and VAE, a video UNet
    "TextToVideoSDPipeline": PipelineSpec("unet", "text", True, ("text_encoder",), ("tokenizer",), 1,
                                          vae_per_frame=True),
}
CONSISTENCY_SCHEDULERS = ("LCMScheduler", "FlowMatchLCMScheduler", "TCDScheduler")
NETWORK_FOLDERS = ("unet", "transformer")  # where a pipeline folder keeps its denoising network


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DistillError(f"cannot read {path}: {exc}; the model folder is damaged or incomplete.") from exc


def _as_frames(clips: torch.Tensor) -> torch.Tensor:
    """Clips (N, C, F, H, W) -> their frames (N * F, C, H, W), clip by clip, for a 2-D VAE."""
    return clips.movedim(2, 1).flatten(0, 1)


def _as_clips(frames: torch.Tensor, n: int) -> torch.Tensor:
    """Frames (N * F, C, H, W) -> ``n`` clips (N, C, F, H, W): the inverse of :func:`_as_frames`."""
    return frames.unflatten(0, (n, -1)).movedim(1, 2)


def _files_hash(folder: Path) -> str:
    """sha256 prefix over a component folder's file names and contents (safetensors, configs, vocab)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


class TeacherPipeline:
    """A diffusers pipeline folder as distill sees it. Build with :func:`load_pipeline`.

    ``class_name``, ``spec`` (:class:`PipelineSpec`), ``network_config`` and ``scheduler_config`` are read from
    JSON at once; :meth:`load_denoiser`, :attr:`vae` and :meth:`encode_prompts` load weights when called.
    """

    def __init__(self, folder: Path, class_name: str, index: dict[str, Any]) -> None:
        self.folder = folder
        self.class_name = class_name
        self.index = index
        self.spec = PIPELINES[class_name]
        self.network_config = _read_json(folder / self.spec.network / "config.json")
        self.scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
        self.vae_config = _read_json(folder / "vae" / "config.json") if self.spec.latent else None

    # ------------------------------------------------------------------------------------------ shapes

    @property
    def conditioning(self) -> str | None:
        """``None``, ``"text"`` or ``"class"``; class-conditional ``UNet2DModel`` teachers count as ``"class"``."""
        if self.spec.conditioning is None and self.network_config.get("num_class_embeds"):
            return "class"
        return self.spec.conditioning

    @property
    def vae_scale_factor(self) -> int:
        if self.vae_config is None:
            return 1
        return 2 ** (len(self.vae_config.get("block_out_channels", [0])) - 1)

    @property
    def sample_dims(self) -> int:
        """Axes after the channels of what the network denoises: 2 for images, 1 for audio, 3 for video."""
        return sample_dims(str(self.network_config.get("_class_name")), self.network_config)

    @property
    def any_frames(self) -> bool:
        """Whether the network denoises clips of any length (``UNet3DConditionModel``): its config fixes no frame
        count, so data of any length fits it and :attr:`sample_shape` has :attr:`num_frames` frames."""
        return takes_any_frames(str(self.network_config.get("_class_name")))

    @cached_property
    def num_frames(self) -> int | None:
        """Frames of the clips it makes, for a network that takes any number (None for any other): the
        ``num_frames`` a student's ``distill.json`` records (the length of the clips it was trained on), else the
        stock pipeline's default (:data:`~distill.denoisers.DEFAULT_FRAMES`, 16)."""
        if not self.any_frames:
            return None
        meta = self.folder / "distill.json"
        frames = _read_json(meta).get("num_frames") if meta.is_file() else None
        return int(frames) if frames else DEFAULT_FRAMES

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, *sizes) the network denoises (latents for a latent teacher): (C, H, W), (C, L) or (C, F, H, W)."""
        sizes = network_sizes(str(self.network_config.get("_class_name")), self.network_config, self.num_frames)
        if sizes is None:
            raise DistillError(f"{self.folder / self.spec.network / 'config.json'} has no sample_size; set it.")
        return int(self.network_config.get("in_channels", 3)), *sizes

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, *sizes) of the samples it makes (decoded, for a latent teacher: each axis times the VAE's factor; a
        per-frame VAE's clips keep their frame count)."""
        c, *sizes = self.sample_shape
        if self.vae_config is None:
            return (c, *sizes)
        f = self.vae_scale_factor
        keep = 1 if self.spec.vae_per_frame else 0  # the frame axis
        return (int(self.vae_config.get("in_channels", 3)), *sizes[:keep], *(s * f for s in sizes[keep:]))

    def expected_shape(self, data: Sequence[int], decoded: bool = False) -> tuple[int, ...]:
        """The shape of one sample the teacher takes (``decoded``: makes through its VAE, :attr:`image_shape`; else
        :attr:`sample_shape`), for data samples of shape ``data``: a network that takes clips of any length takes
        the data's frame count."""
        want = tuple(self.image_shape if decoded else self.sample_shape)
        if self.any_frames and len(data) == len(want):
            want = (want[0], int(data[1]), *want[2:])
        return want

    @property
    def num_classes(self) -> int | None:
        cfg = self.network_config
        return cfg.get("num_embeds_ada_norm") or cfg.get("num_class_embeds")

    @property
    def null_class(self) -> int:
        """The label DiT's label embedding keeps for "no class" (its last row, ``num_classes``)."""
        return int(self.num_classes or 1000)

    def has(self, component: str) -> bool:
        entry = self.index.get(component)
        return isinstance(entry, (list, tuple)) and entry[0] is not None and (self.folder / component).is_dir()

    # ------------------------------------------------------------------------------------------ weights

    def load_network(self) -> nn.Module:
        return load_network(self.folder / self.spec.network, self.spec.network)

    def load_denoiser(self) -> nn.Module:
        """The network and schedule as a denoiser (a ``ConsistencyDenoiser`` for a consistency student)."""
        denoiser = DiffusersDenoiser(self.load_network(), self.scheduler_config, source=self.folder)
        if self.scheduler_config.get("_class_name") in CONSISTENCY_SCHEDULERS:
            # a consistency student: the stock scheduler applies the boundary scalings, so distill does too
            return ConsistencyDenoiser(denoiser, self.scheduler_config.get("timestep_scaling", 10.0))
        return denoiser

    @cached_property
    def vae(self) -> nn.Module:
        """The frozen ``AutoencoderKL`` (loaded on first use; never trained)."""
        import diffusers

        if not self.spec.latent:
            raise DistillError(f"{self.folder} is a pixel-space {self.class_name}; it has no VAE.")
        folder = self.folder / "vae"
        cls_name = (self.vae_config or {}).get("_class_name", "AutoencoderKL")
        if not any(folder.glob("*.safetensors")):
            raise DistillError(f"{folder} has no .safetensors weights; distill never unpickles .bin files.")
        try:
            vae = getattr(diffusers, cls_name).from_pretrained(folder, use_safetensors=True)
        except Exception as exc:
            raise DistillError(f"cannot load the VAE in {folder}: {exc}") from exc
        return vae.eval().requires_grad_(False)

    @property
    def vae_scaling(self) -> tuple[float, float]:
        """``(scaling_factor, shift_factor)``: latents are ``(mean - shift) * scale``, as the stock pipeline decodes
        them (``latents / scale + shift``); the shift only for pipelines that apply one (SD3)."""
        cfg = self.vae_config or {}
        shift = float(cfg.get("shift_factor") or 0.0) if self.spec.vae_shift else 0.0
        return float(cfg.get("scaling_factor") or 1.0), shift

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> latents (N, C, h, w): the VAE posterior's mean, shifted and scaled as
        the pipeline expects its network's input (``scaling_factor``, ``shift_factor``). A per-frame VAE's clips
        (N, 3, F, H, W) -> (N, C, F, h, w), ``batch_size`` frames at a time."""
        if images.ndim == 5 and self.spec.vae_per_frame:
            return _as_clips(self.encode_images(_as_frames(images), batch_size), len(images))
        scale, shift = self.vae_scaling
        vae = self.vae
        device = next(vae.parameters()).device
        out = []
        for lo in range(0, len(images), batch_size):
            x = images[lo : lo + batch_size].to(device, next(vae.parameters()).dtype)
            mean = vae.encode(x).latent_dist.mean
            out.append(((mean - shift) * scale).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Latents (N, C, h, w) -> images (N, 3, H, W), nominally in [-1, 1] (inverse of the scaling above); a
        per-frame VAE's (N, C, F, h, w) -> clips (N, 3, F, H, W), as the stock pipeline's ``decode_latents``."""
        if latents.ndim == 5 and self.spec.vae_per_frame:
            return _as_clips(self.decode(_as_frames(latents), batch_size), len(latents))
        scale, shift = self.vae_scaling
        vae = self.vae
        param = next(vae.parameters())
        out = []
        for lo in range(0, len(latents), batch_size):
            z = latents[lo : lo + batch_size].to(param.device, param.dtype)
            out.append(vae.decode(z / scale + shift, return_dict=False)[0].float())
        return torch.cat(out)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """What the network made, as images in [-1, 1]: decoded latents, or the pixels themselves."""
        return self.decode(x).to(x.device) if self.spec.latent else x

    def weights_hash(self, component: str) -> str:
        folder = self.folder / component
        return _files_hash(folder) if folder.is_dir() else "none"

    # ------------------------------------------------------------------------------------------ text

    @cached_property
    def text_pipeline(self) -> Any:
        """The stock pipeline class around the text encoders and tokenizers only (for its ``encode_prompt``)."""
        import diffusers
        import transformers

        if self.spec.conditioning != "text":
            raise DistillError(f"{self.folder} is a {self.class_name}; it takes no prompts.")
        parts: dict[str, Any] = {}
        for name in (*self.spec.text_encoders, *self.spec.tokenizers):
            if not self.has(name):
                parts[name] = None
                continue
            lib, cls_name = self.index[name]
            folder = self.folder / name
            cls = getattr(transformers, cls_name, None)
            if cls is None:
                raise DistillError(f"{folder}: transformers {transformers.__version__} has no {cls_name}.")
            if name.startswith("text_encoder") and not any(folder.glob("*.safetensors")):
                raise DistillError(f"{folder} has no .safetensors weights; distill never unpickles .bin files.")
            try:
                obj = cls.from_pretrained(folder, local_files_only=True)
            except Exception as exc:
                raise DistillError(f"cannot load {name} ({cls_name}) from {folder} offline: {type(exc).__name__}: "
                                   f"{exc}. The pipeline folder must hold the text encoders and tokenizers.") from exc
            parts[name] = obj.eval().requires_grad_(False) if isinstance(obj, nn.Module) else obj
        present = [n for n in self.spec.text_encoders if parts.get(n) is not None]
        if len(present) < self.spec.required_text:
            need = self.spec.text_encoders[: self.spec.required_text]
            raise DistillError(f"{self.folder} lacks text encoder(s) {', '.join(n for n in need if parts.get(n) is None)}"
                               f"; a {self.class_name} needs {', '.join(need)}.")
        cls = getattr(diffusers, self.class_name)
        import inspect

        params = inspect.signature(cls.__init__).parameters
        kwargs = {k: None for k in params if k not in ("self", "kwargs", "args")}
        kwargs.update({k: v for k, v in parts.items() if k in params})
        if "requires_safety_checker" in params:
            kwargs["requires_safety_checker"] = False
        if "force_zeros_for_empty_prompt" in params:
            kwargs["force_zeros_for_empty_prompt"] = bool(self.index.get("force_zeros_for_empty_prompt", True))
        if "add_watermarker" in params:
            kwargs["add_watermarker"] = False  # SDXL: the watermark is applied to decoded images, not wanted here
        try:
            pipe = cls(**kwargs)
        except Exception as exc:  # pragma: no cover - a diffusers version whose __init__ needs the network
            raise DistillError(f"cannot build {self.class_name} around its text encoders: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        if self.spec.network == "transformer":
            # SD3's encode_prompt reads transformer.config.joint_attention_dim for the zeros it uses in place of
            # a missing T5; a config-only stand-in avoids loading the transformer's weights for that
            from types import SimpleNamespace

            object.__setattr__(pipe, "transformer", SimpleNamespace(config=SimpleNamespace(**self.network_config)))
        return pipe

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], device: str | torch.device = "cpu",
                       batch_size: int = 64) -> dict[str, torch.Tensor]:
        """``cond`` tensors (see :mod:`distill.denoisers`) for each prompt, on the CPU, float32."""
        prompts = list(prompts)
        pipe = self.text_pipeline
        for name in self.spec.text_encoders:
            enc = getattr(pipe, name, None)
            if enc is not None:
                enc.to(device)
        chunks: list[dict[str, torch.Tensor]] = []
        for lo in range(0, len(prompts), batch_size):
            chunks.append(self._encode(pipe, prompts[lo : lo + batch_size], torch.device(device)))
        return {k: torch.cat([c[k] for c in chunks]).float().cpu() for k in chunks[0]}

    def _encode(self, pipe: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        if self.class_name in ("StableDiffusionPipeline", "TextToVideoSDPipeline"):  # the same encode_prompt
            emb, _ = pipe.encode_prompt(prompts, device, 1, False)
            return {"encoder_hidden_states": emb}
        if self.class_name == "StableDiffusionXLPipeline":
            emb, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
            return {"encoder_hidden_states": emb, "pooled": pooled, "time_ids": self.time_ids(len(prompts))}
        if self.class_name == "StableDiffusion3Pipeline":
            emb, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
            return {"encoder_hidden_states": emb, "pooled": pooled}
        raise DistillError(f"{self.class_name} takes no prompts.")  # pragma: no cover

    def time_ids(self, n: int) -> torch.Tensor:
        """SDXL's micro-conditioning for an unscaled, uncropped image of the pipeline's size: ``(H, W, 0, 0, H, W)``."""
        _, h, w = self.image_shape
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(n, 6).clone()

    @torch.no_grad()
    def unconditional(self) -> dict[str, torch.Tensor]:
        """The unconditional input for one sample (each tensor (1, ...)): the empty prompt's encoding (zeros for
        an SDXL pipeline with ``force_zeros_for_empty_prompt``, as the stock pipeline does), or the null class."""
        if self.conditioning == "class":
            return {"class_labels": torch.tensor([self.null_class])}
        if self.conditioning != "text":
            return {}
        cond = self.encode_prompts([""])
        if self.class_name == "StableDiffusionXLPipeline" and self.index.get("force_zeros_for_empty_prompt", True):
            cond = {k: (torch.zeros_like(v) if k != "time_ids" else v) for k, v in cond.items()}
        return cond

    def labels(self, labels: Sequence[int]) -> dict[str, torch.Tensor]:
        """``cond`` for class labels."""
        labels = torch.as_tensor(list(labels), dtype=torch.long)
        n = self.num_classes
        if n is not None and (labels.min() < 0 or labels.max() >= n):
            raise DistillError(f"class labels must lie in 0..{n - 1} for this teacher, got {labels.min()}..{labels.max()}.")
        return {"class_labels": labels}

    def text_hash(self) -> str:
        """Hash of the text encoders and tokenizers: keys cached prompt embeddings."""
        parts = [f"{n}:{self.weights_hash(n)}" for n in (*self.spec.text_encoders, *self.spec.tokenizers)]
        return hashlib.sha256("|".join([self.class_name, *parts]).encode()).hexdigest()[:16]

    def describe(self) -> str:
        what = f"{self.class_name} ({self.spec.network} on {'x'.join(map(str, self.sample_shape))}"
        return what + (f" latents, {self.conditioning}-conditional)" if self.spec.latent else f", {self.conditioning or 'unconditional'})")


def load_pipeline(name_or_path: str | Path) -> TeacherPipeline:
    """A :class:`TeacherPipeline` for a pipeline folder or hub id, checked before any weights load.

    Refused with one message each: a pipeline class distill does not cover (naming those it does); a folder
    without the network or scheduler; a VAE whose latent channels do not fit the network. A folder with
    ``unet/`` and ``scheduler/`` but no ``model_index.json`` is read as a ``DDPMPipeline``.
    """
    root = resolve_model_path(name_or_path)
    index_path = root / "model_index.json"
    if index_path.is_file():
        index = _read_json(index_path)
        class_name = str(index.get("_class_name"))
    elif (root / "unet").is_dir():
        index, class_name = {"unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}, \
            "DDPMPipeline"
    else:
        raise DistillError(f"{root} is not a diffusers pipeline folder: it has no model_index.json (save one with "
                           "`pipeline.save_pretrained(folder)`).")
    if class_name not in PIPELINES:
        raise DistillError(f"{root} holds a {class_name}; distill supports {', '.join(PIPELINES)}.")
    spec = PIPELINES[class_name]
    net_dir, sched = root / spec.network, root / "scheduler" / "scheduler_config.json"
    if not (net_dir / "config.json").is_file() or not sched.is_file():
        raise DistillError(f"{root} is not a complete {class_name} folder: it needs {spec.network}/config.json and "
                           "scheduler/scheduler_config.json (save one with `pipeline.save_pretrained(folder)`).")
    if spec.latent and not (root / "vae" / "config.json").is_file():
        raise DistillError(f"{root} is a latent {class_name} without vae/config.json; the VAE is needed to encode "
                           "data and decode samples.")
    pipe = TeacherPipeline(root, class_name, index)
    if pipe.vae_config is not None:
        lc, nc = pipe.vae_config.get("latent_channels"), pipe.network_config.get("in_channels")
        if lc is not None and nc is not None and int(lc) != int(nc):
            raise DistillError(f"{root}: the VAE makes {lc}-channel latents but the {spec.network} takes {nc} "
                               "channels; the pipeline's parts do not fit together.")
    check_scheduler_config(pipe.scheduler_config)
    return pipe


def load_denoiser(name_or_path: str | os.PathLike) -> DiffusersDenoiser | ConsistencyDenoiser:
    """Load a teacher or student (a pipeline folder or hub id) as a :class:`DiffusersDenoiser`; a
    :class:`ConsistencyDenoiser` around one when the folder's scheduler is ``LCMScheduler`` or
    ``FlowMatchLCMScheduler`` (a consistency student). See :func:`load_pipeline`."""
    return load_pipeline(name_or_path).load_denoiser()


def load_kwargs(folder: str | Path) -> dict[str, Any]:
    """Extra ``from_pretrained`` kwargs a stock pipeline folder needs: ``text_encoder_3=None, tokenizer_3=None``
    for an SD3 folder saved without T5 (diffusers 0.42 refuses it otherwise)."""
    index_path = Path(folder) / "model_index.json"
    if not index_path.is_file():
        return {}
    index = json.loads(index_path.read_text())
    return {k: None for k in ("text_encoder_3", "tokenizer_3")
            if k in index and (not isinstance(index[k], list) or index[k][0] is None)}
