"""``distill`` command line. Input problems print one red sentence and exit with status 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from distill.errors import ConfigError, DistillError

console = Console(stderr=False)
err_console = Console(stderr=True)

ASSETS = Path(__file__).resolve().parent / "assets"
DIGITS_TEACHER = ASSETS / "digits-teacher"


def _threads() -> None:
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))


def cmd_validate(args: argparse.Namespace) -> int:
    from distill.config import load_recipe

    cfg = load_recipe(args.recipe, args.overrides)
    console.print(f"[green]ok[/green] {args.recipe}: method [bold]{cfg.method_name}[/bold], "
                  f"{cfg.trainer.max_steps} steps at batch {cfg.trainer.batch_size}")
    return 0


def cmd_run(args: argparse.Namespace, require_method: str | None = None) -> int:
    from distill.config import load_recipe
    from distill.trainer import Trainer

    cfg = load_recipe(args.recipe, args.overrides)
    if require_method is not None and cfg.method_name != require_method:
        raise DistillError(
            f"{args.recipe} is a {cfg.method_name!r} recipe; `distill teacher` trains teachers, use `distill run`."
        )
    out = Path(args.out)
    if (out / "checkpoints").is_dir() and not args.fresh:
        console.print(f"[yellow]resuming[/yellow] from the newest checkpoint in {out / 'checkpoints'} "
                      "(pass --fresh to start over)")
    _threads()
    result = Trainer(cfg, out).fit(resume=not args.fresh)
    console.print(f"[green]done[/green]: {result['step']} steps in {result['wall_s']:.0f} s "
                  f"({result['skipped']} skipped); model in {out / 'model'}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from distill.denoisers import load_denoiser
    from distill.eval.grid import save_grid
    from distill.eval.sweep import generate, sigma_grid

    _threads()
    if args.n < 1 or args.steps < 1:
        raise DistillError("--n and --steps must be at least 1.")
    D = load_denoiser(args.model).eval()
    cfg = D.unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    sigmas = sigma_grid(D, args.steps, args.grid)
    imgs = generate(D, args.sampler, sigmas, args.n, shape, seed=args.seed, batch_size=max(1, args.batch_size))
    path = save_grid(imgs, args.out, scale=args.scale)
    console.print(f"wrote {args.n} samples ({args.sampler}, {args.steps} steps, {args.grid} grid) to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from distill.eval.grid import save_grid
    from distill.eval.sweep import digits_curve, digits_reference, generate, sigma_grid
    from distill.denoisers import load_denoiser

    _threads()
    console.print("[bold]distill demo[/bold]: the distillation recipes are not in this build yet, so this samples "
                  "the shipped digits teacher and measures its FD-digits against DDIM steps.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    D = load_denoiser(DIGITS_TEACHER).eval()
    ref = digits_reference()
    steps = [1, 2, 4, 8, 16, 32]
    rows = digits_curve(D, ["ddim"], steps, ref)
    table = Table(title=f"Shipped digits teacher, DDIM (FD-digits, n={ref.n}; lower is better)")
    table.add_column("steps", justify="right")
    table.add_column("FD-digits", justify="right")
    table.add_column("x floor", justify="right")
    for r in rows:
        table.add_row(str(r["steps"]), f"{r['value']:.2f}", f"{r['value'] / ref.floor:.1f}")
    table.add_row("data floor", f"{ref.floor:.2f}", "1.0", style="dim")
    console.print(table)
    for k in (1, 4, 32):
        save_grid(generate(D, "ddim", sigma_grid(D, k), 64, (1, 8, 8), seed=0), out / f"teacher-ddim-{k}.png")
    console.print(f"sample grids in {out}/teacher-ddim-{{1,4,32}}.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from distill.samplers import SAMPLERS

    p = argparse.ArgumentParser(prog="distill", description="Distill diffusion teachers into few-step students.")
    sub = p.add_subparsers(dest="command", required=True)

    def add_recipe(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("recipe", help="recipe YAML, e.g. recipes/digits/teacher.yaml")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=50")

    sp = sub.add_parser("validate", help="check a recipe (unknown keys, types, values) without running it")
    add_recipe(sp)
    sp.set_defaults(fn=cmd_validate)

    for name, helptext in (("teacher", "train a teacher with a teacher recipe"), ("run", "run any recipe")):
        sp = sub.add_parser(name, help=helptext)
        add_recipe(sp)
        sp.add_argument("--out", required=True, help="run folder (config.yaml, checkpoints/, metrics.jsonl, model/)")
        sp.add_argument("--fresh", action="store_true", help="ignore checkpoints in --out and start over")
        sp.set_defaults(fn=(lambda a, _n=name: cmd_run(a, "teacher" if _n == "teacher" else None)))

    sp = sub.add_parser("sample", help="write a PNG grid of samples from a model folder")
    sp.add_argument("model", help="diffusers pipeline folder (or hub id when online)")
    sp.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    sp.add_argument("--steps", type=int, default=16)
    sp.add_argument("--grid", default="trailing", choices=["trailing", "leading", "linspace", "karras"],
                    help="sigma grid: the model's timesteps with diffusers' spacing, or Karras et al.")
    sp.add_argument("--n", type=int, default=64)
    sp.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    sp.add_argument("--batch-size", type=int, default=256)
    sp.add_argument("--scale", type=int, default=8, help="nearest-neighbour upscaling of each pixel")
    sp.add_argument("--out", default="samples.png")
    sp.set_defaults(fn=cmd_sample)

    sp = sub.add_parser("demo", help="sample and score the shipped digits teacher (what `make demo` runs)")
    sp.add_argument("--out", default="demo-out")
    sp.set_defaults(fn=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after options (`distill run R.yaml --out D a.b=1`): collect them here.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.fn(args)
    except ConfigError as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except DistillError as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]; run the same command again to resume from the last checkpoint.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
