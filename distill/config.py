"""The sections of a recipe config as typed dataclasses, ``key=value`` overrides, every problem reported at once.

A recipe file (:mod:`distill.recipe`) has a ``method`` section (the method's own ``Config``) and these shared ones:
``data`` (DataConfig), ``trainer`` (TrainerConfig), ``eval`` (EvalConfig), ``guidance`` (GuidanceConfig) and
``student`` (StudentConfig, with LoraConfig; docs/lora.md); methods build their optimizers from OptimizerConfig.
This module imports no method, so methods, data and conditioning can import it; reading a whole recipe (which
resolves the method by name) is :mod:`distill.recipe`, one layer above the methods.

The generic typed-dataclass validation is :mod:`distill.typed`. Each section is a dataclass with commented defaults.
Unknown keys, wrong types and impossible values are all collected into one :class:`~distill.errors.ConfigError`
that names each key and its valid choices, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import yaml

from distill.errors import DistillError
from distill.typed import INVALID, build, from_dict, to_plain

__all__ = ["OptimizerConfig", "DataConfig", "TrainerConfig", "EvalConfig", "GuidanceConfig", "LoraConfig",
           "StudentConfig", "from_dict", "to_plain", "parse_override", "apply_overrides"]


@dataclass
class OptimizerConfig:
    """AdamW for one trainable role."""

    lr: float = 1e-4  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up from 0 to lr over this many optimizer steps
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # after warm-up: constant, or decay to 0
    grad_clip: float | None = 1.0  # max global grad norm; null disables clipping

    def lr_at(self, local: int, length: int, peak: float | None = None) -> float:
        """The learning rate ``local`` steps into a cycle of ``length`` steps peaking at ``peak`` (default ``lr``):
        ``peak * min(1, (local + 1) / warmup_steps) * decay(local / length)``."""
        import math

        scale = min(1.0, (local + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.schedule == "linear":
            scale *= 1.0 - local / length
        elif self.schedule == "cosine":
            scale *= 0.5 * (1.0 + math.cos(math.pi * local / length))
        return (self.lr if peak is None else peak) * scale

    def check(self) -> list[str]:
        errs = []
        if self.lr < 0:
            errs.append(f"lr must be >= 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            errs.append(f"betas must lie in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0:
            errs.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            errs.append(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        return errs


LAYOUTS = ("image", "video", "audio")  # the sample layouts: (C, H, W), (C, F, H, W), (C, L)


@dataclass
class DataConfig:
    """Training samples. ``name``: a benchmark's dataset (``digits``, embedded), a local folder
    (``imagefolder``/saved dataset) or a hub name."""

    name: str = "digits"
    split: str = "train"
    image_column: str = "image"
    label_column: str | None = "label"  # class labels (a class-conditional teacher's conditioning)
    caption_column: str | None = None  # captions (a text-conditional teacher's conditioning), e.g. caption
    resolution: int | None = None  # resize + center-crop to this size; null keeps the dataset's size
    channels: int | None = None  # 1 (grayscale) or 3 (RGB); null keeps the dataset's channels
    hflip: bool = False  # random horizontal flips (never for digits)
    in_memory: bool | None = None  # decode every image once and keep it (null: when the dataset has <= 50,000 rows);
    # false: decode each batch's rows when it is drawn, latents and caption embeddings memory-mapped from the cache
    workers: int = 0  # processes that decode upcoming batches ahead of the trainer (data read lazily)
    layout: str = "image"  # each sample: image (C, H, W) | video (C, F, H, W) | audio (C, L)

    def check(self) -> list[str]:
        errs = []
        if self.layout not in LAYOUTS:
            errs.append(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "audio" and self.resolution is not None:
            errs.append("resolution resizes images and video frames; audio clips keep their length: set it to null")
        if self.layout == "audio" and self.hflip:
            errs.append("hflip mirrors images and video frames; an audio clip would play backwards: set it to false")
        if self.resolution is not None and self.resolution < 1:
            errs.append(f"resolution must be >= 1 or null, got {self.resolution}")
        if self.channels not in (None, 1, 3):
            errs.append(f"channels must be 1, 3 or null, got {self.channels}")
        if self.workers < 0:
            errs.append(f"workers must be >= 0, got {self.workers}")
        return errs


@dataclass
class TrainerConfig:
    """The shared loop. Steps count optimizer updates; one update sees batch_size x processes samples (the
    global batch), each process's batch split into grad_accum micro-batches."""

    max_steps: int | None = None  # null: the method decides (its iterations; phases x iterations), else 1000
    batch_size: int = 128  # per optimizer step and per process, before accumulation
    grad_accum: int = 1  # micro-batches per optimizer step (the batch is split into this many)
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = 500  # optimizer steps between checkpoints; 0 = only the final one
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 10  # steps between metrics.jsonl rows
    max_nonfinite_streak: int = 20  # stop after this many consecutive skipped (NaN/inf) steps
    threads: int | None = None  # torch CPU threads; null leaves torch's default
    progress: bool = True  # rich progress bar
    log_with: list[str] = field(default_factory=list)  # experiment trackers through accelerate: tensorboard, wandb,
    # ...; metrics.jsonl is always written
    teacher_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # the frozen teacher's weights (GPUs; students stay fp32)
    compile: str | None = None  # torch.compile backend for the trained networks and the teacher (inductor); null: off
    gradient_checkpointing: bool = False  # recompute activations in backward (large networks; trades time for memory)
    nonfinite_guard: Literal["auto", "sync", "device"] = "auto"  # how a NaN/inf update is skipped: "sync" reads one
    # flag per update on the host; "device" skips it on the device (fused AdamW, masked EMA) and reads the flags at
    # each metrics row, so a GPU step never waits for the host; "auto": device on CUDA, sync elsewhere
    fsdp: bool = False  # shard every network (the frozen teacher too) across the processes (FSDP2), not replicate them

    def check(self) -> list[str]:
        errs = []
        if self.max_steps is not None and self.max_steps < 1:
            errs.append(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1:
            errs.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.grad_accum < 1:
            errs.append(f"grad_accum must be >= 1, got {self.grad_accum}")
        elif self.batch_size % self.grad_accum:
            errs.append(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.checkpoint_every < 0:
            errs.append(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.keep_checkpoints < 1:
            errs.append(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.log_every < 1:
            errs.append(f"log_every must be >= 1, got {self.log_every}")
        if self.max_nonfinite_streak < 1:
            errs.append(f"max_nonfinite_streak must be >= 1, got {self.max_nonfinite_streak}")
        if self.threads is not None and self.threads < 1:
            errs.append(f"threads must be >= 1 or null, got {self.threads}")
        known = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")
        bad = [t for t in self.log_with if t not in known]
        if bad:
            errs.append(f"log_with: {', '.join(map(repr, bad))} not among accelerate's trackers ({', '.join(known)})")
        return errs


@dataclass
class EvalConfig:
    """Evaluation of the students a run exports (with the harness, rows in ``DIR/results.jsonl``)."""

    protocol: str | None = "digits"  # evals/protocols/<name>.yaml or a path; null = no evaluation
    n: int | None = None  # samples per point; null = the protocol's
    draws: int | None = None  # draws of n samples pooled into each point's headline FD; null = the protocol's
    steps: list[int] | None = None  # step counts for the final student; null = all it supports

    def check(self) -> list[str]:
        errs = []
        if self.n is not None and self.n < 2:
            errs.append(f"n must be >= 2 or null, got {self.n}")
        if self.draws is not None and self.draws < 1:
            errs.append(f"draws must be >= 1 or null, got {self.draws}")
        if self.steps is not None and (not self.steps or min(self.steps) < 1):
            errs.append(f"steps must be positive integers, got {self.steps}")
        return errs


@dataclass
class GuidanceConfig:
    """Classifier-free guidance of a conditional teacher (``w`` is diffusers' ``guidance_scale``; 1 = none)."""

    scale: float | None = None  # the teacher's w for the targets; null = no guidance. With range: the w at which
    # the w-conditioned student is evaluated and exported
    range: list[float] | None = None  # [w_min, w_max]: a w-conditioned student (guidance embedding); each sample
    # draws w uniformly from the range, for the teacher's targets and as the student's input
    embedding_dim: int = 256  # width of the student's guidance embedding (UNet: time_cond_proj_dim)
    embedding_lr_scale: float = 1.0  # the guidance embedding's learning rate as a multiple of its role's: a
    # w-student learns its response to w through these new layers alone (docs/teachers.md)

    @property
    def active(self) -> bool:
        return self.scale is not None or self.range is not None

    def check(self) -> list[str]:
        errs = []
        if self.scale is not None and self.scale < 0:
            errs.append(f"scale must be >= 0, got {self.scale}")
        if self.range is not None:
            if len(self.range) != 2 or not 0 <= self.range[0] <= self.range[1]:
                errs.append(f"range must be [w_min, w_max] with 0 <= w_min <= w_max, got {self.range}")
        if self.embedding_dim < 2 or self.embedding_dim % 2:
            errs.append(f"embedding_dim must be an even number >= 2, got {self.embedding_dim}")
        if not self.embedding_lr_scale > 0:
            errs.append(f"embedding_lr_scale must be > 0, got {self.embedding_lr_scale}")
        return errs


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2022) on the teacher's network instead of a full copy (docs/lora.md)."""

    rank: int = 16  # r: the adapters' inner width
    alpha: float | None = None  # scale alpha / rank on the adapters' output; null = rank (scale 1)
    target_modules: list[str] | None = None  # module names (or name suffixes, as peft matches them) to adapt;
    # null: the network class's attention and projection layers (distill.lora.DEFAULT_TARGETS)

    @property
    def scale_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def check(self) -> list[str]:
        errs = []
        if self.rank < 1:
            errs.append(f"rank must be >= 1, got {self.rank} (typical: 4 to 64)")
        if self.alpha is not None and self.alpha <= 0:
            errs.append(f"alpha must be > 0 or null (= rank), got {self.alpha}")
        if self.target_modules is not None and (not self.target_modules or not all(self.target_modules)):
            errs.append(f"target_modules must be a non-empty list of module names (e.g. [to_q, to_k, to_v, "
                        f"to_out.0]) or null for the network's defaults, got {self.target_modules}")
        return errs


@dataclass
class StudentConfig:
    """How a distillation student is built from its teacher."""

    lora: LoraConfig | dict[str, Any] | None = None  # null: a full copy of the teacher, every weight trained;
    # a LoraConfig mapping: the teacher's network with low-rank adapters, sharing its base weights
    init: str | None = None  # start the student from this pipeline folder's network (another student of the same
    # teacher, say a consistency student: DIR/model) instead of from the teacher; the teacher still teaches

    def check(self) -> list[str]:
        errs: list[str] = []
        if isinstance(self.lora, Mapping):  # it did not build as a LoraConfig: say why, key by key
            built = build(LoraConfig, self.lora, "lora", errs)
            if built is not INVALID and not errs:
                self.lora = built
        if self.init is not None and (not isinstance(self.init, str) or not self.init):
            errs.append(f"init: expected a pipeline folder (str), got {self.init!r}")
        elif self.init is not None and self.lora is not None:
            errs.append("init: a LoRA student starts as the teacher with zero adapters; start a full student from "
                        "another network (remove student.lora), or leave init out")
        return errs


# ----------------------------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value), the value read as YAML (``1e-3``, ``true``, ``[1, 2]``)."""
    if "=" not in text:
        raise DistillError(f"override {text!r} is not key=value (for example trainer.max_steps=50).")
    key, raw = text.split("=", 1)
    if not key or any(not k for k in key.split(".")):
        raise DistillError(f"override {text!r} has an empty key; write section.key=value.")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise DistillError(f"override {text!r}: the value is not valid YAML ({exc.problem}).") from exc
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for k in path[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[path[-1]] = value
    return data
