"""Benchmark: what a user would do instead of distilling: every training-free sampler of a teacher, 1 to 50 NFE.

    python evals/baselines.py --teacher digits              (the shipped digits teacher, protocol digits)
    python evals/baselines.py --teacher text-digits-sd      (guidance 1, 1.5, 2, 3, 5, 7.5; protocol text-digits)
    python evals/baselines.py --teacher text-digits-sd3

Samplers: distill's DDIM, Euler and Heun, and diffusers' own DPM-Solver++(2M) (with and without Karras sigmas) and
UniPC driven on the teacher's schedule (``distill.samplers``), at step counts giving 1 to 50 network evaluations
(NFE; Heun takes 2n - 1; classifier-free guidance doubles each, and rows count it). Writes
``evals/results/<protocol>-<teacher>-baselines.jsonl`` (replaced) and ``evals/baselines-<teacher>.md`` (with
``--tag T``: ``...-baselines-T.jsonl`` and ``baselines-<teacher>-T.md``, beside the full table): per NFE, every
sampler's FD (with its bootstrap interval; accuracy for text teachers) and the best one, which is what the
students are compared with (:func:`distill.eval.leaderboard.best_training_free`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # evals/: the scripts' shared helper
from common import ROOT, add_out, add_threads, command, out_dir, set_threads  # noqa: E402

from distill.eval.harness import evaluate, machine, write_rows  # noqa: E402
from distill.eval.leaderboard import best_training_free  # noqa: E402

TEACHERS = {
    "digits": ("distill/assets/digits-teacher", "digits", None),
    "text-digits-sd": ("distill/assets/text-digits-sd", "text-digits", [1.0, 1.5, 2.0, 3.0, 5.0, 7.5]),
    "text-digits-sd3": ("distill/assets/text-digits-sd3", "text-digits", [1.0, 1.5, 2.0, 3.0, 5.0, 7.5]),
}
SAMPLERS = ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc")
STEPS = [1, 2, 3, 4, 6, 8, 12, 16, 25, 50]  # network evaluations per sample (unguided)
HEUN_STEPS = [1, 2, 3, 4, 5, 7, 9, 13, 25]  # 2n - 1 NFE: 1, 3, 5, 7, 9, 13, 17, 25, 49


def _markdown(rows: list[dict[str, Any]], teacher: str, wall_s: float, command: str) -> str:
    floor = rows[0]
    points = [r for r in rows[1:]]
    nfes = sorted({r["nfe"] for r in points})
    acc = floor.get("accuracy") is not None

    def cell(r: dict[str, Any]) -> str:
        ci = r.get("value_ci")
        s = f"{r['value']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        if acc and r.get("accuracy") is not None:
            s += f" · {100 * r['accuracy']:.1f}%"
        if r.get("guidance") is not None:
            s += f" (w={r['guidance']:g})"
        return s

    lines = [f"# Training-free baselines: {teacher}", "",
             f"{floor['metric']} (lower is better{'; then prompt accuracy' if acc else ''}), n = {floor['n']} samples "
             f"per point, protocol `{floor['protocol']['name']}`; data floor {floor['value']:.2f}"
             + (f" (accuracy {100 * floor['accuracy']:.1f}% on real images)" if acc else "") + ". "
             "Each cell is a sampler's best point at that many network evaluations (NFE; classifier-free guidance "
             "counts two per step), over its guidance scales. Intervals: 95% bootstrap over samples.", "",
             "| NFE | " + " | ".join(SAMPLERS) + " | best |", "|---:|" + "---|" * (len(SAMPLERS) + 1)]
    for n in nfes:
        best_row = best_training_free(points, n)
        cells = []
        for s in SAMPLERS:
            at = [r for r in points if r["sampler"] == s and r["nfe"] == n]
            cells.append(cell(min(at, key=lambda r: r["value"])) if at else "")
        best = f"**{best_row['value']:.2f}** {best_row['sampler']}" if best_row else ""
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {best} |")
    mins, secs = divmod(int(round(wall_s)), 60)
    lines += ["", f"Measured on {machine()} in {mins} min {secs} s: `{command}`. The `best` column is the lowest FD at "
              "that NFE or fewer, the bar a distilled student at that NFE has to clear.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", choices=sorted(TEACHERS), default="digits")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--steps", default=None, help="comma-separated step counts (default: 1 to 50 NFE)")
    parser.add_argument("--guidance", default=None, help="comma-separated guidance scales (text teachers)")
    parser.add_argument("--samples", type=int, default=None, help="samples per point (default: the protocol's)")
    add_out(parser, "the rows (results/) and the markdown")
    add_threads(parser)
    parser.add_argument("--tag", default=None, help="a suffix for the outputs' names, to keep a partial run (other "
                        "guidance scales, samplers or steps) beside the full table instead of replacing it")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # (a relative --out is taken from here)
    set_threads(args.threads)
    folder, protocol, guidance = TEACHERS[args.teacher]
    if args.guidance:
        guidance = [float(v) for v in args.guidance.split(",")]
    from distill.eval.protocol import load_protocol

    proto = load_protocol(protocol, n=args.samples)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for sampler in args.samplers.split(","):
        steps = [int(v) for v in args.steps.split(",")] if args.steps else (HEUN_STEPS if sampler == "heun" else STEPS)
        print(f"{args.teacher}: {sampler} at {steps} steps" + (f", guidance {guidance}" if guidance else ""),
              flush=True)
        got = evaluate(ROOT / folder, proto, steps, [sampler], name=args.teacher, guidance=guidance, progress=True)
        rows += got if not rows else got[1:]
    wall = time.perf_counter() - t0
    suffix = f"-{args.tag}" if args.tag else ""
    out = out_dir(args.out)
    results = out / "results" / f"{protocol}-{args.teacher}-baselines{suffix}.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.unlink(missing_ok=True)
    write_rows(rows, results)
    md = _markdown(rows, args.teacher, wall, command(__file__, argv))
    (out / f"baselines-{args.teacher}{suffix}.md").write_text(md)
    print(json.dumps({"rows": len(rows), "wall_s": round(wall, 1), "out": str(results)}))


if __name__ == "__main__":
    main()
