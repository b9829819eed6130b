"""A model under test or in use, as one value: :class:`Model` wraps a pipeline folder (a teacher, a student with its
``distill.json``, or a LoRA folder applied to its teacher), a denoiser module, or a sampler function.

The evaluation harness, ``distill sample`` and the export's parity check all open models here, so what a
student's ``distill.json`` means (its sampler, step counts, sigma grids, guidance) is read in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from distill.config import LoraConfig
from distill.denoisers import ConsistencyDenoiser, DiffusersDenoiser
from distill.errors import DistillError
from distill.hub import resolve_model_path
from distill.lora import ADAPTER, folder_meta, peft_config
from distill.pipelines import CONSISTENCY_SCHEDULERS, load_kwargs, load_pipeline

STUDENT_META = "distill.json"
TEACHER_SAMPLERS = ("ddim", "euler", "heun")


@dataclass
class Model:
    """What the harness needs to know about a model under test."""

    name: str
    method: str = "teacher"
    recipe: str | None = None
    denoiser: Any = None  # D(x, sigma) -> x0
    sampler_fn: Callable[..., torch.Tensor] | None = None  # fn(noise, steps, generators) -> images
    samplers: tuple[str, ...] = TEACHER_SAMPLERS  # default samplers
    steps: tuple[int, ...] | None = None  # step counts a student supports; None = any
    sigmas: dict[int, list[float]] = field(default_factory=dict)  # explicit student grids by step count
    pipeline: Any = None  # its TeacherPipeline (distill.pipelines) when it is a pipeline folder
    guidance: float | None = None  # a student's own guidance scale (distill.json), None when it needs none


def open_model(model: Any, name: str | None = None) -> Model:
    """Wrap a folder / hub id, a denoiser module, or a sampler function as a :class:`Model`."""
    if isinstance(model, (str, Path)):
        path = resolve_model_path(model)
        pipeline = load_pipeline(path)
        D = pipeline.load_denoiser().eval()
        meta_path = path / STUDENT_META
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError as exc:
                raise DistillError(f"{meta_path} is not valid JSON ({exc}); re-export the student.") from exc
            sampler = meta.get("sampler", "ddim")
            return Model(
                name=name or meta.get("name") or path.name, method=meta.get("method", "student"),
                recipe=meta.get("recipe"), denoiser=D, samplers=(sampler,),
                steps=tuple(int(s) for s in meta["steps"]) if meta.get("steps") else None,
                sigmas={int(k): v for k, v in (meta.get("sigmas") or {}).items()},
                pipeline=pipeline, guidance=meta.get("guidance"),
            )
        return Model(name=name or _model_name(path), denoiser=D, pipeline=pipeline)
    if isinstance(model, torch.nn.Module) or hasattr(model, "sigma_max"):
        return Model(name=name or type(model).__name__, denoiser=model)
    if callable(model):
        return Model(name=name or getattr(model, "__name__", "sampler"), method="custom", sampler_fn=model,
                     samplers=("custom",))
    raise DistillError(f"cannot evaluate a {type(model).__name__}; give a model folder, a denoiser or a sampler function.")


def _model_name(path: Path) -> str:
    # DIR/model of a run is named after the run folder
    return path.parent.name if path.name == "model" else path.name


def stock_lora_pipeline(folder: str | Path, teacher: str | Path | None = None) -> Any:
    """The stock pipeline a user builds from a LoRA folder, as an LCM-LoRA is used: the teacher's pipeline
    (``teacher``, default the one distill.json names), ``load_lora_weights(folder)``, and the scheduler of
    ``folder/scheduler_config.json``."""
    import diffusers
    from diffusers import DiffusionPipeline


    folder = Path(folder)
    meta = folder_meta(folder)
    teacher = teacher or meta["teacher"]
    if not meta["lora"].get("stock_loader", True):
        raise DistillError(f"{meta['pipeline']} has no LoRA loader in diffusers (load_lora_weights); load the fused "
                           "pipeline folder instead, or apply the file with distill.models.lora_model.")
    pipe = DiffusionPipeline.from_pretrained(teacher, **load_kwargs(teacher))
    pipe.load_lora_weights(folder)
    sched_cfg = json.loads((folder / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_pretrained(folder)
    return pipe


def lora_model(folder: str | Path, teacher: str | Path | None = None) -> Any:
    """A LoRA folder on distill's side, for the harness and the parity check: the teacher's denoiser with the
    folder's adapters injected by peft (not by diffusers' loader) under the folder's scheduler, as a
    :class:`Model`."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file


    folder = Path(folder)
    meta = folder_meta(folder)
    pipeline = load_pipeline(teacher or meta["teacher"])
    net = pipeline.load_network()
    lora = meta["lora"]
    settings = LoraConfig(rank=lora["rank"], alpha=lora["alpha"], target_modules=lora["target_modules"])
    inject_adapter_in_model(peft_config(settings, settings.target_modules), net, adapter_name=ADAPTER)
    prefix = meta["network"] + "."
    state = {k[len(prefix):]: v for k, v in load_file(str(folder / lora["weights"])).items() if k.startswith(prefix)}
    result = set_peft_model_state_dict(net, state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing or not state:
        raise DistillError(f"{folder / lora['weights']} does not fit the teacher's {type(net).__name__} (unexpected "
                           f"{result.unexpected_keys[:3]}, missing {missing[:3]}).")
    net.eval().requires_grad_(False)
    sched = json.loads((folder / "scheduler_config.json").read_text())
    D: nn.Module = DiffusersDenoiser(net, sched, source=pipeline.folder)
    if sched.get("_class_name") in CONSISTENCY_SCHEDULERS:
        D = ConsistencyDenoiser(D, sched.get("timestep_scaling", 10.0))
    return Model(name=meta.get("name") or folder.name, method=meta.get("method", "student"), recipe=meta.get("recipe"),
                 denoiser=D, samplers=(meta.get("sampler", "ddim"),),
                 steps=tuple(int(s) for s in meta["steps"]) if meta.get("steps") else None,
                 sigmas={int(k): v for k, v in (meta.get("sigmas") or {}).items()}, pipeline=pipeline,
                 guidance=meta.get("guidance"))
