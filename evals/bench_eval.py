"""Benchmark: evaluation throughput of the harness, generation and scoring apart.

    python evals/bench_eval.py                                  (DDIM at 1 and 4 steps, protocol digits)
    python evals/bench_eval.py --repeats 1 --n 200 --out /tmp/bench     (a smoke run)
    python evals/bench_eval.py --steps 1,2,4,8 --threads 4

Times ``distill.eval.harness.evaluate`` on the shipped digits teacher (protocol ``digits``, DDIM at ``--steps``).
The first call is a warm-up (it also computes and caches the protocol's reference statistics when they are not
cached yet); each of the ``--repeats`` calls after it is timed. Every harness row carries ``wall_s`` (generation
plus scoring of its point) and ``samples_per_s`` (generation alone), so per point

* generation: ``samples_per_s`` (n samples over the sampling time);
* features + statistics + FD: ``n / (wall_s - n / samples_per_s)`` (the feature network on the n samples, their
  mean and covariance, the Frechet distance to the cached reference).

``wall_s`` is rounded to milliseconds by the harness, which bounds the precision of the second number when the
scoring takes only a few milliseconds. The median over the timed calls is reported, with the whole call's wall time.

Writes ``evals/bench_eval.md`` and ``evals/bench_eval.json`` (or ``--out DIR``/bench_eval.{md,json}).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # evals/: the scripts' shared helper
from common import (ROOT, add_device, add_out, add_threads, command, fmt, measured_by, out_dir,  # noqa: E402
                    provenance, resolve_device, set_threads, sync, write_report)

from distill.errors import DistillError  # noqa: E402

TEACHER = ROOT / "distill" / "assets" / "digits-teacher"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="evaluation throughput: generation and FD scoring")
    parser.add_argument("--steps", default="1,4", help="comma-separated DDIM step counts (default 1,4)")
    parser.add_argument("--sampler", default="ddim", help="the harness sampler (default ddim)")
    parser.add_argument("--protocol", default="digits", help="evaluation protocol (default digits)")
    parser.add_argument("--n", type=int, default=None, help="samples per point (default: the protocol's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluate() calls after the warm-up one")
    add_threads(parser)
    add_device(parser)
    add_out(parser, "bench_eval.md/.json")
    args = parser.parse_args(argv)
    try:
        steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--steps: {args.steps!r} is not a comma-separated list of integers")
    if not steps or steps[0] < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--steps, --repeats and --threads must be >= 1")
    device = resolve_device(parser, args.device)
    out = out_dir(args.out)
    set_threads(args.threads)
    cmd = command(__file__, argv)

    from distill.eval.harness import evaluate
    from distill.eval.protocol import load_protocol

    try:
        proto = load_protocol(args.protocol, n=args.n)

        def call() -> tuple[list[dict[str, Any]], float]:
            sync(device)
            t0 = time.perf_counter()
            rows = evaluate(TEACHER, proto, steps, [args.sampler], name="digits-teacher", progress=False,
                            device=device)
            sync(device)
            return rows[1:], time.perf_counter() - t0  # rows[0] is the data floor

        print("warm-up call (computes the reference statistics if they are not cached)...", flush=True)
        _, warm_s = call()
        calls: list[tuple[list[dict[str, Any]], float]] = []
        for i in range(args.repeats):
            calls.append(call())
            rows, wall = calls[-1]
            print(f"call {i + 1}/{args.repeats}: {wall:.2f} s; "
                  + ", ".join(f"{r['sampler']} {r['steps']}: gen {r['samples_per_s']:,.0f}/s" for r in rows),
                  flush=True)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    points: list[dict[str, Any]] = []
    for j, r0 in enumerate(calls[0][0]):
        n = int(r0["n"])
        gen_s = [n / c[0][j]["samples_per_s"] for c in calls]
        score_s = [c[0][j]["wall_s"] - n / c[0][j]["samples_per_s"] for c in calls]
        med_score = statistics.median(score_s)
        points.append({
            "sampler": r0["sampler"], "steps": r0["steps"], "nfe": r0["nfe"], "n": n, "fd": r0["value"],
            "generation_samples_per_s": n / statistics.median(gen_s),
            "scoring_samples_per_s": n / med_score if med_score > 0 else None,
            "point_wall_s": statistics.median(c[0][j]["wall_s"] for c in calls),
            "generation_s": gen_s, "scoring_s": score_s,
        })
    call_s = [c[1] for c in calls]
    info = {**provenance(cmd, device=device, packages=("torch",)), "threads": args.threads, "protocol": proto.name,
            "repeats": args.repeats, "warmup_call_s": warm_s, "call_s": call_s, "points": points}
    lines = [
        "# Speed: evaluation throughput (harness)",
        "",
        measured_by(info, ("torch",)),
        "",
        f"`distill.eval.harness.evaluate` on the shipped digits teacher, protocol `{proto.name}`, "
        f"{args.sampler} at {', '.join(map(str, steps))} step(s); the median of {args.repeats} call(s) after a "
        "warm-up call (reference statistics cached). Generation: the harness row's `samples_per_s`; features + "
        "statistics + FD: n over the rest of the point's `wall_s` (milliseconds).",
        "",
        "| sampler | steps | NFE | n | generation samples/s | features+stats+FD samples/s | point wall s | FD |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(f"| {p['sampler']} | {p['steps']} | {p['nfe']} | {p['n']} | "
                     f"{fmt(p['generation_samples_per_s'], ',.0f')} | {fmt(p['scoring_samples_per_s'], ',.0f')} | "
                     f"{p['point_wall_s']:.3f} | {p['fd']:.2f} |")
    lines += ["", f"Whole `evaluate()` call (open the model, load the cached reference, all points, the floor row): "
              f"median {statistics.median(call_s):.2f} s; the warm-up call took {warm_s:.2f} s."]
    text = "\n".join(lines) + "\n"
    md, js = write_report(out, "bench_eval", text, info)
    print()
    print(text)
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
