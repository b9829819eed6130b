"""What a teacher takes, made once from the training data: VAE latents, caption embeddings, class labels.

:func:`prepare` (data held in memory) and :class:`LazyRows` (data read batch by batch) turn the dataset's rows into
the teacher's inputs:

* a latent teacher (Stable Diffusion, SD3, DiT): ``image`` becomes the VAE latent of each image, encoded once with
  the teacher's own VAE and cached on disk, keyed by the VAE's weights hash and the data;
* a text teacher: each distinct caption of ``data.caption_column`` is encoded once by the teacher's own text
  encoders (cached, keyed by the encoders' hash and the captions) into a table; rows carry ``caption_index``
  into it, and batches gather ``encoder_hidden_states`` (plus ``pooled`` / ``time_ids``) from it;
* a class teacher: ``class_labels`` from ``data.label_column``.

Caches live in ``$DISTILL_CACHE`` (default ``~/.cache/distill``), one folder of ``.npy`` arrays per entry (plain
arrays, read with ``allow_pickle=False``: nothing is ever unpickled), written to a temporary folder and renamed, so
an interrupted write leaves no entry. Data held in memory loads them whole; lazily read data memory-maps them and
gathers each batch's rows. The VAE and the text encoders are loaded only here (and for evaluation), never trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from distill.config import DataConfig
from distill.errors import DistillError

CHUNK = 256  # rows encoded at a time when a cache is filled


def cache_root() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()[:20]


def cached_arrays(kind: str, key: str, n: int, chunks: Callable[[], Iterator[dict[str, torch.Tensor]]],
                  mmap: bool = False) -> dict[str, np.ndarray]:
    """``{name: (n, ...) array}`` stored as ``<cache>/<kind>/<key>/<name>.npy``; ``chunks()`` yields consecutive row
    chunks of every array (called only when the entry is missing or damaged). ``mmap``: memory-map instead of load."""
    folder = cache_root() / kind / key
    if folder.is_dir():
        try:
            return {p.stem: np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
                    for p in sorted(folder.glob("*.npy"))}
        except (OSError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)  # a damaged entry is recomputed
    tmp = folder.parent / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays: dict[str, np.ndarray] = {}
    row = 0
    for chunk in chunks():
        size = 0
        for name, t in chunk.items():
            a = t.detach().cpu().numpy()
            if name not in arrays:
                arrays[name] = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=a.dtype,
                                                         shape=(n, *a.shape[1:]))
            arrays[name][row : row + len(a)] = a
            size = len(a)
        row += size
    if row != n:
        raise DistillError(f"filling the {kind} cache gave {row} rows for {n}; the dataset changed while read.")
    for a in arrays.values():
        a.flush()
    del arrays
    try:
        os.replace(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process (a rank of the same run) filled it first
    return cached_arrays(kind, key, n, chunks, mmap)


def _check_image_shape(pipeline: Any, shape: tuple[int, ...]) -> None:
    makes = pipeline.expected_shape(shape, decoded=True)  # a video network takes clips of any length
    if tuple(shape) != makes:
        fix = "Set data.resolution / data.channels, or use data of the teacher's size."
        if len(shape) != len(makes):
            layout = {2: "audio", 3: "image", 4: "video"}.get(len(makes))
            fix = (f"Set data.layout to {layout} with data of that rank." if layout else
                   "Use data of the teacher's rank.")
        raise DistillError(f"the teacher {pipeline.folder} makes {'x'.join(map(str, makes))} samples through its VAE; "
                           f"the data's are {'x'.join(map(str, shape))}. {fix}")


def encode_latents(pipeline: Any, images: torch.Tensor) -> torch.Tensor:
    """The VAE latents of ``images`` (N, C, H, W) in [-1, 1], cached by VAE weights and image content."""
    _check_image_shape(pipeline, tuple(images.shape[1:]))
    key = _digest(pipeline.weights_hash("vae"), list(images.shape), images.numpy().tobytes())

    def chunks() -> Iterator[dict[str, torch.Tensor]]:
        for lo in range(0, len(images), CHUNK):
            yield {"latents": pipeline.encode_images(images[lo : lo + CHUNK])}

    return torch.from_numpy(cached_arrays("latents", key, len(images), chunks)["latents"])


def encode_captions(pipeline: Any, captions: list[str], mmap: bool = False) -> dict[str, Any]:
    """The teacher's conditioning for each caption (N rows), cached by text encoders and captions."""
    key = _digest(pipeline.text_hash(), captions)

    def chunks() -> Iterator[dict[str, torch.Tensor]]:
        for lo in range(0, len(captions), CHUNK):
            yield pipeline.encode_prompts(captions[lo : lo + CHUNK])

    arrays = cached_arrays("text", key, len(captions), chunks, mmap)
    return arrays if mmap else {k: torch.from_numpy(v) for k, v in arrays.items()}


def _captions(dataset: Any, cfg: DataConfig, pipeline: Any) -> tuple[list[str], torch.Tensor]:
    """(distinct captions sorted, each row's index into them)."""
    col = cfg.caption_column
    if col is None or col not in dataset.column_names:
        raise DistillError(f"the teacher {pipeline.folder} is text-conditional and the dataset {cfg.name!r} has "
                           f"no caption column{f' {col!r}' if col else ''}; set data.caption_column to one of "
                           f"{', '.join(dataset.column_names)}.")
    captions = [str(c) for c in dataset[col]]
    distinct = sorted(set(captions))
    where = {c: i for i, c in enumerate(distinct)}
    return distinct, torch.tensor([where[c] for c in captions], dtype=torch.long)


def _class_labels(labels: torch.Tensor | None, cfg: DataConfig, dataset: Any, pipeline: Any) -> torch.Tensor:
    if labels is None:
        col = cfg.label_column
        raise DistillError(f"the teacher {pipeline.folder} is class-conditional and the dataset {cfg.name!r} has "
                           f"no label column{f' {col!r}' if col else ''}; set data.label_column to one of "
                           f"{', '.join(dataset.column_names)}.")
    n = pipeline.num_classes
    if n is not None and (labels.min() < 0 or labels.max() >= n):
        raise DistillError(f"data labels lie in {int(labels.min())}..{int(labels.max())}; the teacher has {n} classes.")
    return labels


def prepare(dataset: Any, cfg: DataConfig, pipeline: Any, rows: dict[str, torch.Tensor]
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(rows, tables)`` for the teacher ``pipeline`` from rows held in memory; see the module docstring."""
    rows = dict(rows)
    if pipeline.spec.latent:
        if cfg.hflip:
            raise DistillError("data.hflip with a latent teacher: latents are encoded once and cached, so images "
                               "cannot be flipped per batch. Set data.hflip: false.")
        rows["image"] = encode_latents(pipeline, rows["image"])
    tables: dict[str, torch.Tensor] = {}
    if pipeline.conditioning == "text" or (pipeline.spec.latent and pipeline.conditioning is None):
        rows.pop("label", None)  # not an input of these teachers (and not read when data is read lazily)
    if pipeline.conditioning == "text":
        distinct, rows["caption_index"] = _captions(dataset, cfg, pipeline)
        tables = encode_captions(pipeline, distinct)
    elif pipeline.conditioning == "class":
        rows["class_labels"] = _class_labels(rows.pop("label", None), cfg, dataset, pipeline)
    return rows, tables


class LazyRows:
    """The teacher's inputs for data too large to hold in memory: latents and caption tables are filled into the
    cache once (a pass over the data, ``CHUNK`` rows at a time) and memory-mapped; ``get(idx)`` gathers rows.

    The cache key of a lazily read dataset is its ``datasets`` fingerprint (stable for a dataset loaded from disk
    or the hub) with the data settings, not a hash of every decoded image."""

    def __init__(self, dataset: Any, cfg: DataConfig, pipeline: Any, decode: Callable[[list[int]], dict]) -> None:
        self.pipeline, self.decode = pipeline, decode
        self.latents: np.ndarray | None = None
        self.tables: dict[str, np.ndarray] = {}
        self.caption_index: torch.Tensor | None = None
        self.labels = pipeline.conditioning == "class"
        n = len(dataset)
        fingerprint = getattr(dataset, "_fingerprint", None)
        if pipeline.spec.latent:
            if cfg.hflip:
                raise DistillError("data.hflip with a latent teacher: latents are encoded once and cached, so images "
                                   "cannot be flipped per batch. Set data.hflip: false.")
            if fingerprint is None:
                raise DistillError(f"dataset {cfg.name!r} has no fingerprint to key its latent cache; load it from disk "
                                   "or the hub, or hold it in memory (data.in_memory: true).")
            _check_image_shape(pipeline, tuple(decode([0])["image"].shape[1:]))
            settings = {k: getattr(cfg, k) for k in ("name", "split", "image_column", "resolution", "channels")}
            key = _digest(pipeline.weights_hash("vae"), fingerprint, settings, n)

            def chunks() -> Iterator[dict[str, torch.Tensor]]:
                for lo in range(0, n, CHUNK):
                    images = decode(list(range(lo, min(lo + CHUNK, n))))["image"]
                    yield {"latents": pipeline.encode_images(images)}

            self.latents = cached_arrays("latents", key, n, chunks, mmap=True)["latents"]
        if pipeline.conditioning == "text":
            distinct, self.caption_index = _captions(dataset, cfg, pipeline)
            self.tables = encode_captions(pipeline, distinct, mmap=True)
        elif self.labels:
            _class_labels(decode([0]).get("label"), cfg, dataset, pipeline)

    def get(self, idx: list[int]) -> dict[str, torch.Tensor]:
        out = self.decode(idx) if self.latents is None or self.labels else {}
        if self.latents is not None:
            out["image"] = torch.from_numpy(np.ascontiguousarray(self.latents[idx]))
        if self.labels:
            out["class_labels"] = out.pop("label")
        if self.caption_index is not None:
            rows = self.caption_index[idx].numpy()
            out.update({k: torch.from_numpy(np.ascontiguousarray(v[rows])) for k, v in self.tables.items()})
        return out
