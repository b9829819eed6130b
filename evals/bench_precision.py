"""Benchmark: training speed in fp32 and under ``trainer.mixed_precision: bf16`` on this CPU, for each digits
recipe and two text-to-image ones (consistency on the SD- and SD3-shaped teachers).

    python evals/bench_precision.py                                   (every recipe; about 9 minutes on 2 cores)
    python evals/bench_precision.py --recipes consistency --out /tmp/bench   (one recipe)

For each recipe it starts two ``distill run`` processes at once, one in fp32 and one in bf16, each with one torch
thread (``trainer.threads=1``) and ``OMP_WAIT_POLICY=PASSIVE``, so that the two see the same load on a 2-core
machine. Each trains a short budget (below) without evaluation. The figure is the median of the steps/s that the
run logs every 10 steps, leaving out the first row (start-up). bf16 runs attention over short sequences in fp32
(``distill.precision``); without that, the bf16 step was slower than fp32's on a CPU with AMX
(``evals/bench_step_intel/bench_step.md``).

This measures speed only. Whether a recipe trains as well in bf16 is a quality question, answered by training it
at its full budget with the override and scoring it (docs/speed.md).

Writes ``evals/bench_precision.md`` and ``.json`` (or ``--out DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # evals/: the scripts' shared helper
from common import ROOT, add_out, command, cpu_flags, measured_by, out_dir, provenance, write_report  # noqa: E402

# short budgets: enough logged rows (every 10 steps) for a stable median
BUDGETS = {
    "teacher": ["trainer.max_steps=120"],
    "progressive": ["method.iters_per_phase=[20,20,20,20,20,20]"],
    "consistency": ["method.iters=120"],
    "adversarial": ["method.iters=100"],
    "distribution_matching": ["method.iters=80"],
    # the SD-shaped text-to-image teacher: self-attention over the latent's tokens and cross-attention to the prompt
    "text-digits/consistency-sd": ["method.iters=60"],
    "text-digits/consistency-sd3": ["method.iters=60"],
}


def run_pair(recipe: str, work: Path) -> dict[str, Any]:
    """Train ``recipe`` in fp32 and in bf16 at once; their median steps/s."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    common = ["trainer.threads=1", "eval.protocol=null", "trainer.log_every=10", "trainer.checkpoint_every=0",
              "trainer.progress=false", *BUDGETS[recipe]]
    procs = {}
    for precision in ("fp32", "bf16"):
        out = work / f"{recipe.replace('/', '-')}-{precision}"
        extra = ["trainer.mixed_precision=bf16"] if precision == "bf16" else []
        path = ROOT / "recipes" / (recipe if "/" in recipe else f"digits/{recipe}")
        cmd = [sys.executable, "-m", "distill.cli", "run", str(path.with_suffix(".yaml")),
               "--out", str(out), *common, *extra]
        log = open(out.with_suffix(".log"), "w")
        procs[precision] = (subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), out, log)
    row: dict[str, Any] = {"recipe": recipe, "budget": BUDGETS[recipe]}
    for precision, (proc, out, log) in procs.items():
        rc = proc.wait()
        log.close()
        if rc != 0:
            tail = out.with_suffix(".log").read_text().strip().splitlines()[-3:]
            row[precision] = None
            row[f"{precision}_error"] = " / ".join(tail)[:300]
            continue
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rates = [r["steps_per_s"] for r in rows if "steps_per_s" in r][1:]
        row[precision] = statistics.median(rates)
        row[f"{precision}_rows"] = len(rates)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="each recipe's steps/s in fp32 and in bf16 on this CPU")
    parser.add_argument("--recipes", default=",".join(BUDGETS), help=f"comma-separated, of {', '.join(BUDGETS)}")
    add_out(parser, "bench_precision.{md,json}")
    args = parser.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    bad = [r for r in recipes if r not in BUDGETS]
    if bad:
        parser.error(f"unknown recipe(s) {', '.join(bad)}; choose from {', '.join(BUDGETS)}")
    import torch

    torch.set_num_threads(1)  # what each training process runs with, and what machine() below reports

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        for recipe in recipes:
            print(f"training {recipe} in fp32 and bf16 at once...", file=sys.stderr, flush=True)
            rows.append(run_pair(recipe, Path(tmp)))
    info = provenance(command(__file__, argv), packages=(), git=False)
    lines = ["# Speed: the recipes in fp32 and in bf16 on this CPU", "",
             measured_by(info, also=f"CPU flags: {cpu_flags()}"), "",
             "Each recipe trained twice at once (fp32 and `trainer.mixed_precision=bf16`), one torch thread each, "
             "`OMP_WAIT_POLICY=PASSIVE`, no evaluation; steps/s is the median of the rows logged every 10 steps "
             "after the first.", "",
             "| recipe | budget | fp32 steps/s | bf16 steps/s | bf16 against fp32 |", "|---|---|---:|---:|---:|"]
    for r in rows:
        cells = [f"{r[p]:.2f}" if r.get(p) else f"failed: {r.get(p + '_error', '')}" for p in ("fp32", "bf16")]
        ratio = f"{r['bf16'] / r['fp32']:.2f}x" if r.get("fp32") and r.get("bf16") else "—"
        lines.append(f"| {r['recipe']} | `{' '.join(r['budget'])}` | {cells[0]} | {cells[1]} | {ratio} |")
    write_report(out_dir(args.out), "bench_precision", "\n".join(lines) + "\n",
                 {"command": info["command"], "machine": info["machine"], "cpu_flags": cpu_flags(), "rows": rows})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
