"""Training data as Hugging Face ``datasets``: a benchmark's dataset (the embedded digits), local folders, or a hub
dataset.

Everything is served as float images in [-1, 1] of shape (C, H, W) under ``image`` and an int ``label`` when
the dataset has one. ``ImageBatches`` turns a dataset into deterministic, resumable batches: the order of
epoch ``e`` is a permutation drawn from ``seed + e``, so a position ``(epoch, offset)`` names the next batch.

Given the teacher's pipeline (:class:`~distill.pipelines.TeacherPipeline`), ``ImageBatches`` also serves what the
teacher needs (:mod:`distill.conditioning`): a latent teacher's ``image`` is the VAE latent of each image, encoded
once and cached; a text teacher's batches carry the caption's embeddings (``encoder_hidden_states``, ``pooled``,
``time_ids``), each distinct caption encoded once by the teacher's own text encoders and cached; a class teacher's
carry ``class_labels``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from distill.config import DataConfig
from distill.errors import DistillError
from distill.hub import hub_offline
from distill.tensors import append_dims

SAMPLE_DIMS = {"image": 2, "video": 3, "audio": 1}  # axes after the channels, by data.layout
SHAPES = {"image": "(C, H, W)", "video": "(C, F, H, W)", "audio": "(C, L)"}


def load_dataset(cfg: DataConfig):
    """The ``datasets.Dataset`` named by ``cfg``: a benchmark's dataset (``digits``, ``text-digits``, or a registered
    benchmark's; :mod:`distill.registry`), a local folder, or a hub name (online only)."""
    import datasets

    from distill.registry import dataset_loader

    loader = dataset_loader(cfg.name)
    if loader is not None:
        return loader(cfg.split)
    path = Path(cfg.name).expanduser()
    try:
        if path.is_dir():
            if any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
                ds = datasets.load_from_disk(str(path))  # what Dataset(Dict).save_to_disk writes
                if isinstance(ds, datasets.DatasetDict):
                    if cfg.split not in ds:
                        raise DistillError(f"dataset {cfg.name} has no split {cfg.split!r}; set data.split to one "
                                           f"of {', '.join(ds)}.")
                    ds = ds[cfg.split]
            else:
                ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=cfg.split)
        elif path.exists() or cfg.name.startswith((".", "/", "~")):
            raise DistillError(f"dataset folder {cfg.name} does not exist or is not a folder.")
        elif hub_offline():
            raise DistillError(
                f"dataset {cfg.name!r} is not a local folder and the hub is offline; download it on a connected "
                "machine (datasets.load_dataset(...).save_to_disk(DIR)) and set data.name to DIR."
            )
        else:
            ds = datasets.load_dataset(cfg.name, split=cfg.split)
    except DistillError:
        raise
    except Exception as exc:
        raise DistillError(f"cannot load dataset {cfg.name!r} (split {cfg.split!r}): {exc}") from exc
    if cfg.image_column not in ds.column_names:
        raise DistillError(
            f"dataset {cfg.name!r} has no column {cfg.image_column!r}; set data.image_column to one of "
            f"{', '.join(ds.column_names)}."
        )
    if cfg.caption_column is not None and cfg.caption_column not in ds.column_names:
        raise DistillError(
            f"dataset {cfg.name!r} has no caption column {cfg.caption_column!r}; set data.caption_column to one of "
            f"{', '.join(ds.column_names)}."
        )
    return ds


def _to_tensor(img: Any, cfg: DataConfig) -> torch.Tensor:
    """One sample (PIL image, array or tensor) -> float32 in [-1, 1] of the layout ``cfg.layout`` names: an image
    (C, H, W), a video (C, F, H, W) or an audio clip (C, L). Integer pixels are 0..255; channels-last images (H, W, C)
    and videos (F, H, W, C) are turned channels-first; a sample without a channel axis gets one."""
    layout = cfg.layout
    if isinstance(img, torch.Tensor):
        x = img.float() if img.is_floating_point() else img.float() / 127.5 - 1.0
    else:
        from PIL import Image

        if isinstance(img, Image.Image):
            if cfg.channels is not None:
                img = img.convert("L" if cfg.channels == 1 else "RGB")
            arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        else:
            raw = np.asarray(img)
            # integer pixels are 0..255; float arrays are taken as already in [-1, 1]
            arr = raw.astype(np.float32) / 127.5 - 1.0 if np.issubdtype(raw.dtype, np.integer) else raw.astype(np.float32)
        x = torch.from_numpy(arr)
        if layout == "image" and x.ndim == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3, 4):
            x = x.movedim(-1, 0)  # an (H, W, C) image array -> (C, H, W)
    # a (F, H, W, C) clip -> (C, F, H, W): its last axis holds 1, 3 or 4 channels and its first more than 4 frames
    # (a channels-first clip of 1-4 channels whose width is 1, 3 or 4 would be ambiguous; it is left as it is)
    if layout == "video" and x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[0] > 4:
        x = x.movedim(-1, 0)
    if x.ndim == SAMPLE_DIMS[layout]:
        x = x[None]  # one channel
    if x.ndim != SAMPLE_DIMS[layout] + 1:
        raise DistillError(f"dataset samples must be {SHAPES[layout]} for data.layout {layout!r}, got shape "
                           f"{tuple(x.shape)}; set data.layout to image, video or audio to match the data.")
    if x.min() < -1.1 or x.max() > 1.1:
        raise DistillError(f"dataset samples must lie in [-1, 1] (or be 8-bit pixels); got values in "
                           f"[{x.min():.3g}, {x.max():.3g}]. Rescale them, e.g. x / 127.5 - 1.")
    if cfg.resolution is not None and tuple(x.shape[-2:]) != (cfg.resolution, cfg.resolution):
        import torchvision.transforms.v2.functional as F

        # images and video frames alike: torchvision resizes the last two axes of any leading shape
        x = F.center_crop(F.resize(x, cfg.resolution, antialias=True), [cfg.resolution, cfg.resolution])
    return x


class ImageBatches:
    """Deterministic, resumable batches from a dataset.

    ``batch(epoch, offset, size)`` returns ``{"image": (size, C, H, W) float32 in [-1, 1], "label": (size,)}``
    for positions ``offset .. offset + size`` of epoch ``epoch``'s permutation. Images are decoded once and
    kept in memory when the dataset is small (the digits set is 110 KB; ``data.in_memory``), else each batch's
    rows are decoded when it is drawn, by ``data.workers`` processes ahead of the trainer (:meth:`stream`). A batch
    depends only on its position, so a resume from a saved position is exact either way. With a teacher
    ``pipeline`` the batches are what that teacher takes (latents, caption embeddings, class labels; see the
    module docstring).
    """

    def __init__(self, dataset, cfg: DataConfig, seed: int = 0, pipeline: Any = None) -> None:
        self.ds = dataset
        self.cfg = cfg
        self.seed = seed
        self.n = len(dataset)
        if self.n == 0:
            raise DistillError(f"dataset {cfg.name!r} (split {cfg.split!r}) is empty.")
        self._cache: dict[str, torch.Tensor] | None = None
        self._lazy: Any = None
        self.tables: dict[str, torch.Tensor] = {}  # cond tensors per distinct caption, gathered by caption_index
        self.in_memory = cfg.in_memory if cfg.in_memory is not None else self.n <= 50_000
        if self.in_memory:
            self._cache = self._decode(list(range(self.n)))
            if pipeline is not None:
                from distill.conditioning import prepare

                self._cache, self.tables = prepare(self.ds, cfg, pipeline, self._cache)
        elif pipeline is not None:
            from distill.conditioning import LazyRows

            self._lazy = LazyRows(self.ds, cfg, pipeline, self._decode)

    def _decode(self, idx: list[int]) -> dict[str, torch.Tensor]:
        rows = self.ds[idx]
        images = torch.stack([_to_tensor(im, self.cfg) for im in rows[self.cfg.image_column]])
        out = {"image": images}
        col = self.cfg.label_column
        if col and col in rows:
            out["label"] = torch.as_tensor(rows[col]).long()
        return out

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.get([0])["image"].shape[1:])  # type: ignore[return-value]

    def get(self, idx: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        if self._cache is not None:
            t = torch.as_tensor(idx)
            out = {k: v[t] for k, v in self._cache.items()}
            if self.tables:
                rows = out.pop("caption_index")
                out.update({k: v[rows] for k, v in self.tables.items()})
            return out
        if self._lazy is not None:
            return self._lazy.get(idx)
        return self._decode(idx)

    def permutation(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s order (kept for the epoch: drawn once, not per batch)."""
        cached = getattr(self, "_perm", None)
        if cached is None or cached[0] != epoch:
            cached = (epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)))
            self._perm = cached
        return cached[1]

    def advance(self, epoch: int, offset: int, size: int) -> tuple[int, int]:
        """The position after ``size`` samples from (epoch, offset), without decoding anything."""
        offset += size
        while offset >= self.n:
            epoch, offset = epoch + 1, offset - self.n
        return epoch, offset

    def batch(self, epoch: int, offset: int, size: int, flip_seed: int | None = None) -> tuple[dict, int, int]:
        """The next ``size`` samples from position (epoch, offset); returns (batch, epoch, offset) after it."""
        parts: list[torch.Tensor] = []
        got = 0
        while got < size:
            take = self.permutation(epoch)[offset : offset + size - got]
            parts.append(take)
            got += len(take)
            offset += len(take)
            if offset >= self.n:
                epoch, offset = epoch + 1, 0
        idx = parts[0] if len(parts) == 1 else torch.cat(parts)
        out = self.get(idx if self._cache is not None else idx.tolist())
        if self.cfg.hflip:
            g = torch.Generator().manual_seed(flip_seed if flip_seed is not None else epoch * 1_000_003 + offset)
            flip = torch.rand(size, generator=g) < 0.5
            out["image"] = torch.where(append_dims(flip, out["image"].ndim), out["image"].flip(-1), out["image"])
        return out, epoch, offset

    def stream(self, epoch: int, offset: int, size: int) -> Iterator[tuple[dict, int, int]]:
        """Consecutive batches from position (epoch, offset), as :meth:`batch` gives them one by one; with
        ``data.workers`` and data read lazily, decoded ahead in that many processes (batch k by worker k mod W,
        taken back in order, so the sequence is the same as without workers)."""
        if self.in_memory or self.cfg.workers == 0:
            while True:
                out, epoch, offset = self.batch(epoch, offset, size)
                yield out, epoch, offset
        from torch.utils.data import DataLoader

        # its own generator: a DataLoader otherwise draws its workers' seed from the global stream, which the
        # training noise comes from, and a resume (a new loader) would shift that stream
        loader = DataLoader(_BatchStream(self, epoch, offset, size), batch_size=None, num_workers=self.cfg.workers,
                            prefetch_factor=2, persistent_workers=False, generator=torch.Generator().manual_seed(0))
        yield from loader


class _BatchStream(IterableDataset):
    """The batch sequence from a position, split over DataLoader workers: worker w makes batches w, w + W, ..."""

    def __init__(self, batches: ImageBatches, epoch: int, offset: int, size: int) -> None:
        self.batches, self.start, self.size = batches, (epoch, offset), size

    def __iter__(self) -> Iterator[tuple[dict, int, int]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, offset = self.start
        k = 0
        while True:
            if k % workers == wid:
                yield self.batches.batch(epoch, offset, self.size)
            epoch, offset = self.batches.advance(epoch, offset, self.size)
            k += 1
