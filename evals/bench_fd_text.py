"""Benchmark: time to score 10,000 text-digits samples: FD-text-digits (features + statistics + Frechet distance)
and prompt accuracy (the judge's digit and color readings against the prompts). Sampling is not included.

    python evals/bench_fd_text.py                 (part of `make bench`; writes evals/bench_fd_text.md)
    python evals/bench_fd_text.py --threads 1 --out /tmp/bench

The 10,000 images are colored digits of the protocol's dataset with small Gaussian noise, each with its own digit
and color as the prompt (the cost does not depend on what the images show); the reference statistics come from
the protocol cache, as in an evaluation. Each of 3 runs computes the features, their statistics and the FD, then
the judge's readings and the accuracy, as the harness does for one point; the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # evals/: the scripts' shared helper
from common import (add_out, add_threads, command, measured_by, out_dir, provenance, set_threads,  # noqa: E402
                    write_report)

N = 10_000


def main(argv: list[str] | None = None) -> int:
    from distill.eval.protocol import _dataset_images, judge, load_protocol, reference

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_threads(parser)
    add_out(parser, "bench_fd_text.md")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    proto = load_protocol("text-digits")
    ref = reference(proto)
    real, _, columns = _dataset_images(proto)
    g = torch.Generator().manual_seed(0)
    pick = torch.randint(0, len(real), (N,), generator=g)
    images = (real[pick] + 0.05 * torch.randn(N, *real.shape[1:], generator=g)).clamp(-1, 1)
    targets = {k: torch.as_tensor(v)[pick] for k, v in columns.items()}
    times, fd_times = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        value = ref.fd(images)
        fd_times.append(time.perf_counter() - t0)
        accuracy = float(judge(ref.extractor, images, targets).float().mean())
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    info = provenance(command(__file__, argv), packages=(), git=False)
    lines = ["# Speed: FD-text-digits and prompt accuracy of 10,000 samples", "",
             measured_by(info), "",
             f"- FD (features + statistics + Frechet distance) and prompt accuracy (the judge's readings) for {N:,} "
             f"samples: median {med:.2f} s of 3 runs ({N / med:,.0f} samples/s), of which FD "
             f"{statistics.median(fd_times):.2f} s; target at most 30 s. (The noisy real images: FD {value:.2f}, "
             f"accuracy {100 * accuracy:.2f}%.)", ""]
    write_report(out_dir(args.out), "bench_fd_text", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
