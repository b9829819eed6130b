"""``distill quickstart``: a shipped teacher through every recipe, scored on one leaderboard.

``make demo`` runs it on the embedded digits benchmark (``--benchmark digits``, the default); ``--benchmark
text-digits`` runs it on the SD-shaped colored-digits text-to-image teacher (``make demo-text``). Offline, in order:

1. the teacher's baselines: its training-free samplers (DDIM, Euler, DPM-Solver++(2M) with and without Karras
   sigmas, UniPC) at 1 to 32 steps (text-digits: DDIM, DPM-Solver++(2M) and UniPC at 1 to 8 steps, unguided and at
   the recipes' guidance scale): what a user would run instead of distilling;
2. progressive, consistency, adversarial and distribution-matching distillation (text-digits: consistency also as a
   LoRA student) at the budgets below, each student scored at 1, 2, 4 (and 8) steps;
3. ``DIR/LEADERBOARD.md`` (FD, and prompt accuracy on text-digits), the FD-against-NFE plot in ``DIR/plots/``,
   sample grids (per prompt on text-digits) in ``DIR/grids/`` and ``DIR/runs/<name>/grids/``, and the exported
   students (stock diffusers folders; LoRA students also as adapters) in ``DIR/runs/<name>/model/``; each student
   is judged against the best training-free sampler at its NFE.

Started again with the same ``--out``, finished recipes are kept and an interrupted one resumes from its
newest checkpoint. ``--fast`` runs tiny budgets for a first look; its numbers are not the leaderboard's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import DistillError

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class Benchmark:
    """What the quickstart runs on one benchmark: a teacher, its baselines, and one plan per student."""

    name: str
    teacher: Path
    protocol: str
    recipes: dict[str, tuple[str, list[str]]]  # student name: (recipe file under ROOT, the quickstart's overrides)
    steps: list[int]  # each student is scored at these (those it supports)
    teacher_steps: list[int]
    teacher_samplers: list[str]  # training-free; one network evaluation a step (two with guidance)
    fast: dict[str, list[str]]  # --fast: small budgets for a first look; not the leaderboard's numbers
    fast_n: int  # samples per point with --fast
    teacher_guidance: list[float] | None = None  # the baselines' guidance scales (text teachers)
    n: int | None = None  # samples per point; None: the protocol's
    measured: str = ""  # what the default run took, for the banner


_CKPT0 = "trainer.checkpoint_every=0"
BENCHMARKS: dict[str, Benchmark] = {
    "digits": Benchmark(
        name="digits",
        teacher=ASSETS / "digits-teacher",
        protocol="digits",
        recipes={name: (f"recipes/digits/{name}.yaml", [])
                 for name in ("progressive", "consistency", "adversarial", "distribution_matching")},
        steps=[1, 2, 4, 8],
        teacher_steps=[1, 2, 4, 8, 16, 32],
        teacher_samplers=["ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras", "unipc"],
        fast={
            "progressive": ["method.start_steps=8", "method.iters_per_phase=[20, 30, 40]", _CKPT0],
            "consistency": ["method.iters=120", "method.optimizer.warmup_steps=20", _CKPT0],
            "adversarial": ["method.iters=80", "method.student_optimizer.warmup_steps=20", "method.ema_decay=0.9",
                            _CKPT0],
            "distribution_matching": ["method.iters=60", _CKPT0],
        },
        fast_n=300,
        measured="about 22 minutes on 2 CPU cores",
    ),
    # The SD-shaped teacher: the recipes of recipes/text-digits/ at budgets cut towards the quickstart's 15 minutes
    # (the recipes' own budgets are their committed runs'), scored at n = 700 (5 samples per prompt; the protocol's
    # 1,400 doubles every evaluation). Guidance 1.5 is the teacher's best FD; unguided (w = 1, one network
    # evaluation a step) it sets the bar at 1 and 2 NFE. DDIM stands for Euler too (identical on this teacher).
    # Progressive and consistency distil the teacher at the fixed w = 1.5 (guidance.range=null): a fixed-w student
    # has one target to fit in a budget of 200 steps (the w-conditioned recipe's committed run takes 1,500), and the
    # LoRA student, whose adapters must load onto the teacher without a guidance embedding, is fixed-w anyway, so the
    # two consistency students compare like for like.
    "text-digits": Benchmark(
        name="text-digits",
        teacher=ASSETS / "text-digits-sd",
        protocol="text-digits",
        recipes={
            "progressive": ("recipes/text-digits/progressive-sd.yaml",
                            ["method.start_steps=8", "method.iters_per_phase=[60, 80, 100]", "guidance.range=null"]),
            "consistency": ("recipes/text-digits/consistency-sd.yaml",
                            ["method.iters=200", "method.optimizer.warmup_steps=20", "guidance.range=null"]),
            "consistency-lora": ("recipes/text-digits/consistency-sd.yaml",
                                 ["method.iters=200", "method.optimizer.warmup_steps=20", "guidance.range=null",
                                  "student.lora.rank=16", "method.optimizer.lr=0.001"]),
            "adversarial": ("recipes/text-digits/adversarial-sd.yaml",
                            ["method.iters=150", "method.student_optimizer.warmup_steps=20"]),
            "distribution_matching": ("recipes/text-digits/distribution_matching-sd.yaml", ["method.iters=150"]),
        },
        steps=[1, 2, 4],
        teacher_steps=[1, 2, 4, 8],
        teacher_samplers=["ddim", "dpmpp_2m", "unipc"],
        teacher_guidance=[1.0, 1.5],
        n=700,
        fast={
            "progressive": ["method.start_steps=4", "method.iters_per_phase=[10, 10]", _CKPT0],
            "consistency": ["method.iters=20", "method.optimizer.warmup_steps=5", _CKPT0],
            "consistency-lora": ["method.iters=20", "method.optimizer.warmup_steps=5", _CKPT0],
            "adversarial": ["method.iters=20", "method.student_optimizer.warmup_steps=5", _CKPT0],
            "distribution_matching": ["method.iters=10", _CKPT0],
        },
        fast_n=280,
        measured="about 17 minutes on 2 CPU cores",
    ),
}
RECIPES = tuple(BENCHMARKS["digits"].recipes)  # the digits quickstart's students
DONE = ".quickstart-done"


@dataclass
class Plan:
    name: str
    recipe: Path
    overrides: list[str] = field(default_factory=list)


def benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise DistillError(f"unknown quickstart benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}.")
    return BENCHMARKS[name]


def plans(fast: bool = False, bench: str | Benchmark = "digits") -> list[Plan]:
    b = bench if isinstance(bench, Benchmark) else benchmark(bench)
    out = []
    for name, (recipe, budget) in b.recipes.items():
        path = ROOT / recipe
        if not path.is_file():
            raise DistillError(f"{path} is missing; the quickstart runs the recipes shipped in the repository "
                               "(install distill from a clone with `pip install -e .`).")
        over = [f"teacher={b.teacher}", f"eval.protocol={b.protocol}", f"eval.steps=[{', '.join(map(str, b.steps))}]",
                "trainer.progress=false", *budget]
        if b.n is not None:
            over.append(f"eval.n={b.n}")
        if fast:
            over += [*b.fast[name], f"eval.n={b.fast_n}"]
        out.append(Plan(name, path, over))
    return out


def run_quickstart(out: str | Path, fast: bool = False, console: Any = None,
                   bench: str = "digits") -> dict[str, Any]:
    """Run the quickstart of benchmark ``bench`` into ``out``; returns ``{"rows": [...], "verdict": {...}, "wall_s": ...}``."""
    import yaml
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from distill.config import load_recipe
    from distill.eval.harness import evaluate, write_rows
    from distill.eval.protocol import load_protocol
    from distill.trainer import Trainer

    console = console or Console()
    out = Path(out)
    t0 = time.perf_counter()
    # every recipe is validated before any work starts
    b = benchmark(bench)
    chosen = plans(fast, b)
    configs = {p.name: load_recipe(p.recipe, p.overrides) for p in chosen}
    recipe_names = {p.name: str(p.recipe.relative_to(ROOT)) for p in chosen}
    out.mkdir(parents=True, exist_ok=True)
    total = sum(c.trainer.max_steps for c in configs.values())
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    progress = Progress(*columns, console=console)
    results = out / "results"
    with progress:
        overall = progress.add_task("quickstart", total=total, info="teacher baseline first")
        teacher_rows = results / "teacher.jsonl"
        proto = load_protocol(b.protocol, n=b.fast_n if fast else b.n)
        if teacher_rows.is_file() and (_protocol_key(teacher_rows) != proto.key()
                                       or _points(teacher_rows) != (set(b.teacher_samplers), _scales(b))):
            teacher_rows.unlink()  # made with another sample count (--fast and not, into one --out), samplers or w
        if not teacher_rows.is_file():
            task = progress.add_task("teacher baselines: training-free samplers", total=None,
                                     info=f"{len(b.teacher_samplers)} samplers x {len(b.teacher_steps)} step counts"
                                          + (f" x {len(b.teacher_guidance)} guidance scales" if b.teacher_guidance else ""))
            rows = evaluate(b.teacher, proto, b.teacher_steps, b.teacher_samplers, name="teacher",
                            grids=out / "grids", progress=False, guidance=b.teacher_guidance)
            write_rows(rows, teacher_rows.with_suffix(".tmp"))
            teacher_rows.with_suffix(".tmp").replace(teacher_rows)
            progress.remove_task(task)
        done = 0
        for i, (name, cfg) in enumerate(configs.items(), 1):
            run = out / "runs" / name
            progress.update(overall, description=f"quickstart: {name} ({i}/{len(configs)})", info="")
            dumped = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            same = (run / "config.yaml").is_file() and (run / "config.yaml").read_text() == dumped
            if same and (run / DONE).is_file():
                progress.console.print(f"{name}: finished earlier in {run}, kept")
            else:
                if (run / "config.yaml").is_file() and not same:
                    progress.console.print(f"{name}: {run} holds a run with other settings; starting it over")
                (run / DONE).unlink(missing_ok=True)  # done only once this run's fit returns
                base = done
                Trainer(cfg, run, recipe_name=recipe_names[name]).fit(
                    resume=same, progress=progress, on_step=lambda s, at=base: progress.update(overall, completed=at + s))
                (run / DONE).write_text(json.dumps({"finished": time.time()}))
            done += cfg.trainer.max_steps
            progress.update(overall, completed=done)
    return report(out, fast, console, time.perf_counter() - t0, b)


def _protocol_key(path: Path) -> str | None:
    """The protocol key of the result rows in ``path`` (None if unreadable)."""
    try:
        first = json.loads(path.read_text().splitlines()[0])
        return first["protocol"]["key"]
    except (OSError, IndexError, KeyError, TypeError, json.JSONDecodeError):
        return None


def _points(path: Path) -> tuple[set[str], set[float | None]]:
    """The teacher samplers and guidance scales with rows in ``path``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("method") == "teacher"]
    return {r["sampler"] for r in rows}, {r.get("guidance") for r in rows}


def _scales(b: Benchmark) -> set[float | None]:
    return {float(w) for w in b.teacher_guidance} if b.teacher_guidance else {None}


def verdict(rows: list[dict[str, Any]], steps: tuple[int, ...] = (1, 2, 4),
            names: tuple[str, ...] = RECIPES) -> dict[str, dict[int, tuple]]:
    """For each student: ``{steps: (its value, the best training-free row at that NFE or fewer, beats, tied)}``.

    The bar is the lowest FD any of the teacher's training-free samplers reaches with at most as many network
    evaluations (:func:`distill.eval.leaderboard.best_training_free`), not DDIM alone. ``beats``: a lower FD;
    ``tied``: the two 95% bootstrap intervals overlap (as the leaderboard marks ties), so the evaluation cannot
    rank them.
    """
    from distill.eval.leaderboard import best_training_free, intervals_overlap

    out: dict[str, dict[int, tuple]] = {}
    for name in names:
        mine = {r["steps"]: r for r in rows if r["model"] == name}
        out[name] = {}
        for k in steps:
            best = best_training_free(rows, k, teacher="teacher")
            me = mine.get(k)
            both = me is not None and best is not None
            out[name][k] = (me["value"] if me else None, best, both and me["value"] < best["value"],
                            both and intervals_overlap(me, best))
    return out


def report(out: Path, fast: bool, console: Any, wall_s: float, bench: Benchmark | None = None) -> dict[str, Any]:
    """Print the rich leaderboard, write LEADERBOARD.md and the plot; say which students beat the teacher's best
    training-free sampler at their NFE."""
    import os

    from distill.eval.harness import machine
    from distill.eval.leaderboard import load_rows, markdown, plot, relink_grids, rich_tables

    b = bench or BENCHMARKS["digits"]
    names = tuple(b.recipes)
    files = [out / "results" / "teacher.jsonl", *[out / "runs" / n / "results.jsonl" for n in names]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DistillError(f"the quickstart's result files are missing: {', '.join(missing)}; run it again.")
    rows = load_rows(files)
    for t in rich_tables(rows):
        console.print(t)
    plots = plot(rows, out / "plots")
    rel = {k: os.path.relpath(p, out) for k, p in plots.items()}
    v = verdict(rows, names=names)
    lines = []
    for name, pts in v.items():
        cells = "; ".join(f"{k} step{'s' if k > 1 else ''}: {a:.2f} vs {_label(t)}: {_word(beats, tied)}"
                          if a is not None and t is not None else f"{k}: missing"
                          for k, (a, t, beats, tied) in pts.items())
        ok = all(beats for _, _, beats, _ in pts.values())
        lines.append(f"{name} {'beats' if ok else 'does NOT beat'} the teacher's best training-free sampler at 1, 2 "
                     f"and 4 steps ({cells})")
    teacher = [r for r in rows if r.get("method") == "teacher"]
    if teacher:
        lines.append(f"the teacher's best: {_label(min(teacher, key=lambda r: r['value']), steps=True)}")
    mins, secs = divmod(int(round(wall_s)), 60)
    flag = "" if b.name == "digits" else f" --benchmark {b.name}"
    note = (f"by `distill quickstart{flag}{' --fast' if fast else ''}` in {mins} min {secs} s on {machine()}")
    md = markdown(rows, rel, source=note)
    head, _, body = md.partition("\n\n")
    extra = ["", "**--fast: tiny budgets for a first look; these numbers are not the leaderboard's.**", ""] if fast else [""]
    md = "\n".join([head, *extra, body, "", "## Against the teacher's training-free samplers", "", *[f"* {ln}" for ln in lines], ""])
    (out / "LEADERBOARD.md").write_text(relink_grids(md, out))
    for ln in lines:
        console.print(("[green]" if "NOT" not in ln else "[red]") + ln)
    if fast:
        console.print("[yellow]--fast: tiny budgets for a first look; these numbers are not the leaderboard's "
                      "(run without --fast for those).[/yellow]")
    console.print(f"wrote {out / 'LEADERBOARD.md'}, plots in {out / 'plots'}, students in {out / 'runs'}/<name>/model "
                  f"({mins} min {secs} s)")
    return {"rows": rows, "verdict": v, "wall_s": wall_s}


def _label(r: dict[str, Any], steps: bool = False) -> str:
    """``12.34 dpmpp_2m`` for a teacher row; with the guidance scale and prompt accuracy where it has them."""
    s = f"{r['value']:.2f} {r['sampler']}"
    extra = []
    if steps:
        extra.append(f"{r['steps']} steps")
    if r.get("guidance") is not None:
        extra.append(f"w={r['guidance']:g}")
    if r.get("accuracy") is not None:
        extra.append(f"accuracy {100 * r['accuracy']:.1f}%")
    return s + (f" ({', '.join(extra)})" if extra else "")


def _word(beats: bool, tied: bool) -> str:
    if tied:
        return f"{'lower' if beats else 'higher'} but within the intervals"
    return "better" if beats else "worse"
