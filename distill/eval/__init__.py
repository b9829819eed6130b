"""Evaluation: Frechet distance between feature sets and the FD-digits feature network."""

from __future__ import annotations

import importlib
from typing import Any

from distill.eval.frechet import FeatureStats, fd_from_features, feature_stats, frechet_distance

# digits_net names resolve lazily: importing it here would make `python -m distill.eval.digits_net`
# run a module that is already in sys.modules (runpy warns about exactly that).
_DIGITS_NET_NAMES = (
    "DigitsNet",
    "digits_array",
    "digits_split",
    "load_digits_config",
    "load_digits_net",
    "save_digits_net",
    "train_digits_net",
    "weights_hash",
)

__all__ = ["FeatureStats", "fd_from_features", "feature_stats", "frechet_distance", *_DIGITS_NET_NAMES]


def __getattr__(name: str) -> Any:
    if name in _DIGITS_NET_NAMES:
        return getattr(importlib.import_module("distill.eval.digits_net"), name)
    raise AttributeError(f"module 'distill.eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
