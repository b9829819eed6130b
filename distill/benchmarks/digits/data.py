"""The digits benchmark's data: scikit-learn's bundled 8x8 handwritten digits, served as a ``datasets.Dataset``."""

from __future__ import annotations

from typing import Any

import numpy as np


def digits_dataset():
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, classes 0-9) as a ``datasets.Dataset``.

    ``image``: float32 (1, 8, 8) in [-1, 1] (``pixel / 8 - 1``, pixels are 0..16); ``label``: int64.
    """
    import datasets
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    ds = datasets.Dataset.from_dict({"image": images, "label": d.target.astype(np.int64)})
    return ds.with_format("torch")


def dataset(split: str = "train") -> Any:
    """``data.name: digits``: all 1,797 images whatever the split (protocols split them into halves themselves)."""
    return digits_dataset()
