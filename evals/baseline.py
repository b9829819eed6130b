"""Benchmark: the shipped digits teacher's baseline curve, FD-digits against NFE for DDIM, Euler and Heun.

    python evals/baseline.py                       (part of `make bench`)
    python evals/baseline.py --protocol digits-b   (the same curve under the second feature network; DDIM, Heun)

Runs the harness on protocol `digits` (n = 898 samples per point, per-sample seeds, floor = FD between two
disjoint halves of the real digits) and writes evals/results/digits-digits-teacher.jsonl (replaced, not
appended), the sample grids in evals/grids/digits-teacher/, and then re-renders evals/LEADERBOARD.md with its plot.
DDIM and Euler run on the teacher's own timesteps (trailing spacing); Heun on EDM's Karras grid up to sigma 80.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # evals/: the scripts' shared helper
from common import ROOT, set_threads  # noqa: E402

from distill import cli  # noqa: E402
from distill.eval.harness import evaluate, write_rows  # noqa: E402

POINTS = {"ddim": [1, 2, 4, 8, 16, 32, 64, 128, 256], "euler": [1, 2, 4, 8, 16, 32, 64, 128, 256],
          "heun": [1, 2, 4, 8, 16, 32, 64, 128]}  # heun: 2n - 1 NFE, so 1..255 NFE


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="the digits teacher's FD against NFE")
    parser.add_argument("--protocol", default="digits", help="digits (default) or digits-b")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    set_threads()
    out = ROOT / "evals" / "results" / f"{args.protocol}-digits-teacher.jsonl"
    main_protocol = args.protocol == "digits"
    points = POINTS if main_protocol else {k: v for k, v in POINTS.items() if k != "euler"}  # euler = ddim here
    rows = []
    for sampler, steps in points.items():
        got = evaluate(ROOT / "distill" / "assets" / "digits-teacher", args.protocol, steps, [sampler],
                       name="digits-teacher", grids=Path("evals/grids") if main_protocol else None)
        rows += got if not rows else got[1:]  # one floor row
    out.unlink(missing_ok=True)
    write_rows(rows, out)
    cli.main(["leaderboard", "--md", "evals/LEADERBOARD.md", "--plots", "evals/plots"])


if __name__ == "__main__":
    main()
