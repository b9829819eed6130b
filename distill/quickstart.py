"""``distill quickstart``: a shipped teacher through every recipe, scored on one leaderboard.

``make demo`` runs it on the embedded digits benchmark (``--benchmark digits``, the default); ``--benchmark
text-digits`` runs it on the SD-shaped colored-digits text-to-image teacher (``make demo-text``). Offline:

1. the teacher's baselines: its training-free samplers (DDIM, Euler, DPM-Solver++(2M) with and without Karras
   sigmas, UniPC) at 1 to 32 steps (text-digits: DDIM, DPM-Solver++(2M) and UniPC at 1 to 8 steps, unguided and at
   the recipes' guidance scale): what a user would run instead of distilling;
2. progressive, consistency, adversarial and distribution-matching distillation (text-digits: consistency also as a
   LoRA student) at the budgets below, each student scored at 1, 2, 4 (and 8) steps;
3. ``DIR/LEADERBOARD.md`` (FD, and prompt accuracy on text-digits), the FD-against-NFE plot in ``DIR/plots/``,
   sample grids (per prompt on text-digits) in ``DIR/grids/`` and ``DIR/runs/<name>/grids/``, and the exported
   students (stock diffusers folders; LoRA students also as adapters) in ``DIR/runs/<name>/model/``; each student
   is judged against the best training-free sampler at its NFE.

The baselines and the students' runs are independent jobs: they run side by side, one process per CPU core
(:func:`lanes`, ``--jobs``; :mod:`distill.jobs` runs them), and their results meet in step 3. Started again with the same ``--out``, finished
recipes are kept and an interrupted one resumes from its newest checkpoint. ``--fast`` runs tiny budgets for a
first look; its numbers are not the leaderboard's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill import jobs as job_runner
from distill.errors import DistillError

ROOT = Path(__file__).resolve().parent.parent


CKPT0 = "trainer.checkpoint_every=0"  # --fast runs write no checkpoint


@dataclass(frozen=True)
class Quickstart:
    """What the quickstart runs on one benchmark: a teacher, its baselines, and one plan per student. Each benchmark
    keeps its own (``distill.registry.Benchmark.quickstart``); recipe paths are relative to the repository root
    or absolute."""

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
    # draws of n samples pooled into each point's headline; None: the protocol's. A quickstart may pool fewer draws
    # than its protocol to stay short; its leaderboard says how many it pooled
    draws: int | None = None
    measured: str = ""  # what the default run took, for the banner
    # minutes each job took in the last measured run: with several jobs at once, they are handed out in the order
    # that ends first with these times (distill.jobs.schedule), so that no long job is left to run alone at the end
    minutes: dict[str, float] = field(default_factory=dict)
    fast_minutes: dict[str, float] = field(default_factory=dict)  # the same for --fast: there the baselines lead
    # student: the student whose exported model it starts from (``student.init``); it runs once that one finished
    starts_from: dict[str, str] = field(default_factory=dict)


DONE = ".quickstart-done"


@dataclass
class Plan:
    name: str
    recipe: Path
    overrides: list[str] = field(default_factory=list)


def benchmark(name: str | Quickstart) -> Quickstart:
    """The quickstart of the benchmark called ``name`` (or named by a dotted path ``package.module:BENCHMARK``)."""
    from distill import registry

    if isinstance(name, Quickstart):
        return name
    b = registry.benchmark(name)
    if not isinstance(b.quickstart, Quickstart):
        with_one = [n for n in registry.names() if isinstance(registry.benchmark(n).quickstart, Quickstart)]
        raise DistillError(f"benchmark {b.name!r} has no quickstart (its `quickstart` is {b.quickstart!r}); choose one "
                           f"of {', '.join(with_one)}, or give it a distill.quickstart.Quickstart.")
    return b.quickstart


def plans(fast: bool = False, bench: str | Quickstart = "digits", out: str | Path = ".") -> list[Plan]:
    """Each student's recipe and overrides; a student that starts from another (``Quickstart.starts_from``) gets
    ``student.init=OUT/runs/<that student>/model``."""
    b = benchmark(bench)
    result = []
    for name, (recipe, budget) in b.recipes.items():
        path = ROOT / recipe
        if not path.is_file():
            raise DistillError(f"{path} is missing; the quickstart runs the recipes shipped in the repository "
                               "(install distill from a clone with `pip install -e .`).")
        over = [f"teacher={b.teacher}", f"eval.protocol={b.protocol}", f"eval.steps=[{', '.join(map(str, b.steps))}]",
                "trainer.progress=false", *budget]
        if b.n is not None:
            over.append(f"eval.n={b.n}")
        if b.draws is not None:
            over.append(f"eval.draws={b.draws}")
        if fast:
            over += [*b.fast[name], f"eval.n={b.fast_n}", "eval.draws=1"]  # a first look: one small draw
        if name in b.starts_from:
            dep = b.starts_from[name]
            if dep not in b.recipes or dep == name:
                raise DistillError(f"benchmark {b.name}: {name} starts from {dep!r}, which is not one of its other "
                                   f"students ({', '.join(n for n in b.recipes if n != name)}).")
            over.append(f"student.init={Path(out) / 'runs' / dep / 'model'}")
        result.append(Plan(name, path, over))
    return result


def run_quickstart(out: str | Path, fast: bool = False, console: Any = None,
                   bench: str | Quickstart = "digits", jobs: int | None = None) -> dict[str, Any]:
    """Run the quickstart of benchmark ``bench`` into ``out``; returns ``{"rows": [...], "verdict": {...},
    "wall_s": ..., "lanes": ..., "jobs": {name: {"pid", "start", "end"}}}``.

    ``jobs``: how many of its jobs (the teacher's baselines, one per student) run at once, each in its own process
    with ``cores // jobs`` torch threads (:func:`lanes`). ``None`` picks one per CPU core on a CPU machine and one
    where CUDA is present; 1 runs everything in this process, one job after another.
    """
    import yaml
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from distill.recipe import load_recipe
    from distill.eval.protocol import load_protocol

    console = console or Console()
    out = Path(out)
    t0 = time.perf_counter()
    # every recipe is validated before any work starts
    b = benchmark(bench)
    chosen = plans(fast, b, out)
    configs = {p.name: load_recipe(p.recipe, p.overrides) for p in chosen}
    out.mkdir(parents=True, exist_ok=True)
    n = b.fast_n if fast else b.n
    teacher_rows = out / "results" / "teacher.jsonl"
    draws = 1 if fast else b.draws
    proto = load_protocol(b.protocol, n=n, draws=draws)
    if teacher_rows.is_file() and (_protocol_key(teacher_rows) != proto.key()
                                   or _points(teacher_rows) != (set(b.teacher_samplers), _scales(b))):
        teacher_rows.unlink()  # made with another sample count (--fast and not, into one --out), samplers or w
    todo: list[dict[str, Any]] = []
    if not teacher_rows.is_file():
        todo.append({"name": "teacher", "kind": "baselines", "bench": b, "n": n, "draws": draws, "out": str(out)})
    finished = {}
    rerun: set[str] = set()
    for p in sorted(chosen, key=lambda p: p.name in b.starts_from):  # a student after the one it starts from
        run = out / "runs" / p.name
        dumped = yaml.safe_dump(configs[p.name].to_dict(), sort_keys=False)
        same = (run / "config.yaml").is_file() and (run / "config.yaml").read_text() == dumped
        dep = b.starts_from.get(p.name)
        if dep in rerun:  # what it started from is made again: so is it
            same = False
        elif same and (run / DONE).is_file():
            finished[p.name] = run
            continue
        rerun.add(p.name)
        todo.append({"name": p.name, "kind": "recipe", "recipe": str(p.recipe), "overrides": p.overrides,
                     "run": str(run), "resume": same, "restart": (run / "config.yaml").is_file() and not same,
                     "recipe_name": _shown(p.recipe), "after": dep if dep in rerun else None})
    if isinstance(bench, str) and ":" in bench:  # the lanes register a benchmark given by dotted path themselves
        for job in todo:
            job["plugin"] = bench
    nlanes, threads = lanes(jobs, len(todo))
    total = sum(c.trainer.max_steps for c in configs.values())
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    progress = Progress(*columns, console=console)
    with progress:
        steps = {name: configs[name].trainer.max_steps for name in finished}
        overall = progress.add_task("quickstart", total=total,
                                    info=(f"{nlanes} jobs at once, {threads} torch thread{'s' if threads > 1 else ''}"
                                          " each") if nlanes > 1 else "")
        for name, run in finished.items():
            progress.console.print(f"{name}: finished earlier in {run}, kept")
        for job in todo:
            if job.get("restart"):
                progress.console.print(f"{job['name']}: {job['run']} holds a run with other settings; starting it over")
        progress.update(overall, completed=sum(steps.values()))
        try:
            # with several lanes, the jobs go out in the order that ends first with the last measured minutes
            timings = job_runner.run(todo, _do_job, nlanes, threads, progress, overall, label="quickstart",
                                     costs=b.fast_minutes if fast else b.minutes, steps=steps,
                                     units={j["name"]: configs[j["name"]].trainer.max_steps
                                            for j in todo if j["kind"] == "recipe"},
                                     blocked="not run: it starts from {dep}'s student, and {dep} failed")
        except job_runner.LanesDidNotStart as e:
            raise DistillError(f"a quickstart job process ended with exit code {e.exitcode} before it started: "
                               f"{e.why}. Run `distill quickstart`, call run_quickstart from a script saved to a "
                               "file, or run the jobs in this process with --jobs 1 (jobs=1).") from None
        except job_runner.JobsFailed as e:
            said = "\n".join(f"{name}: {msg.strip()}" for name, msg in e.errors.items())
            raise DistillError(f"quickstart jobs failed: {', '.join(e.errors)} (the others finished and are kept; "
                               f"run the same command again to retry only the failed ones):\n{said}") from None
        progress.update(overall, description="quickstart", completed=total)
    result = report(out, fast, console, time.perf_counter() - t0, b,
                    lanes=(nlanes, threads) if nlanes > 1 else None)
    return {**result, "lanes": nlanes, "jobs": timings}


def lanes(jobs: int | None, pending: int, cores: int | None = None, cuda: bool | None = None) -> tuple[int, int]:
    """How many quickstart jobs run at once, and the torch threads each gets: ``(lanes, threads)``; one per CPU core
    by default, one where CUDA is present (:func:`distill.jobs.lanes` says why). ``jobs``: ``--jobs``."""
    if jobs is not None and jobs < 1:  # said in the CLI's words
        raise DistillError(f"--jobs must be at least 1, got {jobs}; 1 runs the quickstart's jobs one after another.")
    return job_runner.lanes(jobs, pending, cores, cuda)


def _do_job(job: dict[str, Any], progress: Any, on_step: Any) -> None:
    """One quickstart job in this process: the teacher's baselines, or one recipe's training and scoring."""
    if job.get("plugin"):  # a benchmark named by dotted path: register it here too (a lane is a fresh process)
        from distill import registry

        registry.benchmark(job["plugin"])
    if job["kind"] == "baselines":
        from distill.eval.harness import evaluate, write_rows
        from distill.eval.protocol import load_protocol

        b: Quickstart = job["bench"]
        teacher_rows = Path(job["out"]) / "results" / "teacher.jsonl"
        task = progress.add_task("teacher baselines: training-free samplers", total=None,
                                 info=f"{len(b.teacher_samplers)} samplers x {len(b.teacher_steps)} step counts"
                                      + (f" x {len(b.teacher_guidance)} guidance scales" if b.teacher_guidance else ""))
        protocol = load_protocol(b.protocol, n=job["n"], draws=job["draws"])
        rows = evaluate(b.teacher, protocol, b.teacher_steps, b.teacher_samplers,
                        name="teacher", grids=Path(job["out"]) / "grids", progress=False, guidance=b.teacher_guidance)
        write_rows(rows, teacher_rows.with_suffix(".tmp"))
        teacher_rows.with_suffix(".tmp").replace(teacher_rows)
        progress.remove_task(task)
        return
    from distill.recipe import load_recipe
    from distill.trainer import Trainer

    run = Path(job["run"])
    (run / DONE).unlink(missing_ok=True)  # done only once this run's fit returns
    cfg = load_recipe(Path(job["recipe"]), job["overrides"])
    Trainer(cfg, run, recipe_name=job["recipe_name"]).fit(resume=job["resume"], progress=progress, on_step=on_step)
    (run / DONE).write_text(json.dumps({"finished": time.time()}))


def _shown(path: Path) -> str:
    """A recipe path as result rows record it: relative to the repository when it lies there."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


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


def _scales(b: Quickstart) -> set[float | None]:
    return {float(w) for w in b.teacher_guidance} if b.teacher_guidance else {None}


def verdict(rows: list[dict[str, Any]], steps: tuple[int, ...] = (1, 2, 4),
            names: tuple[str, ...] = ()) -> dict[str, dict[int, tuple]]:
    """For each student: ``{steps: (its value, the best training-free row at that NFE or fewer, beats, tied)}``.

    The bar is the lowest FD any of the teacher's training-free samplers reaches with at most as many network
    evaluations (:func:`distill.eval.leaderboard.best_training_free`), not DDIM alone. ``beats``: a lower FD;
    ``tied``: the evaluation cannot rank them (:func:`distill.eval.leaderboard.tied`: the 95% FD intervals overlap
    and, where both rows carry KID, the KID intervals too), as the leaderboard marks ties.
    """
    from distill.eval.leaderboard import best_training_free, tied

    out: dict[str, dict[int, tuple]] = {}
    for name in names:
        mine = {r["steps"]: r for r in rows if r["model"] == name}
        out[name] = {}
        for k in steps:
            best = best_training_free(rows, k, teacher="teacher")
            me = mine.get(k)
            both = me is not None and best is not None
            out[name][k] = (me["value"] if me else None, best, both and me["value"] < best["value"],
                            both and tied(me, best))
    return out


def report(out: Path, fast: bool, console: Any, wall_s: float, bench: Quickstart | None = None,
           lanes: tuple[int, int] | None = None) -> dict[str, Any]:
    """Print the rich leaderboard, write LEADERBOARD.md and the plot; say which students beat the teacher's best
    training-free sampler at their NFE."""
    import os

    from distill.eval.harness import machine
    from distill.eval.leaderboard import load_rows, markdown, plot, relink_grids, rich_tables

    b = benchmark("digits" if bench is None else bench)
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
    where = machine()
    if lanes:  # the parent's thread count is not what trained
        import re

        each = f"{lanes[0]} jobs at once with {lanes[1]} torch thread{'s' if lanes[1] > 1 else ''} each"
        where = re.sub(r"\d+ torch threads?", each, where)
    note = (f"by `distill quickstart{flag}{' --fast' if fast else ''}` in {mins} min {secs} s on {where}")
    md = markdown(rows, rel, source=note)
    head, _, body = md.partition("\n\n")
    extra = ["", "**--fast: tiny budgets for a first look; these numbers are not the leaderboard's.**", ""] if fast else [""]
    from distill.eval.protocol import load_protocol

    full = load_protocol(b.protocol).draws
    used = 1 if fast else (b.draws or full)
    if used < full:  # a cheaper setting than the protocol's: said where the numbers are
        each = "one draw of n samples (its plain FD)" if used == 1 else f"{used} draws of n samples, pooled"
        extra += [f"**Quickstart setting: each point is {each}; protocol '{b.protocol}' pools {full} draws for its "
                  "headline. These numbers compare with each other, not with the protocol's pooled leaderboards.**", ""]
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
