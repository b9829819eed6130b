"""``distill`` command line. Input problems print one red sentence and exit with status 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.markup import escape

from distill.errors import ConfigError, DistillError

console = Console(width=None if sys.stdout.isatty() else 160)  # pipes and logs: do not wrap tables at 80
err_console = Console(stderr=True)



def cmd_validate(args: argparse.Namespace) -> int:
    from distill.recipe import load_recipe

    cfg = load_recipe(args.recipe, args.overrides)
    console.print(f"[green]ok[/green] {args.recipe}: method [bold]{cfg.method_name}[/bold], "
                  f"{cfg.trainer.max_steps} steps at batch {cfg.trainer.batch_size}")
    return 0


def cmd_run(args: argparse.Namespace, require_method: str | None = None) -> int:
    from distill.recipe import load_recipe
    from distill.trainer import Trainer

    cfg = load_recipe(args.recipe, args.overrides)
    if require_method is not None and cfg.method_name != require_method:
        raise DistillError(
            f"{args.recipe} is a {cfg.method_name!r} recipe; `distill teacher` trains teachers, use `distill run`."
        )
    out = Path(args.out)
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun / accelerate launch, rank 0 speaks
    if (out / "checkpoints").is_dir() and not args.fresh and main_process:
        console.print(f"[yellow]resuming[/yellow] from the newest checkpoint in {out / 'checkpoints'} "
                      "(pass --fresh to start over)")
    result = Trainer(cfg, out, recipe_name=str(args.recipe)).fit(resume=not args.fresh)
    if main_process:
        console.print(f"[green]done[/green]: {result['step']} steps in {result['wall_s']:.0f} s "
                      f"({result['skipped']} skipped); model in {out / 'model'}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from distill.media import MEDIA_SUFFIX, kind_of, save_media
    from distill.models import open_model
    from distill.eval.sweep import denoiser_draw, generate, sigma_grid

    if args.n < 1 or args.steps < 1 or args.batch_size < 1:
        raise DistillError("--n, --steps and --batch-size must be at least 1.")
    m = open_model(args.model)
    D, pipe = m.denoiser, m.pipeline
    kind = pipe.conditioning if pipe is not None else None
    if kind == "text" and args.label is not None or kind == "class" and args.prompt is not None:
        raise DistillError(f"{args.model} takes {'--prompt' if kind == 'text' else '--label'}, not the other.")
    if kind == "text" and args.prompt is None:
        raise DistillError(f"{args.model} is a text-conditional {pipe.class_name}; pass --prompt TEXT.")
    if kind == "class" and args.label is None:
        raise DistillError(f"{args.model} is class-conditional; pass --label N (0..{pipe.num_classes - 1}).")
    if kind is None and (args.prompt is not None or args.label is not None or args.guidance is not None):
        raise DistillError(f"{args.model} is unconditional; it takes no --prompt, --label or --guidance.")
    sampler = args.sampler or m.samplers[0]
    if m.method != "teacher" and m.steps is not None and args.steps not in m.steps:
        raise DistillError(f"{args.model} is a {m.method} student for {list(m.steps)} steps; pass --steps {m.steps[0]}.")
    from distill.samplers import SCHEDULER_SAMPLERS, scheduler_sigmas

    if args.steps in m.sigmas and args.grid is None:
        sigmas, grid = torch.tensor(m.sigmas[args.steps], dtype=torch.float64), "student's own"
    elif sampler in SCHEDULER_SAMPLERS:
        sigmas, grid = scheduler_sigmas(D, sampler, args.steps), "its scheduler's"
    else:
        grid = args.grid or ("karras" if sampler == "heun" else "trailing")
        sigmas = sigma_grid(D, args.steps, grid, args.sigma_max)
    cond: dict = {}
    if kind == "text":
        cond = {k: v.expand(args.n, *v.shape[1:]) for k, v in pipe.encode_prompts([args.prompt]).items()}
    elif kind == "class":
        cond = pipe.labels([args.label] * args.n)
    w = args.guidance if args.guidance is not None else (m.guidance if kind is not None else None)
    if w is not None and D.takes_guidance:
        cond["guidance"] = float(w)
    elif w is not None and w != 1:
        from distill.guidance import CFGDenoiser

        D = CFGDenoiser(D, pipe.unconditional(), float(w))
    decode = pipe.to_images if pipe is not None and pipe.spec.latent else None
    shape = pipe.sample_shape if pipe is not None else D.shape()
    imgs = generate(denoiser_draw(D, sampler, sigmas, decode), args.n, shape, seed=args.seed,
                    batch_size=args.batch_size, cond=cond)
    out = Path(args.out) if args.out is not None else Path("samples" + MEDIA_SUFFIX[kind_of(imgs)])
    # PNG grids and GIF clips are upscaled (pixels of 8x8 digits stay visible); audio has no pixels to scale
    paths = save_media(imgs, out, **({"scale": args.scale} if imgs.ndim != 3 else {}))
    what = f" for {args.prompt!r}" if kind == "text" else (f" of class {args.label}" if kind == "class" else "")
    guided = f", guidance {w:g}" if w is not None else ""
    console.print(f"wrote {args.n} samples{escape(what)} ({sampler}, {args.steps} steps, {grid} grid{guided}) to "
                  f"{', '.join(map(str, paths))}")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DistillError(f"--steps takes comma-separated integers like 1,2,4,8; got {text!r}.") from None
    if not vals or min(vals) < 1:
        raise DistillError(f"--steps takes positive integers like 1,2,4,8; got {text!r}.")
    return vals


def cmd_eval(args: argparse.Namespace) -> int:
    from distill.eval.harness import evaluate, slug, write_rows
    from distill.eval.leaderboard import rich_tables
    from distill.eval.protocol import load_protocol

    overrides = {"n": args.n, "draws": args.draws}
    if args.inception_weights:
        os.environ["DISTILL_INCEPTION_WEIGHTS"] = str(args.inception_weights)
    proto = load_protocol(args.protocol, **overrides)
    samplers = [s.strip() for s in args.sampler.split(",")] if args.sampler else None
    grids = None if args.no_grids or args.grids is None else Path(args.grids)
    guidance = [float(v) for v in args.guidance.split(",")] if args.guidance else None
    name = args.name or open_model_name(args.model)
    out = Path(args.out) if args.out else Path("eval-results") / f"{proto.name}-{slug(name)}.jsonl"
    if grids is None and not args.no_grids:
        grids = out.with_name(out.stem + "-grids")  # beside the rows, never into the repository's evals/
    device = args.device
    if device is None:  # under torchrun / accelerate launch each process takes its own device
        from distill.eval.harness import _launched_processes

        state = _launched_processes()
        device = state.device if state is not None else "cpu"
    rows = evaluate(args.model, proto, _int_list(args.steps), samplers, name=args.name, grids=grids,
                    device=device, guidance=guidance)
    if os.environ.get("RANK", "0") != "0":  # torchrun / accelerate launch: the first process reports
        return 0
    write_rows(rows, out)
    for t in rich_tables(rows):
        console.print(t)
    console.print(f"appended {len(rows)} rows to {out}")
    return 0


def open_model_name(model: str) -> str:
    """The name result rows give a model folder: a student's distill.json name, a run's folder, or its own."""
    import json

    path = Path(model)
    meta = path / "distill.json"
    if meta.is_file():
        try:
            return json.loads(meta.read_text()).get("name") or path.name
        except json.JSONDecodeError:
            return path.name
    return path.parent.name if path.name == "model" else path.name


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from distill.eval.leaderboard import load_rows, markdown, plot, relink_grids, rich_tables

    files = args.files or sorted(str(p) for p in Path("evals/results").glob("*.jsonl"))
    if not files:
        raise DistillError("no result files given and none in evals/results/; run `distill eval` first.")
    rows = load_rows(files)
    if not rows:
        raise DistillError(f"the result files hold no rows: {', '.join(files)}.")
    for t in rich_tables(rows):
        console.print(t)
    # written where the user says, else beside the (first) input file: never over committed results unasked
    here = Path(files[0]).parent
    md_path = Path(args.md) if args.md else here / "LEADERBOARD.md"
    plots_dir = Path(args.plots) if args.plots else md_path.parent / "plots"
    plots = plot(rows, plots_dir)
    rel = {k: os.path.relpath(p, md_path.parent) for k, p in plots.items()}
    md = markdown(rows, rel)
    md = relink_grids(md, md_path.parent)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md)
    console.print(f"wrote {md_path} and {len(plots)} plot(s) in {plots_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from distill.eval.harness import evaluate, write_rows
    from distill.eval.leaderboard import rich_tables

    console.print("[bold]distill demo[/bold]: scores the shipped digits teacher (FD-digits against DDIM steps, the "
                  "baseline every recipe must beat). `distill quickstart` (what `make demo` runs) distills it with "
                  "every recipe too.")
    out = Path(args.out)
    from distill.quickstart import benchmark

    digits = benchmark("digits")
    rows = evaluate(digits.teacher, digits.protocol, [1, 2, 4, 8, 16, 32], ["ddim"], name="digits-teacher",
                    grids=out / "grids")
    (out / "results.jsonl").unlink(missing_ok=True)  # this run's rows only
    write_rows(rows, out / "results.jsonl")
    for t in rich_tables(rows):
        console.print(t)
    console.print(f"rows in {out / 'results.jsonl'}, sample grids in {out / 'grids'}/")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from distill.quickstart import benchmark, run_quickstart

    b = benchmark(args.benchmark)
    default = "quickstart" if b.name == "digits" else f"quickstart-{b.name}"
    out = Path(args.out or (f"{default}-fast" if args.fast else default))
    what = ("tiny budgets for a first look (its numbers are not the leaderboard's)" if args.fast
            else f"the quickstart's budgets ({b.measured})")
    students = ", ".join(b.recipes)
    console.print(f"[bold]distill quickstart --benchmark {b.name}[/bold]: the shipped {b.name} teacher "
                  f"({b.teacher.name}) distilled into {students} at {what}, every student scored on protocol "
                  f"{b.protocol} against the teacher's best training-free sampler at the same steps; output in {out}/")
    run_quickstart(out, fast=args.fast, console=console, bench=args.benchmark, jobs=args.jobs)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import json

    from distill.recipe import load_recipe
    from distill.export import LORA_FOLDER, parity
    from distill.trainer import Trainer

    run = Path(args.run_dir)
    if not (run / "config.yaml").is_file():
        raise DistillError(f"{run} is not a run folder (no config.yaml); give the --out folder of a `distill run`.")
    cfg = load_recipe(run / "config.yaml", ["trainer.progress=false"])
    t = Trainer(cfg, run)
    if not t.resume(check_layout=False):  # exporting, not training: any number of processes made it
        raise DistillError(f"{run / 'checkpoints'} holds no checkpoint to export; run the recipe first.")
    folder = t.export(args.out, evaluate=False)
    console.print(f"wrote {folder} (step {t.step}); it loads with diffusers.DiffusionPipeline.from_pretrained")
    lora = folder / LORA_FOLDER
    checks = [folder]
    if (lora / "distill.json").is_file():
        stock = json.loads((lora / "distill.json").read_text())["lora"]["stock_loader"]
        console.print(f"wrote {lora}: the student's LoRA adapters; "
                      + ("pipe.load_lora_weights(it) on the teacher's pipeline, with its scheduler_config.json "
                         "(docs/lora.md)" if stock else "diffusers has no LoRA loader for this pipeline class; use "
                         "the fused folder"))
        checks += [lora] if stock else []
    if not args.no_check:
        for check in checks:
            if len(checks) > 1:
                console.print(f"{check}:")
            for k, diff in parity(check, n=args.check_n).items():
                ok = diff <= 1e-4
                console.print(f"  pipe(num_inference_steps={k}) vs distill's sampler, same noise: max abs difference "
                              f"{diff:.2e} {'[green]ok[/green]' if ok else '[red]above 1e-4[/red]'}")
    return 0


def cmd_scaffold(args: argparse.Namespace) -> int:
    from distill.pipelines import load_pipeline
    from distill.scaffold import build_scaffold, load_spec

    out = build_scaffold(load_spec(args.spec), args.out)
    p = load_pipeline(out)
    console.print(f"wrote {out}: {escape(p.describe())}, its network freshly initialised; train it with "
                  f"`distill teacher RECIPE --out DIR teacher={out}`")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from rich.table import Table

    from distill.recipe import load_recipe
    from distill.methods import METHODS, describe_methods

    t = Table(title="methods (name in a recipe's method.name)", title_justify="left")
    for col in ("name", "class", "what it is"):
        t.add_column(col)
    for name, (target, doc) in describe_methods().items():
        t.add_row(name, target, doc)
    console.print(t)
    repo = Path(__file__).resolve().parent.parent
    root = Path(args.dir) if args.dir else repo / "recipes"
    files = [f for f in sorted(root.rglob("*.yaml")) if not f.name.endswith("scaffold.yaml")]  # specs, not recipes
    if args.dir is None and (repo / "examples").is_dir():
        files += sorted((repo / "examples").glob("*.yaml"))  # recipes of the custom-method example
    if not files:
        raise DistillError(f"no recipes under {root}; pass --dir with your recipe folder.")
    t = Table(title=f"recipes in {root}", title_justify="left")
    for col in ("recipe", "method", "steps", "about"):
        t.add_column(col)
    here = os.getcwd()
    for f in files:
        first = next((ln[1:].strip() for ln in f.read_text().splitlines() if ln.startswith("#")), "")
        try:
            if args.dir is None:
                os.chdir(repo)  # the shipped recipes name files relative to the repository (examples/...py:Class)
            cfg = load_recipe(f)
            method, steps = cfg.method_name, str(cfg.trainer.max_steps)
        except DistillError as exc:
            method, steps = "[red]invalid[/red]", escape(str(exc)[:60])
        finally:
            os.chdir(here)
        t.add_row(str(f.relative_to(root.parent) if root.parent in f.parents else f), method, steps, escape(first))
    console.print(t)
    console.print(f"built-in methods: {', '.join(METHODS)}; your own: method.name: package.module:Class or "
                  "path/to/file.py:Class (see examples/custom_method.py)")
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

    sp = sub.add_parser("sample", help="write samples of a model folder: a PNG grid, a GIF clip or a WAV file")
    sp.add_argument("model", help="diffusers pipeline folder (or hub id when online)")
    sp.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                    help="default: a student's own sampler, ddim for a teacher")
    sp.add_argument("--steps", type=int, default=16)
    sp.add_argument("--grid", default=None, choices=["trailing", "leading", "linspace", "karras"],
                    help="sigma grid: the model's timesteps with diffusers' spacing, or Karras et al. (default: a "
                    "student's own grid; trailing for a teacher, karras for heun)")
    sp.add_argument("--sigma-max", type=float, default=80.0, help="top of a karras grid (capped at the model's)")
    sp.add_argument("--n", type=int, default=64)
    sp.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    sp.add_argument("--batch-size", type=int, default=256)
    sp.add_argument("--scale", type=int, default=8, help="nearest-neighbour upscaling of each pixel")
    sp.add_argument("--prompt", default=None, help="text-to-image models: the prompt (every sample gets it)")
    sp.add_argument("--label", type=int, default=None, help="class-conditional models (DiT): the class index")
    sp.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale w (diffusers' guidance_scale; default: a student's own, "
                    "else 1 = none)")
    sp.add_argument("--out", default=None, help="samples.png for images (a grid), samples.gif (+ a frames PNG; .mp4 "
                    "where an encoder is installed) for video, samples.wav (+ a spectrogram PNG) for audio")
    sp.set_defaults(fn=cmd_sample)

    sp = sub.add_parser("eval", help="FD/FID against sampling steps; appends JSONL rows")
    sp.add_argument("model", help="diffusers pipeline folder (teacher, or a student with distill.json) or hub id")
    sp.add_argument("--protocol", default="digits", help="evals/protocols/<name>.yaml or a YAML path")
    sp.add_argument("--steps", default="1,2,4,8,16,32,64", help="comma-separated step counts")
    sp.add_argument("--sampler", default=None,
                    help=f"comma-separated samplers for a teacher (default ddim,euler,heun; choices {', '.join(sorted(SAMPLERS))})")
    sp.add_argument("--name", default=None, help="model name in the rows (default: the folder name)")
    sp.add_argument("--samples", "--n", dest="n", type=int, default=None,
                    help="samples per point (default: the protocol's; spell it --samples under torchrun, whose own "
                    "options make --n ambiguous)")
    sp.add_argument("--draws", type=int, default=None,
                    help="draws of n samples pooled into each point's headline (bias-corrected FD over all of them, "
                    "with KID); default: the protocol's. 1: one draw, its plain FD")
    sp.add_argument("--out", default=None,
                    help="JSONL file to append to (default eval-results/<protocol>-<model>.jsonl in this folder)")
    sp.add_argument("--grids", default=None,
                    help="folder for sample grids, the first 64 samples of each point (default: beside --out)")
    sp.add_argument("--no-grids", action="store_true")
    sp.add_argument("--inception-weights", default=None, help="Inception weights file for FID protocols (offline use)")
    sp.add_argument("--guidance", default=None,
                    help="comma-separated guidance scales for a conditional model (default: a student's own, else "
                    "the protocol's)")
    sp.add_argument("--device", default=None, help="default: cpu, or each launched process's own device")
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("leaderboard", help="tables and plots from result rows")
    sp.add_argument("files", nargs="*", help="JSONL result files (default: evals/results/*.jsonl)")
    sp.add_argument("--md", default=None, help="markdown to write (default: LEADERBOARD.md beside the first file)")
    sp.add_argument("--plots", default=None, help="folder for the plots (default: plots/ beside the markdown)")
    sp.set_defaults(fn=cmd_leaderboard)

    sp = sub.add_parser("quickstart", help="distill a shipped teacher with every recipe, score all on one "
                        "leaderboard (what `make demo` runs)")
    sp.add_argument("--benchmark", default="digits",
                    help="digits (the pixel teacher; make demo), text-digits (the SD-shaped text-to-image teacher, "
                    "with a LoRA student; make demo-text), another installed benchmark, or your own as a dotted path "
                    "package.module:BENCHMARK (docs/benchmarks.md)")
    sp.add_argument("--out", default=None, help="output folder (default quickstart/ or quickstart-<benchmark>/, with "
                    "-fast appended under --fast)")
    sp.add_argument("--fast", action="store_true", help="tiny budgets for a first look; not the leaderboard's numbers")
    sp.add_argument("--jobs", type=int, default=None, help="jobs (the teacher's baselines, each student) run at once, "
                    "each in its own process with an equal share of the CPU cores (default: one per core on a CPU "
                    "machine, 1 with a GPU; 1 runs them one after another in this process)")
    sp.set_defaults(fn=cmd_quickstart)

    sp = sub.add_parser("export", help="write a run's student (newest checkpoint) as a stock diffusers pipeline folder")
    sp.add_argument("run_dir", help="the --out folder of a `distill run`")
    sp.add_argument("--out", required=True, help="folder to write (DiffusionPipeline.from_pretrained loads it)")
    sp.add_argument("--no-check", action="store_true",
                    help="skip comparing the pipeline's images with distill's sampler on the same noise")
    sp.add_argument("--check-n", type=int, default=16, help="samples per step count in that comparison")
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("scaffold", help="a new teacher's starting point: a pipeline folder with a fresh network "
                        "beside trained parts (VAE, text encoders), from a spec YAML")
    sp.add_argument("spec", help="scaffold spec YAML, e.g. recipes/text-digits/sd-scaffold.yaml")
    sp.add_argument("--out", required=True, help="folder to write (must be new or empty)")
    sp.set_defaults(fn=cmd_scaffold)

    sp = sub.add_parser("recipes", help="list the built-in methods and the shipped recipes")
    sp.add_argument("--dir", default=None, help="recipe folder to list (default: the repository's recipes/)")
    sp.set_defaults(fn=cmd_recipes)

    sp = sub.add_parser("demo", help="score the shipped digits teacher only (DDIM at 1-32 steps; seconds)")
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


def entry() -> int:
    """The ``distill`` console script: :func:`main`, with the OpenMP wait policy defaulted to PASSIVE in a
    multi-process run.

    GNU OpenMP's default makes torch's idle CPU threads spin for a while after each parallel region. Alone on its
    cores that is the fastest choice; but when several processes share the cores (the ranks of a CPU run under
    torchrun or accelerate), the spinning threads take the cores the working ones need: two 2-thread processes on 2
    cores ran a training step 3-7x slower than with PASSIVE threads, which sleep instead (docs/speed.md). So a
    process that is one of several (``WORLD_SIZE`` > 1, set by the launchers) gets PASSIVE, and a process alone keeps
    the default, which was 1.3-1.5x faster there. The variable is read when torch loads, so it is set here, before
    any command imports torch, and only when the user has not set it.
    """
    if max(int(os.environ.get(k) or 1) for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE")) > 1:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return main()


if __name__ == "__main__":
    sys.exit(entry())
