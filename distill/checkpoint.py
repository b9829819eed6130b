"""Checkpoints as safetensors + JSON, written atomically, verified by hashes on load.

Layout of ``checkpoints/step-00000500/``::

    modules/<name>.safetensors   every trainable role and EMA network (state dicts; of a LoRA student only what
                                 is not the teacher's shared base: adapters, new layers)
    optim/<role>.safetensors     optimizer tensors (exp_avg, ...), keyed "<param index>.<name>"
    optim/<role>.json            optimizer param groups and non-tensor state
    rng.safetensors              torch CPU (and CUDA) generator states
    state.json                   step, data position, python RNG, the method's own state
    manifest.json                sha256 of every file above; written last

accelerate's ``save_state`` would pickle optimizer and RNG state (``torch.save``); distill keeps to
safetensors and JSON so that loading a checkpoint never unpickles anything.
A checkpoint is written under ``.tmp-step-...`` and renamed into place when complete, so a crash mid-write
never leaves a half-written folder under a checkpoint's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Collection

import torch
from safetensors.torch import load_file, save_file

from distill.errors import DistillError

PREFIX = "step-"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone keeps EMA/student copies independent
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def module_state(module: torch.nn.Module, shared: Collection[int] = ()) -> dict[str, torch.Tensor]:
    """``module``'s state dict without the tensors in ``shared`` (ids: a LoRA student's frozen base, which is the
    teacher's and is read from the teacher's folder, not from checkpoints)."""
    if not shared:
        return module.state_dict()
    return {k: v.detach() for k, v in module.state_dict(keep_vars=True).items() if id(v) not in shared}


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], shared: Collection[int] = ()) -> None:
    """Load a :func:`module_state` back: every entry but the shared tensors' must be there (RuntimeError if not)."""
    if not shared:
        module.load_state_dict(state)
        return
    skip = {k for k, v in module.state_dict(keep_vars=True).items() if id(v) in shared}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skip]
    if missing or unexpected:
        raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def optimizer_to_files(opt: torch.optim.Optimizer | dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return _contiguous(tensors), {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    root: Path,
    step: int,
    modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
    optimizers: dict[str, torch.optim.Optimizer | dict[str, Any]],
    state: dict[str, Any],
    keep: int,
    shared: Collection[int] = (),
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep the newest ``keep`` complete ones. ``shared``: ids
    of tensors left out of the module files (:func:`module_state`). A module or optimizer may be given as its state
    dict already (a sharded run's, gathered whole: :mod:`distill.sharding`)."""
    states = {name: m if isinstance(m, dict) else module_state(m, shared) for name, m in modules.items()}
    for name, sd in states.items():
        bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise DistillError(f"refusing to checkpoint step {step}: {name} has non-finite values in {bad[:3]}; "
                               "the previous checkpoint is kept.")
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "modules").mkdir(parents=True)
    (tmp / "optim").mkdir()
    try:
        for name, sd in states.items():
            save_file(_contiguous(sd), str(tmp / "modules" / f"{name}.safetensors"))
        for name, opt in optimizers.items():
            tensors, meta = optimizer_to_files(opt)
            save_file(tensors, str(tmp / "optim" / f"{name}.safetensors"))
            (tmp / "optim" / f"{name}.json").write_text(json.dumps(meta))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            # the current device's generator: every rank uses its own device, seeded alike (one shared stream)
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): _sha256(p) for p in files}
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": manifest}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DistillError(
            f"could not write checkpoint {final} ({exc.strerror or exc}); the previous checkpoint is kept. "
            "Free disk space or point --out elsewhere, then run the same command again to resume."
        ) from exc
    complete = list_checkpoints(root)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (those with a manifest), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def verify(ckpt: Path) -> None:
    """Raise DistillError if any file of ``ckpt`` is missing or differs from the hash recorded at save."""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DistillError(f"checkpoint {ckpt} has an unreadable manifest: {exc}") from exc
    for rel, digest in manifest["files"].items():
        p = ckpt / rel
        if not p.is_file() or _sha256(p) != digest:
            raise DistillError(f"checkpoint {ckpt} is damaged: {rel} is missing or does not match its recorded hash.")


def load_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Verified contents: ``modules`` {name: state dict}, ``optimizers`` {role: state dict}, ``rng``, ``state``."""
    verify(ckpt)
    try:  # safetensors parses tensors only; a pickle under a .safetensors name fails here, unexecuted
        modules = {p.stem: load_file(str(p)) for p in sorted((ckpt / "modules").glob("*.safetensors"))}
        optimizers = {}
        for p in sorted((ckpt / "optim").glob("*.safetensors")):
            meta = json.loads(p.with_suffix(".json").read_text())
            optimizers[p.stem] = optimizer_from_files(load_file(str(p)), meta)
        return {
            "modules": modules,
            "optimizers": optimizers,
            "rng": load_file(str(ckpt / "rng.safetensors")),
            "state": json.loads((ckpt / "state.json").read_text()),
        }
    except Exception as exc:  # SafetensorError, JSONDecodeError, KeyError...
        raise DistillError(f"checkpoint {ckpt} cannot be read as safetensors + JSON ({type(exc).__name__}: {exc}).") from exc
