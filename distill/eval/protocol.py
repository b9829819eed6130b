"""Evaluation protocols and their cached reference statistics.

A protocol fixes everything a number depends on: the reference data (dataset, split), how it is split
into halves A (reference) and B (floor), the number of samples per point, how many draws of them a point pools
(``draws``), the seed base, the feature extractor and the preprocessing. Reference statistics (half A's Gaussian
and features, for KID; the floor FD(B, A)) are cached on disk under a key made of the protocol (with a signature
of a local dataset folder's files) and the extractor's weights hash; a cache entry whose recorded protocol or
extractor differs, or whose statistics file does not match its recorded hash, is refused with a warning and
recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.config import DataConfig, from_dict, to_plain
from distill.errors import DistillError
from distill.eval.extractors import FeatureExtractor, get_extractor
from distill.eval.frechet import (FeatureStats, bootstrap_fd, bootstrap_mean, feature_stats, frechet_distance, kid,
                                  pooled_fd)

GRIDS = ("leading", "trailing", "linspace", "karras")
DEFAULT_GRIDS = {"ddim": "trailing", "euler": "trailing", "heun": "karras", "consistency": "trailing"}
REPO_PROTOCOLS = Path(__file__).resolve().parents[2] / "evals" / "protocols"


@dataclass
class Protocol:
    """What an FD/FID number means. See ``evals/protocols/*.yaml``."""

    name: str
    dataset: str  # data.name: a benchmark's dataset (digits, text-digits, ...), a local folder, or a hub dataset
    extractor: str  # a benchmark's (digits, text-digits, ...) | clean-fid | torchmetrics | package.module:callable
    split: str = "train"
    image_column: str = "image"
    layout: str = "image"  # each sample: image (C, H, W) | video (C, F, H, W) | audio (C, L) (data.layout)
    resolution: int | None = None
    channels: int | None = None
    split_seed: int = 0  # random split of the data into halves A (reference) and B (floor)
    n: int | None = None  # samples per point; null = len(half B); the floor uses the same n
    seed: int = 0  # sample i starts from torch.Generator().manual_seed(seed + i)
    # draws of n samples per point (seeds seed .. seed + draws * n - 1), pooled into the headline: the FD of all of
    # them, bias-corrected, with its interval (frechet.pooled_fd), and KID. The first draw's plain FD stays a column
    # (the number a protocol without draws gives). 1: the headline is that single draw's plain FD.
    draws: int = 1
    extractor_args: dict[str, Any] = field(default_factory=dict)
    # sigma grid per teacher sampler: the teacher's own timesteps (leading | trailing | linspace) or karras.
    # Heun needs a bounded sigma_max: from a VP teacher's sigma_max (2e4 for the cosine schedule) its
    # trapezoid step cancels two huge terms and is unstable, so it runs on EDM's Karras grid up to 80.
    grid: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_GRIDS))
    karras_sigma_max: float = 80.0  # upper end of karras grids (capped at the model's own sigma_max)
    batch_size: int = 450  # generation batch; results do not depend on it
    # conditional models: sample i is made for prompts[i % len] (a list, or a text file with one prompt a line)
    # or labels[i % len]; each (sampler, steps) point is scored at every guidance scale w (diffusers' guidance_scale)
    prompts: list[str] | str | None = None  # a list, a file, or package.module:function giving prompts
    labels: list[int] | None = None
    guidance: list[float] = field(default_factory=lambda: [1.0])
    # prompt accuracy: the fields the extractor's predict() judges (e.g. [digit, color]); each prompt names its own
    # (package.module:function giving objects with .text and these fields) and the reference data has such columns
    judge: list[str] = field(default_factory=list)
    # per-aspect diagnostics beside FD (package.module:function, images -> {aspect: (N,) values}): each row carries the
    # mean of every aspect over its samples, the floor row the real images' (half B), so a leaderboard says in plain
    # terms how a row differs from the data (e.g. distill.benchmarks.text_digits.diagnostics:aspects)
    diagnostics: str | None = None

    def check(self) -> list[str]:
        errs = []
        if self.n is not None and self.n < 2:
            errs.append(f"n must be >= 2 or null, got {self.n}")
        if self.draws < 1:
            errs.append(f"draws must be >= 1 (1: one draw of n samples, no pooling), got {self.draws}")
        errs += [e for e in self.data_config().check() if e.startswith("layout")]
        if self.batch_size < 1:
            errs.append(f"batch_size must be >= 1, got {self.batch_size}")
        for sampler, g in self.grid.items():
            if g not in GRIDS:
                errs.append(f"grid.{sampler}: {g!r} is not one of {', '.join(GRIDS)}")
        if self.karras_sigma_max <= 0:
            errs.append(f"karras_sigma_max must be > 0, got {self.karras_sigma_max}")
        if self.prompts is not None and self.labels is not None:
            errs.append("give prompts or labels, not both")
        if isinstance(self.prompts, list) and not self.prompts:
            errs.append("prompts is an empty list")
        if self.labels is not None and (not self.labels or min(self.labels) < 0):
            errs.append(f"labels must be a non-empty list of class indices >= 0, got {self.labels}")
        if not self.guidance or min(self.guidance) < 0:
            errs.append(f"guidance must list scales >= 0, got {self.guidance}")
        return errs

    def _prompt_objects(self) -> list[Any] | None:
        """Prompts as given by a ``package.module:function`` (objects with ``.text``), else None."""
        if not isinstance(self.prompts, str) or ":" not in self.prompts or Path(self.prompts).is_file():
            return None
        from distill.plugins import load_object

        found = load_object(self.prompts, "prompt set")
        found = found() if callable(found) else found
        if not found or not all(hasattr(p, "text") for p in found):
            raise DistillError(f"protocol {self.name!r}: {self.prompts} gives no prompt objects with .text.")
        return list(found)

    def prompt_targets(self) -> dict[str, list[int]] | None:
        """Per prompt, the value of each judged field (``judge``), for prompt accuracy; None without a judge."""
        if not self.judge:
            return None
        objects = self._prompt_objects()
        if objects is None or not all(hasattr(p, f) for p in objects for f in self.judge):
            raise DistillError(f"protocol {self.name!r} judges {', '.join(self.judge)}: its prompts must come from a "
                               "package.module:function whose prompt objects carry those fields.")
        return {f: [int(getattr(p, f)) for p in objects] for f in self.judge}

    def prompt_list(self) -> list[str] | None:
        """The prompts (read from the file when ``prompts`` names one)."""
        if self.prompts is None or isinstance(self.prompts, list):
            return self.prompts
        objects = self._prompt_objects()
        if objects is not None:
            return [p.text for p in objects]
        path = Path(self.prompts)
        if not path.is_absolute() and not path.is_file():
            path = REPO_PROTOCOLS / self.prompts
        if not path.is_file():
            raise DistillError(f"protocol {self.name!r}: prompts file {self.prompts} does not exist.")
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        if not lines:
            raise DistillError(f"protocol {self.name!r}: prompts file {path} holds no prompts.")
        return lines

    def grid_for(self, sampler: str) -> str:
        return self.grid.get(sampler, "trailing")

    def data_config(self) -> DataConfig:
        return DataConfig(name=self.dataset, split=self.split, image_column=self.image_column, label_column=None,
                          resolution=self.resolution, channels=self.channels, layout=self.layout)

    def key(self) -> str:
        """Hash of what the reference statistics depend on: these fields, and for a local dataset folder the
        names, sizes and modification times of its files (so edited data is not served stale statistics)."""
        fields = {k: getattr(self, k) for k in ("dataset", "split", "image_column", "resolution", "channels",
                                                 "split_seed", "n")}
        if self.judge:
            fields["judge"] = self.judge
        if self.layout != "image":  # image protocols keep the keys (and cached statistics) they always had
            fields["layout"] = self.layout
        if self.draws != 1:  # a pooled headline is another number: its rows never share a table with single draws
            fields["draws"] = self.draws
        folder = Path(self.dataset).expanduser()
        from distill.registry import is_benchmark_dataset

        if not is_benchmark_dataset(self.dataset) and folder.is_dir():
            fields["files"] = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                                     for p in folder.rglob("*") if p.is_file())
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def load_protocol(name_or_path: str | Path, **overrides: Any) -> Protocol:
    """A protocol from a YAML path, or by name: ``<name>.yaml`` in ``evals/protocols/`` (of the working directory,
    then of the repository) or in a benchmark's protocol folder (:func:`distill.registry.protocol_folders`)."""
    import yaml

    from distill.registry import protocol_folders

    path = Path(name_or_path)
    folders = [Path("evals/protocols"), REPO_PROTOCOLS, *protocol_folders()]
    candidates = [path, *(folder / f"{name_or_path}.yaml" for folder in folders)]
    found = next((p for p in candidates if p.suffix in (".yaml", ".yml") and p.is_file()), None)
    if found is None:
        known = sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})
        raise DistillError(f"protocol {name_or_path!r} not found; give a YAML path or one of {', '.join(known)}.")
    try:
        data = yaml.safe_load(found.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DistillError(f"protocol {found} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise DistillError(f"protocol {found} must be a mapping of protocol fields, got {type(data).__name__}.")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(Protocol, data, where=f"protocol {found.name}:")


def cache_dir() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill")) / "refstats"


@dataclass
class Reference:
    """Half A's statistics, the floor FD(B[:n], A), and what they were computed with."""

    protocol: Protocol
    extractor: FeatureExtractor
    stats: FeatureStats
    floor: float
    n: int  # samples per evaluation point (also half B's count in the floor)
    n_ref: int  # size of half A
    fingerprint: str  # of the dataset
    shape: tuple[int, ...]  # (C, H, W) of the data, which models must generate
    floor_ci: tuple[float, float] | None = None  # bootstrap interval of the floor (frechet.bootstrap_fd)
    floor_accuracy: float | None = None  # the judge's accuracy on half B's real images (protocols with a judge)
    floor_accuracy_ci: tuple[float, float] | None = None
    features: torch.Tensor | None = None  # half A's features (n_ref, D), for KID
    # the floor as a pooled protocol's rows are measured: all of half B (pooled_n images), the bias-corrected FD and its
    # interval, and KID with its standard error (frechet.pooled_fd, frechet.kid)
    pooled_floor: dict[str, Any] | None = None

    def aspects(self, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The protocol's per-sample diagnostics of ``images`` ({aspect: (N,) float}), None without ``diagnostics``."""
        return aspects_of(self.protocol, images)

    def fd(self, images: torch.Tensor) -> float:
        """FD of images (N, C, H, W) in [-1, 1] against half A."""
        return self.fd_of_features(self.extractor.features(images))

    def fd_of_features(self, features: torch.Tensor) -> float:
        """FD of features (N, D) (the extractor's, of N images) against half A."""
        return frechet_distance(feature_stats(features), self.stats)


def _dataset_images(protocol: Protocol) -> tuple[torch.Tensor, str, dict[str, torch.Tensor]]:
    """(images, fingerprint, the judged columns)."""
    from distill.data import ImageBatches, load_dataset

    ds = load_dataset(protocol.data_config())
    batches = ImageBatches(ds, protocol.data_config(), seed=0)
    images = batches.get(list(range(batches.n)))["image"]
    missing = [c for c in protocol.judge if c not in ds.column_names]
    if missing:
        raise DistillError(f"protocol {protocol.name!r} judges {', '.join(missing)}, which dataset "
                           f"{protocol.dataset!r} lacks (it has {', '.join(ds.column_names)}).")
    columns = {c: torch.as_tensor(ds[c]).long() for c in protocol.judge}
    # the content: a dataset's own fingerprint can be random (one built in memory), the images are what count
    fingerprint = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]
    return images, str(fingerprint), columns


def halves(protocol: Protocol) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], str]:
    """The protocol's random split of its dataset: (half A, the reference; half B, the floor's samples; half B's
    judged columns; the images' fingerprint). Every evaluation of the protocol uses this one split."""
    images, fingerprint, columns = _dataset_images(protocol)
    perm = np.random.default_rng(protocol.split_seed).permutation(len(images))
    half = len(images) // 2
    b_rows = perm[half : 2 * half]
    return images[perm[:half]], images[b_rows], {c: v[b_rows] for c, v in columns.items()}, fingerprint


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


REFERENCE_VERSION = 4  # of the cached reference statistics; bumped when what they hold is computed anew


def reference(protocol: Protocol, extractor: FeatureExtractor | None = None, *, use_cache: bool = True,
              device: str | torch.device = "cpu") -> Reference:
    """Reference statistics for ``protocol``, from the cache when a matching, intact entry exists."""
    from safetensors.torch import load_file, save_file

    if extractor is None:
        extractor = get_extractor(protocol.extractor, **{"device": device, **protocol.extractor_args})
    key = f"{protocol.name}-{protocol.key()}-{extractor.name}-{extractor.weights_hash()}"
    meta_path, tensor_path = cache_dir() / f"{key}.json", cache_dir() / f"{key}.safetensors"
    # version 3: the floor's interval is bias-corrected (frechet.bootstrap_fd); entries of version 2 hold the plain
    # percentile interval, which on few samples in many dimensions does not contain the floor itself. Version 4: half
    # A's features (for KID) and the pooled floor.
    expected = {"protocol_key": protocol.key(), "extractor": extractor.describe(), "version": REFERENCE_VERSION}
    if use_cache and meta_path.is_file() and tensor_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            problem = None
            if meta.get("version") != REFERENCE_VERSION:
                problem = f"it was made by an older distill (cache version {meta.get('version')})"
            elif {k: meta.get(k) for k in expected} != expected:
                problem = "it was made with another protocol or feature network"
            elif meta.get("sha256") != _sha256(tensor_path):
                problem = "its statistics file does not match the recorded hash"
            elif bool(protocol.diagnostics) != ("aspects" in (meta.get("pooled_floor") or {})):
                problem = "it was made with other diagnostics"  # they describe the data; they do not change the key
        except (OSError, json.JSONDecodeError):
            problem = "its metadata is unreadable"
        if problem is None:
            t = load_file(str(tensor_path))
            stats = FeatureStats(t["mu"].numpy(), t["sigma"].numpy(), int(meta["n_ref"]))
            return Reference(protocol, extractor, stats, meta["floor"], meta["n"], meta["n_ref"], meta["fingerprint"],
                             tuple(meta["shape"]), _pair(meta.get("floor_ci")), meta.get("floor_accuracy"),
                             _pair(meta.get("floor_accuracy_ci")), t["features"], meta["pooled_floor"])
        warnings.warn(f"refusing cached reference statistics {tensor_path}: {problem}; recomputing.", stacklevel=2)

    a, b, b_columns, fingerprint = halves(protocol)
    n = protocol.n or len(b)
    if n > len(b):
        raise DistillError(
            f"protocol {protocol.name!r} asks for n={n} samples but half B of {protocol.dataset!r} has {len(b)} "
            f"images; the floor needs as many real images as samples. Set n <= {len(b)}."
        )
    if n <= extractor.dim or len(a) <= extractor.dim:
        raise DistillError(
            f"protocol {protocol.name!r} compares {min(n, len(a))} samples in {extractor.dim}-dimensional features: "
            f"the covariance would be singular. Use n > {extractor.dim} (and a dataset with more than "
            f"{2 * extractor.dim} images) or a feature network with fewer dimensions."
        )
    a_features = extractor.features(a).detach().cpu().to(torch.float64)
    stats = feature_stats(a_features)
    all_b = extractor.features(b).detach().cpu().to(torch.float64)
    b_features = all_b[:n]
    floor = frechet_distance(feature_stats(b_features), stats)
    floor_ci = bootstrap_fd(b_features, stats)
    # the pooled floor: every real image of half B, as many as a pooled row's samples or fewer, on the bias-corrected
    # scale that does not depend on the count
    pooled = pooled_fd(all_b, stats)
    kid_value, kid_se = kid(all_b, a_features)
    pooled_floor = {"value": pooled.value, "ci": list(pooled.ci), "plain": pooled.plain, "bias": pooled.bias,
                    "n": pooled.n, "kid": kid_value, "kid_se": kid_se}
    real_aspects = aspects_of(protocol, b)
    if real_aspects is not None:  # the real images' means: every image of half B, and the first n (one draw's)
        pooled_floor["aspects"] = {k: float(v.mean()) for k, v in real_aspects.items()}
        pooled_floor["aspects_single"] = {k: float(v[:n].mean()) for k, v in real_aspects.items()}
    floor_accuracy = floor_accuracy_ci = None
    if protocol.judge:
        correct = judge(extractor, b[:n], {c: v[:n] for c, v in b_columns.items()})
        floor_accuracy, floor_accuracy_ci = float(correct.float().mean()), bootstrap_mean(correct)
        if len(b) > n:
            every = judge(extractor, b, b_columns)
            pooled_floor["accuracy"] = float(every.float().mean())
            pooled_floor["accuracy_ci"] = list(bootstrap_mean(every))
        else:
            pooled_floor["accuracy"], pooled_floor["accuracy_ci"] = floor_accuracy, list(floor_accuracy_ci)
    cache_dir().mkdir(parents=True, exist_ok=True)
    # each process writes its own temporary files and renames them into place, so two processes filling the same
    # entry at once (the quickstart's lanes, parallel tests) never leave a torn or mixed entry
    tmp = tensor_path.with_name(f"{tensor_path.name}.{os.getpid()}.tmp")
    save_file({"mu": torch.from_numpy(stats.mu), "sigma": torch.from_numpy(stats.sigma),
               "features": a_features.contiguous()}, str(tmp))
    os.replace(tmp, tensor_path)
    meta = {**expected, "protocol": to_plain(protocol), "floor": floor, "n": n, "n_ref": len(a),
            "fingerprint": fingerprint, "shape": list(a.shape[1:]), "sha256": _sha256(tensor_path),
            "floor_ci": list(floor_ci), "floor_accuracy": floor_accuracy,
            "floor_accuracy_ci": list(floor_accuracy_ci) if floor_accuracy_ci else None, "pooled_floor": pooled_floor}
    tmp_meta = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, meta_path)
    return Reference(protocol, extractor, stats, floor, n, len(a), fingerprint, tuple(a.shape[1:]), floor_ci,
                     floor_accuracy, floor_accuracy_ci, a_features, pooled_floor)


def aspects_of(protocol: Protocol, images: torch.Tensor, batch_size: int = 2048) -> dict[str, torch.Tensor] | None:
    """``protocol.diagnostics`` applied to ``images`` in batches: {aspect: (N,) float64 values}; None without one."""
    if not protocol.diagnostics:
        return None
    from distill.plugins import load_object

    fn = load_object(protocol.diagnostics, "diagnostics function")
    parts: dict[str, list[torch.Tensor]] = {}
    for lo in range(0, len(images), batch_size):
        got = fn(images[lo : lo + batch_size])
        if not isinstance(got, dict) or not got:
            raise DistillError(f"diagnostics {protocol.diagnostics} must return a dict of per-sample values, got "
                               f"{type(got).__name__}.")
        for k, v in got.items():
            parts.setdefault(k, []).append(torch.as_tensor(v).detach().cpu().to(torch.float64).reshape(-1))
    return {k: torch.cat(v) for k, v in parts.items()}


def _pair(v: Any) -> tuple[float, float] | None:
    return (float(v[0]), float(v[1])) if v else None


def judge(extractor: FeatureExtractor, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) bool: the extractor's ``predict`` reads every judged field of image i as ``targets[field][i]``."""
    predict = getattr(extractor, "predict", None)
    if predict is None:
        raise DistillError(f"feature extractor {extractor.name!r} cannot judge prompts (it has no predict()); "
                           "remove judge: from the protocol.")
    got = predict(images)
    correct = torch.ones(len(images), dtype=torch.bool)
    for field_name, want in targets.items():
        if field_name not in got:
            raise DistillError(f"{extractor.name!r} predicts {', '.join(got)}, not {field_name!r}.")
        correct &= got[field_name].cpu() == torch.as_tensor(want).cpu()
    return correct
