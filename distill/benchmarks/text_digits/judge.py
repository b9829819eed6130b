"""The FD-text-digits feature network: a small CNN that reads the digit and the color of a 32x32 colored digit.

It is the colored-digits benchmark's evaluation instrument (:mod:`distill.benchmarks.text_digits.data`): its two heads say whether
a text-to-image model drew the digit and the color a prompt asked for, and its 64-dimensional penultimate layer
gives FD-text-digits, the Frechet distance between generated and held-out real images in that feature space (a
stand-in for Inception FID; not comparable to it). It is trained by this file and shipped in
``distill/assets/text-digits-features``:

    python -m distill.benchmarks.text_digits.judge --out distill/assets/text-digits-features --seed 0

A second, independently trained network (another seed, narrower convolutions, 48-d features) is shipped in
``distill/assets/text-digits-features-b`` for cross-checking rankings (protocol ``text-digits-b``, metric
FD-text-digits-b): a result that holds in both feature spaces is not an artefact of one. It is trained by

    python -m distill.benchmarks.text_digits.judge --out distill/assets/text-digits-features-b --seed 1 \
        --channels 24,48,48 --feature-dim 48 --threads 1

Like the FD-digits network it is never part of a training loss: a metric that also trains a model would grade its
own student.
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
from distill.benchmarks.digits.judge import shift_augment
from distill.tensors import weights_hash

__all__ = [
    "DEFAULT_FOLDER",
    "TextDigitsNet",
    "accuracy",
    "color_jitter",
    "load_text_digits_config",
    "load_text_digits_net",
    "main",
    "resolve_folder",
    "save_text_digits_net",
    "train_text_digits_net",
    "weights_hash",
]

DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "assets" / "text-digits-features"
SECOND_FOLDER = "text-digits-features-b"  # the independently trained second network (protocol text-digits-b)


class TextDigitsNet(JudgeNet):
    """Small CNN for 3x32x32 colored digits in [-1, 1], with a digit head and a color head (~120k parameters).

    Layout (shapes for a batch of B, default widths c = (32, 64, 64)):
        (B, 3, 32, 32) -conv3x3+ReLU-> (B, c1, 32, 32) -maxpool-> (B, c1, 16, 16)
        -conv3x3+ReLU-> (B, c2, 16, 16) -maxpool-> (B, c2, 8, 8)
        -conv3x3+ReLU-> (B, c3, 8, 8) -maxpool-> (B, c3, 4, 4) -flatten-> (B, 16*c3)
        -linear+SiLU-> (B, feature_dim)                                   <- features()
        -linear-> (B, 10) digit logits, -linear-> (B, 7) color logits    <- forward()

    Both heads read the same features, so FD-text-digits sees shape and color. The skeleton (SiLU features, no batch
    norm) is :class:`~distill.benchmarks.judges.JudgeNet`, shared with the digits benchmark's net.
    """

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 64), feature_dim: int = 64, num_digits: int = 10,
                 num_colors: int = 7, dropout: float = 0.2) -> None:
        super().__init__((3, 32, 32), channels, feature_dim, dropout)
        self.num_digits = int(num_digits)
        self.num_colors = int(num_colors)
        self.digit_head = nn.Linear(self.feature_dim, self.num_digits)
        self.color_head = nn.Linear(self.feature_dim, self.num_colors)

    def architecture(self) -> dict[str, Any]:
        """Constructor arguments, as written to config.json."""
        return {"channels": list(self.channels), "feature_dim": self.feature_dim, "num_digits": self.num_digits,
                "num_colors": self.num_colors, "dropout": self.dropout_p}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 32, 32) images in [-1, 1] -> (digit logits (B, 10), color logits (B, 7))."""
        f = self.dropout(self.features(x))
        return self.digit_head(f), self.color_head(f)

    @torch.no_grad()
    def predict(self, images: torch.Tensor | np.ndarray, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted (digit (N,), color (N,)) int64 labels of (N, 3, 32, 32) images in [-1, 1] (eval mode)."""
        self.eval()
        x = torch.as_tensor(images, dtype=torch.float32)
        digits, colors = [], []
        for i in range(0, len(x), batch_size):
            d, c = self(x[i:i + batch_size].to(self.fc1.weight.device))
            digits.append(d.argmax(dim=1).cpu())
            colors.append(c.argmax(dim=1).cpu())
        return torch.cat(digits), torch.cat(colors)


def color_jitter(x: torch.Tensor, generator: torch.Generator | None = None, low: float = 0.7) -> torch.Tensor:
    """Scale each image's ink by a random brightness in [low, 1] (the background stays black, -1).

    Args:
        x: (B, C, H, W) images in [-1, 1].

    Returns:
        (B, C, H, W) images in [-1, 1].
    """
    scale = low + (1.0 - low) * torch.rand(x.shape[0], 1, 1, 1, generator=generator)
    return (x + 1.0) * scale - 1.0


@torch.no_grad()
def accuracy(net: TextDigitsNet, images: torch.Tensor | np.ndarray, digits: torch.Tensor | np.ndarray,
             colors: torch.Tensor | np.ndarray, batch_size: int = 512) -> dict[str, float]:
    """Top-1 accuracies of ``net`` on (N, 3, 32, 32) images: ``{"digit", "color", "joint"}`` (joint: both right)."""
    d_hat, c_hat = net.predict(images, batch_size=batch_size)
    d_ok = d_hat == torch.as_tensor(digits, dtype=torch.int64)
    c_ok = c_hat == torch.as_tensor(colors, dtype=torch.int64)
    return {"digit": float(d_ok.float().mean()), "color": float(c_ok.float().mean()),
            "joint": float((d_ok & c_ok).float().mean())}


def train_text_digits_net(seed: int = 0, epochs: int = 30, colors_per_epoch: int = 2, batch_size: int = 64,
                          lr: float = 3e-3, weight_decay: float = 1e-4, max_shift: int = 2, jitter: float = 0.7,
                          channels: tuple[int, int, int] = (32, 64, 64), feature_dim: int = 64,
                          dropout: float = 0.2) -> tuple[TextDigitsNet, dict[str, Any]]:
    """Train a TextDigitsNet on the train split and measure it on the held-out split (all colors of both).

    Each epoch sees every training image ``colors_per_epoch`` times, each time in a color drawn at random, shifted
    by up to ``max_shift`` pixels and with its ink brightness scaled by U(jitter, 1). Loss: the sum of the two
    heads' cross-entropies. Adam with cosine decay for a fixed number of epochs; the held-out split only serves
    the final report, never to pick an epoch.

    Returns:
        (net in eval mode, report) with heldout_{digit,color,joint}_accuracy (360 test images x 7 colors),
        train_joint_accuracy, sizes, seeds, hyper-parameters and train_seconds.
    """
    from distill.benchmarks.text_digits.data import COLOR_RGB, text_digits_arrays

    t0 = time.perf_counter()
    train = text_digits_arrays("train", colors="none")
    test = text_digits_arrays("test")
    ink = torch.from_numpy(train["intensity"])  # (n, 1, 32, 32) in [0, 1]
    y_digit = torch.from_numpy(train["digit"])
    rgb = torch.from_numpy(COLOR_RGB)  # (7, 3)
    n, k = len(ink), len(rgb)

    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (n * colors_per_epoch + batch_size - 1) // batch_size
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = TextDigitsNet(channels=channels, feature_dim=feature_dim, dropout=dropout)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        net.train()
        for _ in range(epochs):
            perm = torch.cat([torch.randperm(n, generator=gen) for _ in range(colors_per_epoch)])
            color = torch.randint(0, k, (len(perm),), generator=gen)
            for i in range(0, len(perm), batch_size):
                idx, c = perm[i:i + batch_size], color[i:i + batch_size]
                xb = ink[idx] * rgb[c][:, :, None, None] * 2.0 - 1.0
                if max_shift:
                    xb = shift_augment(xb, generator=gen, max_shift=max_shift)
                if jitter < 1.0:
                    xb = color_jitter(xb, generator=gen, low=jitter)
                d_logits, c_logits = net(xb)
                loss = F.cross_entropy(d_logits, y_digit[idx]) + F.cross_entropy(c_logits, c)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    net.eval()
    seconds = time.perf_counter() - t0

    held = accuracy(net, test["image"], test["digit"], test["color"])
    tr = text_digits_arrays("train")
    train_acc = accuracy(net, tr["image"], tr["digit"], tr["color"])
    report: dict[str, Any] = {
        "heldout_digit_accuracy": held["digit"],
        "heldout_color_accuracy": held["color"],
        "heldout_joint_accuracy": held["joint"],
        "train_joint_accuracy": train_acc["joint"],
        "n_train": len(tr["digit"]),
        "n_test": len(test["digit"]),
        "data": "distill.benchmarks.text_digits.data: digits_split(seed=0, test_fraction=0.2) source images, each in all 7 colors",
        "seed": int(seed),
        "epochs": int(epochs),
        "colors_per_epoch": int(colors_per_epoch),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "augment": f"random color; random shift +-{max_shift} px; ink brightness x U({jitter}, 1)",
        "train_seconds": round(seconds, 2),
        "threads": torch.get_num_threads(),
        "n_params": int(sum(p.numel() for p in net.parameters())),
    }
    return net, report


def save_text_digits_net(net: TextDigitsNet, folder: str | Path, report: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture, training report, versions) to ``folder``."""
    from distill.benchmarks.text_digits.data import COLORS

    return save_judge(net, folder, {
        "name": "FD-text-digits feature network (not Inception)",
        "input": "(B, 3, 32, 32) float32 in [-1, 1]; distill.benchmarks.text_digits.data colored digits",
        "features": f"(B, {net.feature_dim}) penultimate layer after SiLU",
        "outputs": {"digit": "0..9", "color": COLORS},
    }, report)


def resolve_folder(folder: str | Path | None) -> Path:
    """A TextDigitsNet folder: ``folder`` itself, or the shipped asset of that name (``text-digits-features-b``);
    None is the default network."""
    return shipped_folder(folder, DEFAULT_FOLDER)


def load_text_digits_config(folder: str | Path | None = None) -> dict[str, Any]:
    """The config.json of a saved TextDigitsNet (default: the shipped one; a shipped folder's name also works)."""
    return load_judge_config(resolve_folder(folder), __name__)


def load_text_digits_net(folder: str | Path | None = None) -> TextDigitsNet:
    """Load a TextDigitsNet from ``folder`` (default: ``distill/assets/text-digits-features``; a shipped folder's
    name such as ``text-digits-features-b`` also works), in eval mode.

    Only safetensors weights are read; nothing is unpickled.
    """
    return load_judge(TextDigitsNet, resolve_folder(folder), "text-digits feature network", __name__)


def judges() -> list[TextDigitsNet]:
    """Both shipped FD-text-digits classifiers (``text-digits-features``, ``text-digits-features-b``): never a
    discriminator."""
    return [load_text_digits_net(None), load_text_digits_net(SECOND_FOLDER)]


def main(argv: list[str] | None = None) -> None:
    """Train, save and report: ``python -m distill.benchmarks.text_digits.judge --out FOLDER [--seed 0] [--epochs 30]``."""
    parser = argparse.ArgumentParser(prog="python -m distill.benchmarks.text_digits.judge",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_FOLDER, help="folder to write the net to")
    parser.add_argument("--seed", type=int, default=0, help="init / shuffle / augmentation seed")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--colors-per-epoch", type=int, default=2, help="times each training image is seen per "
                        "epoch, each in a random color")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (a fixed count keeps the run "
                        "reproducible on one machine)")
    parser.add_argument("--channels", default="32,64,64", help="the three conv widths, e.g. 16,32,64")
    parser.add_argument("--feature-dim", type=int, default=64, help="width of the penultimate (feature) layer")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        c1, c2, c3 = (int(c) for c in args.channels.split(","))
    except ValueError:
        parser.error(f"--channels takes three integers like 32,64,64, got {args.channels!r}")
    net, report = train_text_digits_net(seed=args.seed, epochs=args.epochs, colors_per_epoch=args.colors_per_epoch,
                                        channels=(c1, c2, c3), feature_dim=args.feature_dim)
    save_text_digits_net(net, args.out, report)
    print(f"held-out accuracy ({report['n_test']} images): digit {report['heldout_digit_accuracy']:.4f}, "
          f"color {report['heldout_color_accuracy']:.4f}, joint {report['heldout_joint_accuracy']:.4f}; "
          f"train joint {report['train_joint_accuracy']:.4f}; {report['n_params']} params, "
          f"{report['train_seconds']:.1f} s; saved to {args.out} (weights hash {weights_hash(net)})")


if __name__ == "__main__":
    main()
