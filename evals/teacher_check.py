"""Benchmark: FD-digits of the shipped digits teacher against DDIM steps, beside the data-vs-data floor.

    python evals/teacher_check.py            (or `make bench`)

Writes evals/results/teacher_check.jsonl (one row per step count, plus the floor row) and
evals/teacher_check.md. The floor is FD(half B, half A) of two disjoint random halves of the real digits;
every model FD uses the same sample count (len(B) = 898) and the same reference (half A).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill.denoisers import load_denoiser  # noqa: E402
from distill.eval.digits_net import load_digits_config  # noqa: E402
from distill.eval.sweep import digits_curve, digits_reference  # noqa: E402

STEPS = [1, 2, 4, 8, 16, 32, 64, 256]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    teacher = ROOT / "distill" / "assets" / "digits-teacher"
    D = load_denoiser(teacher).eval()
    ref = digits_reference()
    t0 = time.perf_counter()
    rows = digits_curve(D, ["ddim"], STEPS, ref)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    common = {"model": "distill/assets/digits-teacher", "extractor": f"digits-net:{load_digits_config()['weights_hash']}",
              "protocol": "digits-halves (split seed 0)", "machine": machine(), "git": git}
    out = ROOT / "evals" / "results" / "teacher_check.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        f.write(json.dumps({"method": "data-floor", "metric": "FD-digits", "value": ref.floor, "n": ref.n, **common}) + "\n")
        for r in rows:
            f.write(json.dumps({"method": "teacher", **r, **common}) + "\n")
    best = min(r["value"] for r in rows)
    lines = [
        "# Shipped digits teacher: FD-digits against DDIM steps",
        "",
        f"Measured by `python evals/teacher_check.py` on {common['machine']}; git {git}.",
        f"n = {ref.n} samples per point (per-sample seeds 0..{ref.n - 1}, trailing timestep spacing), reference = "
        "half A of the real digits; floor = FD(half B, half A). FD-digits is the Frechet distance in the shipped "
        "digits classifier's 64-d feature space; it is not Inception FID.",
        "",
        "| DDIM steps | FD-digits | x floor | samples/s |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['steps']} | {r['value']:.2f} | {r['value'] / ref.floor:.2f} | {r['samples_per_s']:.0f} |" for r in rows]
    lines += [f"| data floor | {ref.floor:.2f} | 1.00 | |", "",
              f"Best teacher FD-digits: {best:.2f} = {best / ref.floor:.2f}x the floor. "
              f"Total wall time {time.perf_counter() - t0:.0f} s.", "",
              "The teacher was trained on all 1,797 digits, half A included, so its samples can sit closer to "
              "half A than the held-apart half B does: a model FD below the floor means the teacher matches "
              "the training set about as well as real data does, not that it beats real data."]
    (ROOT / "evals" / "teacher_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
