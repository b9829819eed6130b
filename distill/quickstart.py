"""``distill quickstart``: the shipped digits teacher through the four recipes, scored on one leaderboard.

What ``make demo`` runs. Everything is offline and on the embedded digits benchmark:

1. the teacher's baselines: FD-digits of its training-free samplers (DDIM, Euler, DPM-Solver++(2M) with and
   without Karras sigmas, UniPC) at 1-32 steps: what a user would run instead of distilling;
2. progressive, consistency, adversarial and distribution-matching distillation at the shipped recipes' default
   budgets (``recipes/digits/*.yaml``), each student scored at 1, 2, 4 and 8 steps (those it supports);
3. ``DIR/LEADERBOARD.md``, the FD-against-NFE plot in ``DIR/plots/``, sample grids in ``DIR/grids/`` and
   ``DIR/runs/<recipe>/grids/``, and the exported students (stock diffusers folders) in
   ``DIR/runs/<recipe>/model/``; each student is judged against the best training-free sampler at its NFE.

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
RECIPES_DIR = ROOT / "recipes" / "digits"
TEACHER = Path(__file__).resolve().parent / "assets" / "digits-teacher"
RECIPES = ("progressive", "consistency", "adversarial", "distribution_matching")
STEPS = [1, 2, 4, 8]
TEACHER_STEPS = [1, 2, 4, 8, 16, 32]
TEACHER_SAMPLERS = ["ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]  # training-free; one NFE a step
FAST_N = 300  # samples per point with --fast (the protocol's 898 otherwise)
# --fast: small budgets for a first look; not the leaderboard's numbers.
FAST: dict[str, list[str]] = {
    "progressive": ["method.start_steps=8", "method.iters_per_phase=[20, 30, 40]", "trainer.checkpoint_every=0"],
    "consistency": ["method.iters=120", "method.optimizer.warmup_steps=20", "trainer.checkpoint_every=0"],
    "adversarial": ["method.iters=80", "method.student_optimizer.warmup_steps=20", "method.ema_decay=0.9",
                    "trainer.checkpoint_every=0"],
    "distribution_matching": ["method.iters=60", "trainer.checkpoint_every=0"],
}
DONE = ".quickstart-done"


@dataclass
class Plan:
    name: str
    recipe: Path
    overrides: list[str] = field(default_factory=list)


def plans(fast: bool = False) -> list[Plan]:
    out = []
    for name in RECIPES:
        path = RECIPES_DIR / f"{name}.yaml"
        if not path.is_file():
            raise DistillError(f"{path} is missing; the quickstart runs the recipes shipped in the repository "
                               "(install distill from a clone with `pip install -e .`).")
        over = [f"teacher={TEACHER}", "eval.protocol=digits", f"eval.steps=[{', '.join(map(str, STEPS))}]",
                "trainer.progress=false"]
        if fast:
            over += [*FAST[name], f"eval.n={FAST_N}"]
        out.append(Plan(name, path, over))
    return out


def run_quickstart(out: str | Path, fast: bool = False, console: Any = None) -> dict[str, Any]:
    """Run the quickstart into ``out``; returns ``{"rows": [...], "verdict": {...}, "wall_s": ...}``."""
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
    configs = {p.name: load_recipe(p.recipe, p.overrides) for p in plans(fast)}
    out.mkdir(parents=True, exist_ok=True)
    total = sum(c.trainer.max_steps for c in configs.values())
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    progress = Progress(*columns, console=console)
    results = out / "results"
    with progress:
        overall = progress.add_task("quickstart", total=total, info="teacher baseline first")
        teacher_rows = results / "teacher.jsonl"
        n = FAST_N if fast else None
        proto = load_protocol("digits", n=n)
        if teacher_rows.is_file() and (_protocol_key(teacher_rows) != proto.key()
                                       or _samplers(teacher_rows) != set(TEACHER_SAMPLERS)):
            teacher_rows.unlink()  # made with another sample count (--fast and not, into one --out) or samplers
        if not teacher_rows.is_file():
            task = progress.add_task("teacher baselines: training-free samplers", total=None,
                                     info=f"{len(TEACHER_SAMPLERS)} samplers x {len(TEACHER_STEPS)} step counts")
            rows = evaluate(TEACHER, proto, TEACHER_STEPS, TEACHER_SAMPLERS,
                            name="teacher", grids=out / "grids", progress=False)
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
                Trainer(cfg, run, recipe_name=str(RECIPES_DIR.relative_to(ROOT) / f"{name}.yaml")).fit(
                    resume=same, progress=progress, on_step=lambda s, b=base: progress.update(overall, completed=b + s))
                (run / DONE).write_text(json.dumps({"finished": time.time()}))
            done += cfg.trainer.max_steps
            progress.update(overall, completed=done)
    return report(out, fast, console, time.perf_counter() - t0)


def _protocol_key(path: Path) -> str | None:
    """The protocol key of the result rows in ``path`` (None if unreadable)."""
    try:
        first = json.loads(path.read_text().splitlines()[0])
        return first["protocol"]["key"]
    except (OSError, IndexError, KeyError, TypeError, json.JSONDecodeError):
        return None


def _samplers(path: Path) -> set[str]:
    """The teacher samplers with rows in ``path``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["sampler"] for r in rows if r.get("method") == "teacher"}


def verdict(rows: list[dict[str, Any]], steps: tuple[int, ...] = (1, 2, 4)) -> dict[str, dict[int, tuple]]:
    """For each recipe's student: ``{steps: (its value, the best training-free row at that NFE or fewer, beats)}``.

    The bar is the lowest FD any of the teacher's training-free samplers reaches with at most as many network
    evaluations (:func:`distill.eval.leaderboard.best_training_free`), not DDIM alone.
    """
    from distill.eval.leaderboard import best_training_free

    out: dict[str, dict[int, tuple]] = {}
    for name in RECIPES:
        mine = {r["steps"]: r["value"] for r in rows if r["model"] == name}
        out[name] = {}
        for k in steps:
            best = best_training_free(rows, k, teacher="teacher")
            out[name][k] = (mine.get(k), best, mine.get(k) is not None and best is not None
                            and mine[k] < best["value"])
    return out


def report(out: Path, fast: bool, console: Any, wall_s: float) -> dict[str, Any]:
    """Print the rich leaderboard, write LEADERBOARD.md and the plot; say which recipes beat DDIM."""
    import os

    from distill.eval.harness import machine
    from distill.eval.leaderboard import best_training_free, load_rows, markdown, plot, relink_grids, rich_tables

    files = [out / "results" / "teacher.jsonl", *[out / "runs" / n / "results.jsonl" for n in RECIPES]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DistillError(f"the quickstart's result files are missing: {', '.join(missing)}; run it again.")
    rows = load_rows(files)
    for t in rich_tables(rows):
        console.print(t)
    plots = plot(rows, out / "plots")
    rel = {k: os.path.relpath(p, out) for k, p in plots.items()}
    v = verdict(rows)
    lines = []
    for name, pts in v.items():
        cells = ", ".join(f"{k} step{'s' if k > 1 else ''}: {a:.2f} vs {b['value']:.2f} {b['sampler']}"
                          if a is not None and b is not None else f"{k}: missing" for k, (a, b, _) in pts.items())
        ok = all(beats for _, _, beats in pts.values())
        lines.append(f"{name} {'beats' if ok else 'does NOT beat'} the teacher's best training-free sampler at 1, 2 "
                     f"and 4 steps ({cells})")
    best = best_training_free(rows, max(TEACHER_STEPS), teacher="teacher")
    if best is not None:
        lines.append(f"the teacher's best: {best['value']:.2f} ({best['sampler']}, {best['steps']} steps)")
    mins, secs = divmod(int(round(wall_s)), 60)
    note = (f"by `distill quickstart{' --fast' if fast else ''}` in {mins} min {secs} s on {machine()}")
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
    console.print(f"wrote {out / 'LEADERBOARD.md'}, plots in {out / 'plots'}, students in {out / 'runs'}/<recipe>/model "
                  f"({mins} min {secs} s)")
    return {"rows": rows, "verdict": v, "wall_s": wall_s}
