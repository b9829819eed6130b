"""Colored digits: a text-to-image data set that is generated offline, deterministically, in a few seconds.

scikit-learn's bundled 8x8 handwritten digits (1,797 images, pixel values 0..16) are upscaled to 32x32 and drawn
in one of seven colors on black; each row has a caption such as "a red seven" and the labels it was made from:

    image    float32 (3, 32, 32) in [-1, 1]: intensity (0..1) times the color's RGB, mapped by v * 2 - 1
    caption  str, e.g. "the digit seven in red"
    digit    int64 0..9
    color    int64 0..6, an index into COLORS

Design (why it looks like this):

* Upscaling is **bicubic** (``torch.nn.functional.interpolate``, ``align_corners=False``) clamped to [0, 1]:
  bilinear 4x upscaling of 8x8 pixels leaves visible diamond/cross artifacts on each source pixel, bicubic gives
  smooth strokes; its slight overshoot (about -0.2..1.2) is clamped away.
* **Every digit image in every color** (12,579 rows for the whole set, 10,059 in the train split). Shape and color
  are then independent factors with exactly the same strokes in all seven colors, so a model trained on it cannot
  learn a spurious link between a writer's hand and a color, every (digit, color) pair has ~144 training images,
  and the caption is the only thing that tells a text-conditional model which color to draw. A one-color-per-image
  assignment would leave ~20 images per (digit, color) pair.
* The split is the one the FD-digits network uses: ``distill.benchmarks.digits.judge.digits_split`` (stratified 80/20 of
  the 1,797 source images, seed 0), so no stroke shape of a held-out image appears in training in any color.
* Captions come from :data:`TEMPLATES`; :data:`HELDOUT_TEMPLATES` (the last two) never caption a training row and
  phrase the evaluation prompts (:func:`prompt_set`). Each row's template is drawn from a seeded generator over the
  whole 12,579-row table, so a row keeps its caption whichever split it is read in. All caption words are letters
  only ("seven", not "7"), so each is one token of ``distill.text.build_clip_tokenizer(VOCABULARY, folder)``.

Write it for ``data.name`` with ``python -m distill.benchmarks.text_digits.data --out DIR`` (``datasets.load_from_disk`` format).
"""

from __future__ import annotations

import argparse
import re
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from distill.errors import DistillError

__all__ = [
    "COLORS",
    "COLOR_RGB",
    "DIGIT_WORDS",
    "HELDOUT_TEMPLATES",
    "IMAGE_SIZE",
    "TEMPLATES",
    "TRAIN_TEMPLATES",
    "VOCABULARY",
    "Prompt",
    "article",
    "caption",
    "colorize",
    "intensity_images",
    "prompt_set",
    "row_templates",
    "save_text_digits",
    "split_indices",
    "text_digits_arrays",
    "dataset",
    "text_digits_dataset",
]

IMAGE_SIZE = 32
COLORS: list[str] = ["red", "green", "blue", "yellow", "cyan", "magenta", "white"]
# (7, 3) RGB in 0..1; stroke pixels are intensity * rgb, the background is black
COLOR_RGB = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=np.float32
)
DIGIT_WORDS: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# {art} is "a" or "an" for the word after it; {color} a name from COLORS, {digit} a word from DIGIT_WORDS
TRAIN_TEMPLATES: list[str] = [
    "a {color} {digit}",
    "{color} {digit}",
    "the digit {digit} in {color}",
    "{art} {digit} in {color}",
    "a picture of a {color} {digit}",
    "the number {digit} drawn in {color}",
]
# Held out from every training caption: one color-first with a new noun ("image"), one digit-first with a new
# verb ("written"), so evaluating on them tests reading the color and digit words wherever they sit.
HELDOUT_TEMPLATES: list[str] = [
    "an image of a {color} {digit}",
    "{art} {digit} written in {color}",
]
TEMPLATES: list[str] = TRAIN_TEMPLATES + HELDOUT_TEMPLATES


def article(word: str) -> str:
    """English indefinite article for ``word`` ("an eight", "a seven"; "a one", which is said "won")."""
    return "an" if word[0] in "aeiou" and not word.startswith("one") else "a"


def caption(template: str, digit: int, color: int) -> str:
    """One caption: ``caption("{art} {digit} in {color}", 8, 0) == "an eight in red"``."""
    word = DIGIT_WORDS[int(digit)]
    return template.format(color=COLORS[int(color)], digit=word, art=article(word))


def _vocabulary() -> list[str]:
    words: set[str] = set(COLORS) | set(DIGIT_WORDS) | {"a", "an"}
    for t in TEMPLATES:
        words |= set(re.sub(r"\{\w+\}", " ", t).split())
    return sorted(words)


# every word any template can produce, sorted: the word list for distill.text.build_clip_tokenizer
VOCABULARY: list[str] = _vocabulary()


class Prompt(NamedTuple):
    """An evaluation prompt and the labels an image made from it should be classified as."""

    text: str
    digit: int
    color: int
    template: int  # index into TEMPLATES


def intensity_images(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ink intensity, bicubically upscaled.

    Returns:
        intensity: (1797, 1, size, size) float32 in [0, 1] (pixels / 16, bicubic, clamped).
        digits: (1797,) int64 labels 0..9.
    """
    intensity, digits = _intensity_images(int(size))
    return intensity.copy(), digits.copy()


@lru_cache(maxsize=2)
def _intensity_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    up = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
    return up.numpy(), d.target.astype(np.int64)


def colorize(intensity: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Draw intensity images in colors.

    Args:
        intensity: (N, 1, H, W) in [0, 1].
        colors: (N,) color indices 0..6.

    Returns:
        (N, 3, H, W) float32 in [-1, 1]: ``intensity * COLOR_RGB[color] * 2 - 1``.
    """
    rgb = COLOR_RGB[np.asarray(colors, dtype=np.int64)][:, :, None, None]  # (N, 3, 1, 1)
    return (intensity * rgb * 2.0 - 1.0).astype(np.float32)


def split_indices(split: str = "train", split_seed: int = 0, test_fraction: float = 0.2) -> np.ndarray:
    """Source image indices (into the 1,797 digits) of a split: ``digits_split``'s train or test part, or all."""
    from distill.benchmarks.digits.judge import digits_split

    digits = _digit_labels()
    if split == "all":
        return np.arange(len(digits), dtype=np.int64)
    train_idx, test_idx = digits_split(digits, seed=split_seed, test_fraction=test_fraction)
    if split == "train":
        return train_idx
    if split == "test":
        return test_idx
    raise DistillError(f"split must be 'train', 'test' or 'all', got {split!r}.")


def _digit_labels() -> np.ndarray:
    return _intensity_images(IMAGE_SIZE)[1].copy()


def row_templates(captions: str = "train", seed: int = 0) -> np.ndarray:
    """The template index (into :data:`TEMPLATES`) of each of the 1797 * 7 rows, row ``r = 7 * image + color``.

    ``captions="train"`` draws from :data:`TRAIN_TEMPLATES`, ``"heldout"`` from :data:`HELDOUT_TEMPLATES`,
    ``"all"`` from all of them; each uniformly, from ``numpy.random.default_rng(seed)``.
    """
    pools = {"train": range(len(TRAIN_TEMPLATES)),
             "heldout": range(len(TRAIN_TEMPLATES), len(TEMPLATES)),
             "all": range(len(TEMPLATES))}
    if captions not in pools:
        raise DistillError(f"captions must be 'train', 'heldout' or 'all', got {captions!r}.")
    pool = np.asarray(list(pools[captions]), dtype=np.int64)
    n_rows = 1797 * len(COLORS)
    return pool[np.random.default_rng(seed).integers(0, len(pool), size=n_rows)]


def text_digits_arrays(split: str = "train", colors: str = "all") -> dict[str, np.ndarray]:
    """The split as arrays (what the classifier and VAE train on, without going through ``datasets``).

    Args:
        split: "train" (1,437 source images), "test" (360) or "all" (1,797).
        colors: "all" gives every image in every color, rows ordered (image, color); "none" gives the intensity
            images once each (for drawing colors on the fly).

    Returns:
        dict with ``image`` (N, 3, 32, 32) float32 in [-1, 1] (or ``intensity`` (n, 1, 32, 32) in [0, 1] for
        colors="none"), ``digit`` (N,), ``color`` (N,), ``row`` (N,) row numbers ``7 * source + color`` and
        ``source`` (N,) indices into the 1,797 digits.
    """
    intensity, digits = intensity_images()
    idx = split_indices(split)
    if colors == "none":
        return {"intensity": intensity[idx], "digit": digits[idx], "source": idx}
    if colors != "all":
        raise DistillError(f"colors must be 'all' or 'none', got {colors!r}.")
    k = len(COLORS)
    source = np.repeat(idx, k)
    color = np.tile(np.arange(k, dtype=np.int64), len(idx))
    return {"image": colorize(intensity[source], color), "digit": digits[source], "color": color,
            "row": source * k + color, "source": source}


def text_digits_dataset(split: str = "train", captions: str = "train", seed: int = 0) -> Any:
    """Colored digits as a ``datasets.Dataset`` in torch format (see the module docstring for the columns).

    Args:
        split: "train" (10,059 rows), "test" (2,520) or "all" (12,579): source images of ``digits_split``
            (seed 0, 20% held out), each in all seven colors.
        captions: which templates caption the rows: "train" (never the held-out ones), "heldout" or "all".
        seed: template-assignment seed.
    """
    import datasets

    arrays = text_digits_arrays(split)
    templates = row_templates(captions, seed)[arrays["row"]]
    texts = [caption(TEMPLATES[t], d, c) for t, d, c in zip(templates, arrays["digit"], arrays["color"])]
    features = datasets.Features({
        "image": datasets.Array3D(shape=(3, IMAGE_SIZE, IMAGE_SIZE), dtype="float32"),
        "caption": datasets.Value("string"),
        "digit": datasets.Value("int64"),
        "color": datasets.Value("int64"),
    })
    ds = datasets.Dataset.from_dict(
        {"image": arrays["image"], "caption": texts, "digit": arrays["digit"], "color": arrays["color"]},
        features=features,
    )
    return ds.with_format("torch")


def dataset(split: str = "train") -> Any:
    """``data.name: text-digits``: the split ``train``, ``test`` or ``all`` (any other name reads ``train``)."""
    return text_digits_dataset(split=split if split in ("train", "test", "all") else "train")


def save_text_digits(folder: str | Path, split: str = "train", captions: str = "train", seed: int = 0) -> Path:
    """Write :func:`text_digits_dataset` to ``folder`` with ``save_to_disk`` (load with ``datasets.load_from_disk``
    or as distill's ``data.name``); returns the folder."""
    folder = Path(folder)
    text_digits_dataset(split, captions, seed).save_to_disk(str(folder))
    return folder


def prompt_set() -> list[Prompt]:
    """The evaluation prompts: every digit x color in each held-out phrasing (2 x 10 x 7 = 140), ordered by
    template, then digit, then color."""
    base = len(TRAIN_TEMPLATES)
    return [Prompt(caption(t, d, c), d, c, base + i)
            for i, t in enumerate(HELDOUT_TEMPLATES) for d in range(10) for c in range(len(COLORS))]


def main(argv: list[str] | None = None) -> None:
    """``python -m distill.benchmarks.text_digits.data --out DIR [--split train] [--captions train] [--seed 0]``."""
    parser = argparse.ArgumentParser(prog="python -m distill.benchmarks.text_digits.data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for datasets.save_to_disk")
    parser.add_argument("--split", default="train", choices=["train", "test", "all"])
    parser.add_argument("--captions", default="train", choices=["train", "heldout", "all"])
    parser.add_argument("--seed", type=int, default=0, help="template-assignment seed")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    save_text_digits(args.out, args.split, args.captions, args.seed)
    print(f"wrote the {args.split} split ({args.captions} captions) to {args.out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
