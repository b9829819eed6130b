"""Change a recipe's loss: name your own distance in the YAML, by file path or dotted path.

    python examples/custom_loss.py                    # consistency distillation of the digits teacher with it
    distill run recipes/digits/consistency.yaml --out runs/cd-charbonnier \\
        method.distance=examples/custom_loss.py:charbonnier

``method.distance`` of the consistency and progressive recipes takes a built-in name (l2, l1, pseudo_huber, lpips),
``package.module:function`` or ``path/to/file.py:function``. A distance gets the student's prediction and the
target, both (B, C, H, W) images, and returns one number per sample (B,); the method applies its weighting
lambda(sigma) and averages over the batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "digits" / "consistency.yaml"


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Charbonnier distance per sample: the mean over pixels of sqrt((pred - target)^2 + eps^2) - eps.

    Quadratic for errors below eps and linear above, like pseudo-Huber; it is 0 exactly when pred == target.
    """
    return ((pred - target).pow(2) + eps**2).sqrt().sub(eps).flatten(1).mean(1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/custom-loss")
    p.add_argument("--steps", type=int, default=300, help="training steps (300: about a minute on 2 CPU cores)")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the shipped digits teacher)")
    p.add_argument("--no-eval", action="store_true", help="skip scoring the student")
    args = p.parse_args(argv)

    from distill.recipe import load_recipe
    from distill.trainer import Trainer

    overrides = [f"method.distance={Path(__file__).resolve()}:charbonnier", f"method.iters={args.steps}",
                 "method.sample_steps=[1, 2, 4]", "eval.steps=[1, 2, 4]", "trainer.checkpoint_every=0"]
    if args.teacher:
        overrides.append(f"teacher={args.teacher}")
    if args.no_eval:
        overrides.append("eval.protocol=null")
    trainer = Trainer(load_recipe(RECIPE, overrides), args.out)
    assert trainer.method.distance.__name__ == "charbonnier"  # the recipe now trains with the function above
    result = trainer.fit(resume=False)
    print(f"trained {result['step']} steps with the charbonnier distance; student in {Path(args.out) / 'model'}")
    return result


if __name__ == "__main__":
    main()
