"""Feature extractors for Frechet distances: one interface, the registry of named extractors, and any nn.Module.

Every extractor maps images (N, C, H, W) float in [-1, 1] to features (N, D) and says what its distance is
called (``metric``) and which weights produced it (``weights_hash``, which keys cached reference statistics):

| ``get_extractor`` name  | class                 | ``name``                   | ``metric`` | D    |
|-------------------------|-----------------------|----------------------------|------------|------|
| ``digits`` (benchmark)  | DigitsExtractor       | ``digits-net``             | FD-digits  | 64   |
| ``clean-fid``           | CleanFIDInception     | ``inception-clean``        | FID        | 2048 |
| ``torchmetrics``        | TorchmetricsInception | ``inception-torchmetrics`` | FID        | 2048 |
| ``pkg.module:callable`` | ModuleExtractor       | (chosen)                   | FD-<name>  | any  |

A dotted path may also name a file, ``path/to/file.py:callable``, as everywhere in distill.

Only the two Inception backends report "FID"; any other network's distance is "FD-<name>". FID is a Frechet
distance in one particular feature space (Inception-v3's pool3) and its values are read against published
ones; a Frechet distance in another network's features is on another scale, so calling it FID would invite
comparisons that do not hold. The two Inception backends do not agree with each other either (see
``distill.eval.inception``), so their names differ and result rows record which one was used.

The interface (``FeatureExtractor``), ``ModuleExtractor`` and ``to_uint8`` live in :mod:`distill.eval.features`
(re-exported here); the two Inception backends, with the lookup and download of their weights, in
:mod:`distill.eval.inception`. This module is the lookup by name (``get_extractor``): the core's own extractors
(``EXTRACTORS``) and every benchmark's (``digits`` and ``text-digits`` are the shipped benchmarks' judge networks,
registered through :mod:`distill.registry`, as a user's benchmark registers its own).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from distill.errors import DistillError
from distill.eval.features import FeatureExtractor, ModuleExtractor, to_uint8
from distill.eval.inception import WEIGHTS_ENV, WEIGHTS_FLAG, CleanFIDInception, TorchmetricsInception
from distill.plugins import load_object

__all__ = [
    "EXTRACTORS",
    "WEIGHTS_ENV",
    "WEIGHTS_FLAG",
    "CleanFIDInception",
    "FeatureExtractor",
    "ModuleExtractor",
    "TorchmetricsInception",
    "available",
    "get_extractor",
    "to_uint8",
]


# --------------------------------------------------------------------------------------------- registry

# The core's own extractors; benchmarks add theirs through distill.registry (digits, text-digits, a user's).
EXTRACTORS: dict[str, type[FeatureExtractor]] = {"clean-fid": CleanFIDInception, "torchmetrics": TorchmetricsInception}
# Each extractor's `name` is accepted too, so a name read back from a result row rebuilds the same extractor.
_ALIASES = {"inception-clean": "clean-fid", "inception-torchmetrics": "torchmetrics"}

_MODULE_EXTRACTOR_KWARGS = ("name", "metric", "preprocess", "dim", "device", "batch_size")


def available() -> dict[str, type[FeatureExtractor]]:
    """Every named extractor: the core's (:data:`EXTRACTORS`) and each benchmark's (:mod:`distill.registry`),
    aliases left out."""
    from distill.registry import benchmarks

    out = dict(EXTRACTORS)
    for b in benchmarks():
        for key, spec in b.extractors.items():
            out[key] = load_object(spec, f"benchmark {b.name}'s extractor {key!r}")
    return out


def _resolve(name: str) -> type[FeatureExtractor] | None:
    """The class of the named extractor (an alias or a benchmark's name too); None if no extractor has the name."""
    from distill.registry import extractor_names

    key = _ALIASES.get(name, name)
    if key in EXTRACTORS:
        return EXTRACTORS[key]
    spec = extractor_names().get(name)
    return None if spec is None else load_object(spec, f"feature extractor {name!r}")


def _choices() -> str:
    return (", ".join(repr(k) for k in available())
            + ", or a dotted path 'package.module:callable' (or 'path/to/file.py:callable')")


def _check_kwargs(cls: type, kwargs: dict[str, Any], label: str) -> None:
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise DistillError(f"feature extractor {label!r} does not take {', '.join(unknown)}; "
                           f"it takes {', '.join(accepted)}.")


def get_extractor(name: str, /, **kwargs: Any) -> FeatureExtractor:
    """Build a feature extractor by name.

    Args:
        name: "digits", "clean-fid", "torchmetrics" (or the extractors' own names "digits-net",
            "inception-clean", "inception-torchmetrics"), or "package.module:callable" /
            "path/to/file.py:callable" (see ``distill.plugins.load_object``) where the callable returns an
            nn.Module (or a FeatureExtractor), or is itself an nn.Module instance.
        **kwargs: the chosen class's arguments (e.g. ``weights_path``, ``device``, ``batch_size``). For a dotted
            path: ModuleExtractor's ``name`` (default: the callable's name), ``metric``, ``preprocess``, ``dim``,
            ``device``, ``batch_size``; anything else is passed to the callable.

    Raises:
        DistillError: unknown name (listing the choices), bad arguments, or a dotted path that cannot be loaded.
    """
    if not isinstance(name, str) or not name.strip():
        raise DistillError(f"feature extractor name must be a non-empty string; choose {_choices()}.")
    key = name.strip()
    cls = _resolve(key)
    if cls is not None:
        _check_kwargs(cls, kwargs, key)
        return cls(**kwargs)
    if ":" not in key:
        raise DistillError(f"unknown feature extractor {name!r}; choose {_choices()}.")

    target = load_object(key, "feature extractor")
    wrap_kwargs = {k: kwargs.pop(k) for k in _MODULE_EXTRACTOR_KWARGS if k in kwargs}
    if isinstance(target, (nn.Module, FeatureExtractor)):
        if kwargs:
            raise DistillError(f"{key!r} is an object, not a factory; it takes no arguments {sorted(kwargs)}.")
        built = target
    elif callable(target):
        try:
            built = target(**kwargs)
        except TypeError as e:
            raise DistillError(f"calling {key!r} with {sorted(kwargs) or 'no arguments'} failed: {e}") from e
    else:
        raise DistillError(f"{key!r} is a {type(target).__name__}, not an nn.Module or a callable returning one.")
    if isinstance(built, FeatureExtractor):
        extra = sorted(k for k in wrap_kwargs if k != "device")  # the harness always says where to run
        if extra:
            raise DistillError(f"{key!r} returned a ready FeatureExtractor; it takes no {extra}.")
        return built
    if not isinstance(built, nn.Module):
        raise DistillError(f"{key!r} returned a {type(built).__name__}; a feature network must be a torch.nn.Module.")
    wrap_kwargs.setdefault("name", key.rpartition(":")[2])
    return ModuleExtractor(built, **wrap_kwargs)
