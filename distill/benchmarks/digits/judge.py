"""The FD-digits feature network: a small CNN classifier for scikit-learn's 8x8 digits.

FD-digits is the Frechet distance in the 64-dimensional penultimate-layer feature space of this network.
It is the embedded benchmark's stand-in for Inception FID (it is not Inception FID, and its numbers are
not comparable to FID). The network is trained by this file and shipped in ``distill/assets/digits-features``:

    python -m distill.benchmarks.digits.judge --out distill/assets/digits-features --seed 0

The network is an evaluation instrument only: it never feeds a training loss or a discriminator, since a
metric that also trains a model would grade its own student (the adversarial recipe refuses it as a backbone).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.benchmarks.judges import JudgeNet, load_judge, load_judge_config, save_judge, shipped_folder
from distill.tensors import weights_hash

__all__ = [
    "DEFAULT_FOLDER",
    "DigitsNet",
    "digits_array",
    "digits_split",
    "shift_augment",
    "accuracy",
    "train_digits_net",
    "save_digits_net",
    "load_digits_config",
    "load_digits_net",
    "weights_hash",
]

DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "assets" / "digits-features"


class DigitsNet(JudgeNet):
    """Small CNN for 1x8x8 digit images in [-1, 1] (~36k parameters).

    Layout (shapes for a batch of B):
        (B, 1, 8, 8) -conv3x3+ReLU-> (B, c1, 8, 8) -maxpool-> (B, c1, 4, 4)
        -conv3x3+ReLU-> (B, c2, 4, 4) -maxpool-> (B, c2, 2, 2) -flatten-> (B, 4*c2)
        -linear+SiLU-> (B, feature_dim)   <- features()
        -linear-> (B, num_classes)         <- forward()

    The penultimate nonlinearity is SiLU, not ReLU: with ReLU about 40% of the 64 units were zero on every
    digit (a dozen already at init). The skeleton is :class:`~distill.benchmarks.judges.JudgeNet`.
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = 64, num_classes: int = 10,
                 dropout: float = 0.2) -> None:
        super().__init__((1, 8, 8), channels, feature_dim, dropout)
        self.num_classes = int(num_classes)
        self.fc2 = nn.Linear(self.feature_dim, self.num_classes)

    def architecture(self) -> dict[str, Any]:
        """Constructor arguments, as written to config.json."""
        return {"channels": list(self.channels), "feature_dim": self.feature_dim,
                "num_classes": self.num_classes, "dropout": self.dropout_p}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits: (B, 1, 8, 8) images in [-1, 1] -> (B, num_classes)."""
        return self.fc2(self.dropout(self.features(x)))


def digits_array() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, scaled the same way as distill.data.

    Returns:
        images: (1797, 1, 8, 8) float32 in [-1, 1] (pixel values 0..16 mapped by x / 8 - 1).
        labels: (1797,) int64 class labels 0..9.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 8.0 - 1.0).reshape(-1, 1, 8, 8)
    return images, d.target.astype(np.int64)


def digits_split(labels: np.ndarray, seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train / held-out split of the digits indices.

    Args:
        labels: (N,) class labels (from digits_array()).
        seed: split seed; the shipped net records the one it used in config.json.
        test_fraction: share of each class held out.

    Returns:
        train_idx (N_train,), test_idx (N_test,): sorted int64 index arrays, disjoint, covering 0..N-1.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    return np.sort(train_idx).astype(np.int64), np.sort(test_idx).astype(np.int64)


def shift_augment(x: torch.Tensor, generator: torch.Generator | None = None, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by a random integer offset in [-max_shift, max_shift] on each axis.

    Vacated pixels are filled with -1 (the digits' blank background), not 0, which would read as grey ink.

    Args:
        x: (B, C, H, W) images in [-1, 1].

    Returns:
        (B, C, H, W) shifted images.
    """
    b, _, h, w = x.shape
    m = max_shift
    padded = F.pad(x, (m, m, m, m), value=-1.0)
    dy = torch.randint(0, 2 * m + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * m + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b)[:, None, None, None]
    chan = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chan, rows, cols]


@torch.no_grad()
def accuracy(net: DigitsNet, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
             batch_size: int = 512) -> float:
    """Top-1 accuracy of ``net`` (put in eval mode) on (N, 1, 8, 8) images with (N,) labels."""
    net.eval()
    x = torch.as_tensor(images, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.int64)
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((net(x[i:i + batch_size]).argmax(dim=1) == y[i:i + batch_size]).sum())
    return correct / len(x)


def train_digits_net(seed: int = 0, epochs: int = 40, batch_size: int = 64, lr: float = 3e-3,
                     weight_decay: float = 1e-4, split_seed: int = 0, test_fraction: float = 0.2,
                     augment: bool = True, channels: tuple[int, int] = (32, 64), feature_dim: int = 64,
                     dropout: float = 0.2) -> tuple[DigitsNet, dict[str, Any]]:
    """Train a DigitsNet on the train split and measure it on the held-out split.

    Adam with a cosine learning-rate decay for a fixed number of epochs; the held-out split is only used
    for the final report, never to pick an epoch, so the reported accuracy is an honest estimate.

    Returns:
        (net in eval mode, report) where report holds heldout_accuracy, train_accuracy, n_train, n_test,
        seed, split_seed, test_fraction, epochs, train_seconds and the hyper-parameters.
    """
    t0 = time.perf_counter()
    images, labels = digits_array()
    train_idx, test_idx = digits_split(labels, seed=split_seed, test_fraction=test_fraction)
    x_train, y_train = torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx])
    x_test, y_test = torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx])

    # A private generator drives shuffling and augmentation; init and dropout use the global one, so it is
    # seeded inside fork_rng to reproduce the run without disturbing the caller's random state.
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitsNet(channels=channels, feature_dim=feature_dim, dropout=dropout)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x_train), generator=gen)
            for i in range(0, len(perm), batch_size):
                batch = perm[i:i + batch_size]
                xb = x_train[batch]
                if augment:
                    xb = shift_augment(xb, generator=gen)
                loss = F.cross_entropy(net(xb), y_train[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    net.eval()
    seconds = time.perf_counter() - t0

    report: dict[str, Any] = {
        "heldout_accuracy": accuracy(net, x_test, y_test),
        "train_accuracy": accuracy(net, x_train, y_train),
        "n_train": int(len(train_idx)),
        "n_test": int(len(test_idx)),
        "seed": int(seed),
        "split_seed": int(split_seed),
        "test_fraction": float(test_fraction),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "augment": "random shift +-1 px" if augment else "none",
        "train_seconds": round(seconds, 2),
        "n_params": int(sum(p.numel() for p in net.parameters())),
    }
    return net, report


def save_digits_net(net: DigitsNet, folder: str | Path, report: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture, training report, versions) to ``folder``."""
    return save_judge(net, folder, {
        "name": "FD-digits feature network (not Inception)",
        "input": "(B, 1, 8, 8) float32 in [-1, 1]; sklearn load_digits scaled as x / 8 - 1",
        "features": f"(B, {net.feature_dim}) penultimate layer after SiLU",
    }, report)


def resolve_folder(folder: str | Path | None) -> Path:
    """A DigitsNet folder: ``folder`` itself, or the shipped asset of that name (``digits-features-b``);
    None is the default network."""
    return shipped_folder(folder, DEFAULT_FOLDER)


def load_digits_config(folder: str | Path | None = None) -> dict[str, Any]:
    """The config.json of a saved DigitsNet (default: the shipped one)."""
    return load_judge_config(resolve_folder(folder), __name__)


def load_digits_net(folder: str | Path | None = None) -> DigitsNet:
    """Load a DigitsNet from ``folder`` (default: the shipped ``distill/assets/digits-features``), in eval mode.

    Only safetensors weights are read; nothing is unpickled.
    """
    return load_judge(DigitsNet, resolve_folder(folder), "digits feature network", __name__)


def judges() -> list[DigitsNet]:
    """Both shipped FD-digits networks (``digits-features``, ``digits-features-b``): never a discriminator."""
    return [load_digits_net(None), load_digits_net("digits-features-b")]


def main(argv: list[str] | None = None) -> None:
    """Train, save and report: ``python -m distill.benchmarks.digits.judge --out FOLDER [--seed 0] [--epochs 40]``."""
    parser = argparse.ArgumentParser(prog="python -m distill.benchmarks.digits.judge", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_FOLDER, help="folder to write the net to")
    parser.add_argument("--seed", type=int, default=0, help="init / shuffle / augmentation seed")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps the run reproducible)")
    parser.add_argument("--channels", default="32,64", help="the two conv widths, e.g. 24,48")
    parser.add_argument("--feature-dim", type=int, default=64, help="width of the penultimate (feature) layer")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        c1, c2 = (int(c) for c in args.channels.split(","))
    except ValueError:
        parser.error(f"--channels takes two integers like 32,64, got {args.channels!r}")
    net, report = train_digits_net(seed=args.seed, epochs=args.epochs, channels=(c1, c2), feature_dim=args.feature_dim)
    save_digits_net(net, args.out, report)
    print(f"held-out accuracy {report['heldout_accuracy']:.4f} ({report['n_test']} images), "
          f"train accuracy {report['train_accuracy']:.4f}, {report['n_params']} params, "
          f"{report['train_seconds']:.1f} s; saved to {args.out} (weights hash {weights_hash(net)})")


if __name__ == "__main__":
    main()
