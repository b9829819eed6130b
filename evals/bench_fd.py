"""Benchmark: time to score 10,000 digits samples (features + statistics + Frechet distance), and the
sampling speed of the harness's sweep (from the committed baseline rows).

    python evals/bench_fd.py          (part of `make bench`)

Writes evals/bench_fd.md. The 10,000 images are real digits with small Gaussian noise (the cost does not
depend on what the images show); the reference statistics come from the protocol cache, as in a sweep.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # evals/: the scripts' shared helper
from common import EVALS, command, measured_by, provenance, set_threads, write_report  # noqa: E402

from distill.benchmarks.digits.data import digits_dataset  # noqa: E402
from distill.eval.protocol import load_protocol, reference  # noqa: E402

N = 10_000


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)  # no options; --help
    set_threads()
    ref = reference(load_protocol("digits", draws=1))
    real = digits_dataset()[:]["image"]
    g = torch.Generator().manual_seed(0)
    images = (real[torch.randint(0, len(real), (N,), generator=g)] + 0.05 * torch.randn(N, 1, 8, 8, generator=g)).clamp(-1, 1)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        value = ref.fd(images)
        times.append(time.perf_counter() - t0)
    lines = [
        "# Speed: FD-digits of 10,000 samples",
        "",
        measured_by(provenance(command(__file__, []), packages=(), git=False)),
        "",
        f"- features + statistics + Frechet distance for {N:,} samples: median {statistics.median(times):.2f} s "
        f"of 3 runs ({N / statistics.median(times):,.0f} samples/s); target under 30 s. (FD of the noisy real "
        f"digits: {value:.2f}.)",
    ]
    rows_path = EVALS / "results" / "digits-digits-teacher.jsonl"
    if rows_path.is_file():
        rows = [json.loads(l) for l in rows_path.read_text().splitlines() if l.strip()]
        lines += ["", "Sweep speed of the baseline (`evals/baseline.py`): samples generated per second, "
                  f"n = {rows[0]['n']} per point, generation batch 450.", "",
                  "| sampler | steps | NFE | samples/s |", "|---|---:|---:|---:|"]
        lines += [f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['samples_per_s']:.0f} |"
                  for r in rows if r["method"] != "data-floor"]
    write_report(EVALS, "bench_fd", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
