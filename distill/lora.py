"""LoRA students (``student.lora``): the teacher's network with low-rank adapters, sharing its base weights.

A LoRA student (Hu et al. 2022; LCM-LoRA, Luo et al. 2023) is not a copy of the teacher. Its network is a
*structural* copy of the teacher's: new module objects that hold the very same weight tensors (one copy in
memory), into which peft injects adapters ``W x + (alpha / r) B A x`` on the target layers (``B = 0`` at first,
so the student starts as its teacher). The teacher keeps its own, untouched module objects, so the teacher's
forward is the un-adapted network exactly, with nothing to switch on or off, and the adapters are the student's
own parameters. The base weights are frozen; the adapters and any new layers a guidance-embedded student adds
(the UNet's ``time_embedding.cond_proj``, a transformer's ``guidance_embedder``) are trained in full.

Further networks a method keeps follow the same rule (:meth:`~distill.methods.Method.copy_net`): an EMA target
(consistency) or an EMA of the student is a copy of the adapters on the shared base; progressive distillation's
later phase teachers are frozen copies of the previous phase's adapters; DMD2's fake denoiser gets its own adapters
(:meth:`~distill.methods.Method.new_adapter`, same rank and targets, trained by its own optimizer) and the
adversarial discriminator's backbone is the teacher's un-adapted network. Checkpoints hold only what is not
shared: the adapters, new layers, heads, optimizers and the method's state (the teacher's folder holds the rest).

Export (:func:`save_lora`) writes, beside the fused pipeline folder (adapters merged into a copy of the network,
:func:`merged`), ``lora/``: ``pytorch_lora_weights.safetensors`` in the layout ``pipe.load_lora_weights(dir)``
reads (peft's state dict through the pipeline's own ``save_lora_weights``, with the adapter config as metadata so
``alpha`` survives), ``scheduler_config.json`` (the stock scheduler to swap in, as for LCM-LoRA) and
``distill.json``. :func:`distill.models.lora_model` loads such a folder on distill's side for the parity check.
"""

from __future__ import annotations

import copy
import inspect
import json
import shutil
import warnings
from itertools import chain
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from distill.errors import DistillError

ADAPTER = "default"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

# The adapted layers when target_modules is null: attention projections (and the transformer blocks' in/out and
# feed-forward projections), as diffusers' LoRA training scripts and LCM-LoRA choose them. The digits-sized
# UNet2DModel has attention at one resolution only, so its resnet convolutions are adapted too.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "UNet2DConditionModel": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    "SD3Transformer2DModel": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                              "to_add_out"),
    "UNet2DModel": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"),
    "Transformer2DModel": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    "DiTTransformer2DModel": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
}
_ADAPTABLE = (nn.Linear, nn.Conv2d)


# ---------------------------------------------------------------------------------------------- sharing


def base_tensors(module: nn.Module) -> dict[int, torch.Tensor]:
    """``{id: tensor}`` of every parameter and buffer of ``module``: the memo that makes a deep copy share them."""
    return {id(t): t for t in chain(module.parameters(), module.buffers())}


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with new module objects holding the same parameter and buffer tensors."""
    return copy.deepcopy(module, base_tensors(module))


def _rebuild_with_guidance(net: nn.Module, dim: int) -> nn.Module:
    """A ``UNet2DConditionModel`` like ``net`` with ``time_cond_proj_dim = dim`` (a guidance input, LCM's
    ``w`` embedding) whose every other tensor is ``net``'s own; the new ``cond_proj`` starts at zero."""
    config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = dim
    new = type(net)(**config).to(next(net.parameters()).device)
    own = dict(chain(net.named_parameters(), net.named_buffers()))
    for name, t in chain(list(new.named_parameters()), list(new.named_buffers())):
        if name in own:
            mod, _, leaf = name.rpartition(".")
            holder = new.get_submodule(mod)
            table = holder._parameters if leaf in holder._parameters else holder._buffers
            table[leaf] = own[name]
        elif "cond_proj" not in name:
            raise DistillError(f"cannot add a guidance input to this UNet: {name} has no counterpart in the teacher.")
    nn.init.zeros_(new.time_embedding.cond_proj.weight)
    return new


# ---------------------------------------------------------------------------------------------- targets


def default_targets(net: nn.Module) -> tuple[str, ...]:
    kind = type(net).__name__
    if kind not in DEFAULT_TARGETS:
        raise DistillError(f"student.lora has no default target modules for {kind}; name them with "
                           f"student.lora.target_modules (its layers: {', '.join(adaptable_names(net)[:12])}, ...).")
    return DEFAULT_TARGETS[kind]


def adaptable_names(net: nn.Module) -> list[str]:
    """The distinct last name parts of ``net``'s Linear and Conv2d layers (``to_q``, ``conv1``, ``0``...)."""
    seen: dict[str, None] = {}
    for name, m in net.named_modules():
        if isinstance(m, _ADAPTABLE):
            parts = name.split(".")
            leaf = ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
            seen.setdefault(leaf, None)
    return list(seen)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of names


def match_targets(net: nn.Module, targets: list[str] | tuple[str, ...], explicit: bool) -> list[str]:
    """The names of ``net``'s modules that ``targets`` adapt; a DistillError when a target the user named matches
    nothing (a typo would otherwise train nothing there), when defaults match nothing, or when a match is a layer
    LoRA cannot adapt."""
    found: list[str] = []
    unmatched = []
    for t in targets:
        hits = [n for n, _ in net.named_modules() if _matches(n, t)]
        if not hits:
            unmatched.append(t)
        found.extend(hits)
    kind = type(net).__name__
    choices = ", ".join(adaptable_names(net))
    if (explicit and unmatched) or not found:
        raise DistillError(f"student.lora.target_modules: {', '.join(unmatched)} match no module of the teacher's "
                           f"{kind}. Name its Linear/Conv2d layers (by their last name parts: {choices}), or set "
                           "target_modules: null for the defaults.")
    modules = dict(net.named_modules())
    bad = sorted({type(modules[n]).__name__ for n in found if not isinstance(modules[n], _ADAPTABLE)})
    if bad:
        raise DistillError(f"student.lora.target_modules: {', '.join(targets)} match {', '.join(bad)} modules of the "
                           f"{kind}; LoRA adapts Linear and Conv2d layers only ({choices}).")
    return sorted(set(found))


# ---------------------------------------------------------------------------------------------- students


def peft_config(settings: Any, targets: list[str] | tuple[str, ...]) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=settings.rank, lora_alpha=settings.scale_alpha, target_modules=list(targets),
                          init_lora_weights=True)


def lora_student(teacher: nn.Module, settings: Any, guidance_dim: int | None = None) -> nn.Module:
    """A LoRA student of ``teacher`` (a :class:`~distill.denoisers.DiffusersDenoiser`): a structural copy sharing
    every tensor of the teacher, adapters injected on the target layers (``settings``: a
    :class:`~distill.config.LoraConfig`), only adapters and new layers trainable. ``guidance_dim``: also take
    ``guidance=w`` as an input (as :func:`distill.guidance.add_guidance_input`), the new layers trained in full."""
    from peft import inject_adapter_in_model

    from distill.denoisers import DiffusersDenoiser
    from distill.denoisers import timestep_embedders
    from distill.guidance import GuidanceEmbedder, is_guidance_layer

    if not isinstance(teacher, DiffusersDenoiser):
        raise DistillError(f"student.lora adapts a diffusers teacher network, got {type(teacher).__name__}.")
    if teacher.takes_guidance:
        raise DistillError("student.lora: the teacher already takes a guidance input (a guidance-embedded student); "
                           "distill a plain diffusion teacher.")
    student = shared_copy(teacher)
    net = student.net
    kind = type(net).__name__
    explicit = settings.target_modules is not None
    targets = list(settings.target_modules) if explicit else list(default_targets(net))
    match_targets(net, targets, explicit)
    if guidance_dim is not None:
        if kind == "UNet2DConditionModel":
            student.net = net = _rebuild_with_guidance(net, guidance_dim)
        elif kind in ("SD3Transformer2DModel", "Transformer2DModel", "DiTTransformer2DModel"):
            width = timestep_embedders(net)[0].linear_2.out_features
            student.guidance_embedder = GuidanceEmbedder(guidance_dim, width).to(next(net.parameters()).device)
            student.attach_guidance_hooks()
        else:
            raise DistillError(f"distill has no guidance embedding for {kind}; use a fixed guidance scale "
                               "(guidance.range: null).")
    student.requires_grad_(False)  # the base: frozen (the same tensors as the teacher's)
    try:
        inject_adapter_in_model(peft_config(settings, targets), net, adapter_name=ADAPTER)
    except (ValueError, TypeError) as exc:
        raise DistillError(f"student.lora: peft cannot adapt the {kind} with target_modules {targets}: {exc}") from exc
    for name, p in student.named_parameters():
        p.requires_grad_(".lora_" in name or is_guidance_layer(name))
    return student.train()


def is_lora(module: nn.Module) -> bool:
    """Whether ``module`` holds LoRA adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def network_of(denoiser: nn.Module) -> nn.Module:
    """The diffusers network inside a denoiser (or a consistency denoiser around one)."""
    inner = getattr(denoiser, "inner", denoiser)
    return inner.net


@torch.no_grad()
def merged(denoiser: nn.Module) -> nn.Module:
    """A full copy of a LoRA denoiser with its adapters merged into the weights and removed: a plain network that
    ``save_pretrained`` writes as the teacher's class (the fused export), in fp32 like every exported student
    (whatever ``trainer.teacher_dtype`` made of the shared base). The student itself is left as it is."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(denoiser).float()
    net = network_of(out)
    for name, m in list(net.named_modules()):
        if isinstance(m, BaseTunerLayer):
            m.merge(adapter_names=[ADAPTER])
            parent, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(parent), leaf, m.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in net.__dict__:
            delattr(net, attr)
    return out


def trainable_count(module: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts of ``module``, shared tensors counted once."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------- export


def _network_folder(source: Path) -> tuple[str, dict[str, Any]]:
    from distill.pipelines import NETWORK_FOLDERS

    index = json.loads((source / "model_index.json").read_text())
    name = next((k for k in NETWORK_FOLDERS if isinstance(index.get(k), list) and index[k][0] is not None), None)
    if name is None:
        raise DistillError(f"{source}/model_index.json names no unet or transformer.")
    return name, index


def _save_fn(class_name: str, net_name: str) -> Any:
    """The pipeline class's ``save_lora_weights`` when it takes ``<net>_lora_layers`` (None for pipelines diffusers
    has no LoRA loader for: DDPMPipeline, DiTPipeline)."""
    import diffusers

    cls = getattr(diffusers, class_name, None)
    fn = getattr(cls, "save_lora_weights", None)
    if fn is None or f"{net_name}_lora_layers" not in inspect.signature(fn).parameters:
        return None
    return fn


def save_lora(denoiser: nn.Module, folder: str | Path, info: Mapping[str, Any], scheduler_config: Path,
              teacher: str | None = None) -> Path | None:
    """Write a LoRA student's adapters as a folder stock diffusers loads onto its teacher (see the module
    docstring); returns it, or None (with a warning) for a guidance-embedded student, whose new embedding layers
    are no low-rank change of the teacher: its fused pipeline is its export."""
    from peft.utils import get_peft_model_state_dict

    inner = getattr(denoiser, "inner", denoiser)
    if getattr(inner, "takes_guidance", False):
        warnings.warn("a guidance-embedded LoRA student (guidance.range) is exported fused only: its guidance "
                      "embedding is a new layer, which a LoRA file applied to the teacher cannot carry.", stacklevel=2)
        return None
    if inner.source is None or not (Path(inner.source) / "model_index.json").is_file():
        raise DistillError("a LoRA student is exported against its teacher's pipeline folder; the denoiser does not "
                           "know the folder it came from.")
    source = Path(inner.source)
    net_name, index = _network_folder(source)
    net = inner.net
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(net, adapter_name=ADAPTER).items()}
    meta = net.peft_config[ADAPTER].to_dict()
    meta = {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    save = _save_fn(index["_class_name"], net_name)
    if save is not None:
        save(folder, **{f"{net_name}_lora_layers": state, f"{net_name}_lora_adapter_metadata": meta},
             safe_serialization=True)
    else:  # the same file layout, for peft or distill to apply
        from safetensors.torch import save_file

        save_file({f"{net_name}.{k}": v for k, v in state.items()}, str(folder / WEIGHTS_NAME),
                  metadata={"format": "pt", METADATA_KEY: json.dumps({f"{net_name}.{k}": v for k, v in meta.items()})})
    shutil.copy(scheduler_config, folder / "scheduler_config.json")
    targets = sorted(meta["target_modules"])
    out = {**info, "teacher": teacher or str(source), "pipeline": index["_class_name"], "network": net_name,
           "lora": {"rank": int(meta["r"]), "alpha": float(meta["lora_alpha"]), "target_modules": targets,
                    "weights": WEIGHTS_NAME, "stock_loader": save is not None}}
    (folder / "distill.json").write_text(json.dumps(out, indent=1))
    return folder


def is_lora_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / WEIGHTS_NAME).is_file() and not (folder / "model_index.json").is_file()


def folder_meta(folder: Path) -> dict[str, Any]:
    path = folder / "distill.json"
    if not path.is_file():
        raise DistillError(f"{folder} has no distill.json: it was not written by distill's LoRA export.")
    return json.loads(path.read_text())
