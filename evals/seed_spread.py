"""Benchmark: a recipe's spread over training seeds, on the pooled measure.

    python evals/seed_spread.py recipes/digits/distribution_matching.yaml --seeds 0,1,2 --draws 40

Trains the recipe once per training seed (``trainer.seed=S``; ``--jobs`` runs at once, each with ``--threads`` torch
threads, each in its own process), into ``--work DIR/seed<S>`` (a finished run is kept and reused, an interrupted
one resumes), then scores every student on the protocol pooled over ``--draws`` draws (bias-corrected FD with its
95% interval, KID: docs/evaluation.md) at the step counts it supports. The report gives, per step count, each
seed's pooled FD, their mean and range, and the ratio of the mean to the teacher's best pooled FD read from
``--teacher-best`` (the JSON of ``evals/bench_pooled.py``: its row with as many draws). Writes
evals/seed_spread-<recipe>.md and .json (``--out DIR``: there instead); the rows go to ``--work DIR/rows.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # evals/: the scripts' shared helper
from common import ROOT, add_out, command, measured_by, out_dir, provenance, write_report  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every seed's run")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    parser.add_argument("--draws", type=int, default=40, help="draws of the protocol's n pooled per point")
    parser.add_argument("--protocol", default="digits")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training (default 1)")
    parser.add_argument("--work", type=Path, default=Path("seed-spread-runs"),
                        help="folder for the runs and their rows (default ./seed-spread-runs)")
    parser.add_argument("--teacher-best", type=Path, default=ROOT / "evals" / "bench_pooled-digits.json",
                        help="evals/bench_pooled.py's JSON: the teacher's best pooled FD to compare with")
    add_out(parser, "seed_spread-<recipe>.md and .json")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    recipe = args.recipe.resolve()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    # training: one process per seed, --jobs at once
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    distill_cli = [sys.executable, "-m", "distill.cli"]
    pending = [s for s in seeds if not (work / f"seed{s}" / "model" / "distill.json").is_file()]
    running: dict[int, tuple[subprocess.Popen, float]] = {}
    train_s: dict[int, float] = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            s = pending.pop(0)
            cmd = [*distill_cli, "run", str(recipe), "--out", str(work / f"seed{s}"), f"trainer.seed={s}",
                   "eval.protocol=null", "trainer.progress=false", *args.overrides]
            log = open(work / f"seed{s}.log", "a")
            running[s] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT),
                          time.perf_counter())
            print(f"seed {s}: training ({' '.join(cmd[3:])})", flush=True)
        time.sleep(2)
        for s, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                del running[s]
                if proc.returncode != 0:
                    sys.exit(f"seed {s}: training failed (exit {proc.returncode}); see {work / f'seed{s}.log'}")
                train_s[s] = round(time.perf_counter() - t0, 1)
                print(f"seed {s}: trained in {train_s[s]:.0f} s", flush=True)

    # evaluation on the pooled measure
    import torch

    from distill.eval.harness import evaluate, write_rows
    from distill.eval.protocol import load_protocol

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    proto = load_protocol(args.protocol, draws=args.draws)
    rows_path = work / "rows.jsonl"
    rows_path.unlink(missing_ok=True)
    per_seed: dict[int, dict[int, dict]] = {}
    for s in seeds:
        rows = evaluate(str(work / f"seed{s}" / "model"), proto, name=f"{recipe.stem}-seed{s}", progress=False)
        write_rows(rows, rows_path)
        per_seed[s] = {r["steps"]: r for r in rows[1:]}
        floor = rows[0]
    teacher = None
    if args.teacher_best.is_file():
        bench = json.loads(args.teacher_best.read_text())
        teacher = next((r for r in bench["rows"] if r["draws"] == args.draws), None)
    steps = sorted({k for pts in per_seed.values() for k in pts})
    summary = []
    for k in steps:
        values = [per_seed[s][k]["value"] for s in seeds if k in per_seed[s]]
        mean = statistics.fmean(values)
        summary.append({"steps": k, "values": values, "cis": [per_seed[s][k]["value_ci"] for s in seeds],
                        "kids": [per_seed[s][k]["kid"] for s in seeds], "mean": mean, "min": min(values),
                        "max": max(values), "ratio": mean / teacher["value"] if teacher else None})
    info = provenance(command(__file__, argv), packages=("torch", "diffusers"))
    info.update({"recipe": str(args.recipe), "overrides": args.overrides, "seeds": seeds, "draws": args.draws,
                 "protocol": args.protocol, "train_s": train_s, "summary": summary, "floor": floor,
                 "teacher_best": teacher, "teacher_best_from": _shown(args.teacher_best)})
    text = render(info)
    write_report(out_dir(args.out), f"seed_spread-{recipe.stem}", text, info)
    print(text)


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it (reports name repository files that way)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def render(info: dict) -> str:
    seeds, summary, teacher, floor = info["seeds"], info["summary"], info["teacher_best"], info["floor"]
    n = floor["n"]
    lines = [f"# {info['recipe']} over training seeds {', '.join(map(str, seeds))}", "", measured_by(info), "",
             f"Each seed's student scored on protocol '{info['protocol']}' pooled over {info['draws']} draws of n = {n} "
             f"({info['draws'] * n} samples per point): the bias-corrected FD [95% interval] (docs/evaluation.md). "
             f"Training took {', '.join(f'{v / 60:.1f}' for v in info['train_s'].values()) or '(reused runs)'} min "
             "per seed."]
    if teacher:
        lines += ["", f"The teacher's best, on the same measure and draws: {teacher['value']:.3f} "
                      f"[{teacher['ci'][0]:.3f}, {teacher['ci'][1]:.3f}] (DPM-Solver++ 32 steps, "
                      f"`{info['teacher_best_from']}`). The data floor: {floor['value']:.3f} "
                      f"[{floor['value_ci'][0]:.3f}, {floor['value_ci'][1]:.3f}] (all {floor.get('pooled_n', n)} "
                      "real images of half B)."]
    head = " | ".join(f"seed {s}" for s in seeds)
    lines += ["", f"| steps | {head} | mean | range | mean / teacher's best |", "|---:|" + "---:|" * (len(seeds) + 3)]
    for row in summary:
        cells = " | ".join(f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" for v, ci in zip(row["values"], row["cis"]))
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "—"
        lines.append(f"| {row['steps']} | {cells} | {row['mean']:.3f} | {row['min']:.3f} to {row['max']:.3f} | {ratio} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
