"""Evaluation: Frechet distance between feature sets, feature extractors, protocols, the harness and leaderboards.

The judge networks of the shipped benchmarks live with their benchmarks (``distill.benchmarks.digits.judge``,
``distill.benchmarks.text_digits.judge``); this package finds them by name through :mod:`distill.registry`.
"""

from __future__ import annotations

from distill.eval.frechet import FeatureStats, fd_from_features, feature_stats, frechet_distance

__all__ = ["FeatureStats", "fd_from_features", "feature_stats", "frechet_distance"]
