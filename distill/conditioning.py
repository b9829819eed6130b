"""What a teacher takes, made once from the training data: VAE latents, caption embeddings, class labels.

``prepare(dataset, cfg, pipeline, rows)`` turns decoded rows (``image`` (N, C, H, W) in [-1, 1], ``label``) into
the teacher's inputs:

* a latent teacher (Stable Diffusion, SD3, DiT): ``image`` becomes the VAE latent of each image, encoded once with
  the teacher's own VAE and cached on disk, keyed by the VAE's weights hash and the images' content;
* a text teacher: each distinct caption of ``data.caption_column`` is encoded once by the teacher's own text
  encoders (cached, keyed by the encoders' hash and the captions) into a table; rows carry ``caption_index``
  into it, and batches gather ``encoder_hidden_states`` (plus ``pooled`` / ``time_ids``) from it;
* a class teacher: ``class_labels`` from ``data.label_column``.

Caches live in ``$DISTILL_CACHE`` (default ``~/.cache/distill``) as safetensors. The VAE and the text encoders
are loaded only here (and for evaluation), never trained.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from distill.config import DataConfig
from distill.errors import DistillError


def cache_root() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _cached(kind: str, key: str, make: Any) -> dict[str, torch.Tensor]:
    """``make()`` (a dict of tensors), stored as ``<cache>/<kind>/<key>.safetensors``; read back when present."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    path = cache_root() / kind / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError):
            pass  # a damaged entry is recomputed
    out = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp))
    os.replace(tmp, path)
    return out


def encode_latents(pipeline: Any, images: torch.Tensor) -> torch.Tensor:
    """The VAE latents of ``images`` (N, C, H, W) in [-1, 1], cached by VAE weights and image content."""
    c, h, w = pipeline.image_shape
    if tuple(images.shape[1:]) != (c, h, w):
        raise DistillError(f"the teacher {pipeline.folder} makes {c}x{h}x{w} images through its VAE; the data's are "
                           f"{'x'.join(map(str, images.shape[1:]))}. Set data.resolution / data.channels, or use "
                           "data of the teacher's size.")
    key = _digest(pipeline.weights_hash("vae"), list(images.shape), images.numpy().tobytes())
    return _cached("latents", key, lambda: {"latents": pipeline.encode_images(images)})["latents"]


def encode_captions(pipeline: Any, captions: list[str]) -> dict[str, torch.Tensor]:
    """The teacher's conditioning for each caption (N rows), cached by text encoders and captions."""
    key = _digest(pipeline.text_hash(), captions)
    return _cached("text", key, lambda: pipeline.encode_prompts(captions))


def prepare(dataset: Any, cfg: DataConfig, pipeline: Any, rows: dict[str, torch.Tensor]
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(rows, tables)`` for the teacher ``pipeline``; see the module docstring."""
    rows = dict(rows)
    if pipeline.spec.latent:
        if cfg.hflip:
            raise DistillError("data.hflip with a latent teacher: latents are encoded once and cached, so images "
                               "cannot be flipped per batch. Set data.hflip: false.")
        rows["image"] = encode_latents(pipeline, rows["image"])
    tables: dict[str, torch.Tensor] = {}
    kind = pipeline.conditioning
    if kind == "text":
        col = cfg.caption_column
        if col is None or col not in dataset.column_names:
            raise DistillError(f"the teacher {pipeline.folder} is text-conditional and the dataset {cfg.name!r} has "
                               f"no caption column{f' {col!r}' if col else ''}; set data.caption_column to one of "
                               f"{', '.join(dataset.column_names)}.")
        captions = [str(c) for c in dataset[col]]
        distinct = sorted(set(captions))
        where = {c: i for i, c in enumerate(distinct)}
        rows["caption_index"] = torch.tensor([where[c] for c in captions], dtype=torch.long)
        tables = encode_captions(pipeline, distinct)
    elif kind == "class":
        if "label" not in rows:
            col = cfg.label_column
            raise DistillError(f"the teacher {pipeline.folder} is class-conditional and the dataset {cfg.name!r} has "
                               f"no label column{f' {col!r}' if col else ''}; set data.label_column to one of "
                               f"{', '.join(dataset.column_names)}.")
        labels = rows.pop("label")
        n = pipeline.num_classes
        if n is not None and (labels.min() < 0 or labels.max() >= n):
            raise DistillError(f"data labels lie in {int(labels.min())}..{int(labels.max())}; the teacher has {n} "
                               "classes.")
        rows["class_labels"] = labels
    return rows, tables
