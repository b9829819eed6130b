"""Benchmark: how many draws a protocol must pool for its headline to hold, measured on the teacher's best point.

    python evals/bench_pooled.py --benchmark digits        (the digits teacher, DPM-Solver++ 32 steps)
    python evals/bench_pooled.py --benchmark text-digits   (the SD-shaped teacher, UniPC 8 steps, w = 1.5)

Samples ``--draws`` draws of the protocol's n at one point (seeds seed .. seed + draws * n - 1, as ``evaluate``
does), computes their features once, and scores the first K draws for K = 1, 2, 5, 10, ... up to ``--draws``: the
first draw's plain FD, the pooled bias-corrected FD with its 95% interval (:func:`distill.eval.frechet.pooled_fd`),
the interval's half-width as a share of the value, and KID with its standard error. The width shrinks about as
1 / sqrt(K n); the report projects the K at which it reaches ``--target`` (10% on digits, 20% on text-digits) and
what sampling that many costs at this point on this machine. Writes evals/bench_pooled-<benchmark>.md and .json
(``--out DIR``: there instead); ``--render FILE.json`` writes a
report's markdown again from its JSON.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # evals/: the scripts' shared helper
from common import ROOT, add_out, add_threads, command, measured_by, out_dir, provenance, set_threads, write_report  # noqa: E402

BEST = {  # the teacher's best training-free point of each benchmark's committed leaderboard
    "digits": {"teacher": "distill/assets/digits-teacher", "protocol": "digits", "sampler": "dpmpp_2m", "steps": 32,
               "guidance": None, "target": 0.10},
    "text-digits": {"teacher": "distill/assets/text-digits-sd", "protocol": "text-digits", "sampler": "unipc",
                    "steps": 8, "guidance": 1.5, "target": 0.20},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", choices=sorted(BEST), default="digits")
    parser.add_argument("--draws", type=int, default=40, help="draws of n samples to generate (default 40)")
    parser.add_argument("--n", type=int, default=None, help="samples per draw (default: the protocol's)")
    parser.add_argument("--render", type=Path, default=None,
                        help="write the markdown of an earlier run's JSON again beside it, without sampling")
    add_threads(parser)
    add_out(parser, "bench_pooled-<benchmark>.md and .json")
    args = parser.parse_args(argv)
    if args.render is not None:
        import json

        args.render.with_suffix(".md").write_text(render(json.loads(args.render.read_text())))
        return
    threads = set_threads(args.threads)

    from distill.eval.frechet import bootstrap_fd, kid, pooled_fd
    from distill.eval.harness import conditioning, point_draw
    from distill.eval.protocol import load_protocol, reference
    from distill.eval.sweep import generate
    from distill.models import open_model

    best = BEST[args.benchmark]
    proto = load_protocol(best["protocol"], n=args.n, draws=args.draws)
    ref = reference(proto)
    model = open_model(str(ROOT / best["teacher"]))
    total = args.draws * ref.n
    cond = conditioning(model, proto, total)
    t0 = time.perf_counter()
    imgs = generate(point_draw(model, best["sampler"], best["steps"], proto, best["guidance"]), total,
                    model.pipeline.sample_shape, seed=proto.seed, batch_size=proto.batch_size, cond=cond)
    sample_s = time.perf_counter() - t0
    feats = ref.extractor.features(imgs)
    rows = []
    ks = sorted({k for k in (1, 2, 5, 10, 20, 40, 80, 160, args.draws) if k <= args.draws})
    for k in ks:
        x = feats[: k * ref.n]
        t1 = time.perf_counter()
        pooled = pooled_fd(x, ref.stats)
        kid_value, kid_se = kid(x, ref.features)
        lo, hi = bootstrap_fd(x[: ref.n], ref.stats)
        rows.append({"draws": k, "samples": k * ref.n, "single": ref.fd_of_features(x[: ref.n]), "single_ci": [lo, hi],
                     "plain": pooled.plain, "value": pooled.value, "ci": list(pooled.ci),
                     "half_width": (pooled.ci[1] - pooled.ci[0]) / 2 / pooled.value if pooled.value > 0 else None,
                     "kid": kid_value, "kid_se": kid_se, "score_s": round(time.perf_counter() - t1, 2)})
    last = rows[-1]
    # the interval's half-width falls about as 1 / sqrt(samples): the draws at which it would reach the target
    need = math.ceil(args.draws * (last["half_width"] / best["target"]) ** 2) if last["half_width"] else None
    per_draw_s = sample_s / args.draws
    info = provenance(command(__file__, argv), packages=("torch", "diffusers"))
    info.update({"benchmark": args.benchmark, "point": {k: best[k] for k in ("teacher", "sampler", "steps", "guidance")},
                 "n": ref.n, "target": best["target"], "sampling_s_per_draw": round(per_draw_s, 2),
                 "draws_for_target": need, "rows": rows, "threads": threads})
    info["seed"] = proto.seed
    text = render(info)
    write_report(out_dir(args.out), f"bench_pooled-{args.benchmark}", text, info)
    print(text)


def render(info: dict) -> str:
    """The report's markdown from its JSON (``--render FILE`` writes it again without sampling)."""
    point, rows, n, draws = info["point"], info["rows"], info["n"], info["rows"][-1]["draws"]
    per_draw_s, need, target, last = info["sampling_s_per_draw"], info["draws_for_target"], info["target"], info["rows"][-1]
    seed = info.get("seed", 0)
    w = f", w = {point['guidance']:g}" if point["guidance"] is not None else ""
    lines = [f"# How many draws the '{BEST[info['benchmark']]['protocol']}' protocol pools", "",
             measured_by(info, ("diffusers",)), "",
             f"The teacher's best training-free point ({point['sampler']}, {point['steps']} steps{w}) sampled as "
             f"{draws} draws of n = {n} (seeds {seed}..{seed + draws * n - 1}); each row scores the "
             "first K draws. Pooled: the FD of all K n samples with its sample-size bias removed, and its 95% "
             "bias-corrected bootstrap interval; half-width: half the interval over the value; KID +- its "
             f"standard error; single: the first draw's plain FD. Sampling took {per_draw_s:.1f} s a draw "
             f"({n / per_draw_s:.0f} samples/s).", "",
             "| draws K | samples | single draw (plain) | pooled, plain | pooled, bias-corrected [95%] | half-width | KID |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        hw = f"{100 * r['half_width']:.0f}%" if r["half_width"] is not None else "—"
        lines.append(f"| {r['draws']} | {r['samples']} | {r['single']:.3f} | {r['plain']:.3f} | {r['value']:.3f} "
                     f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {hw} | {r['kid']:.3g} ± {r['kid_se']:.2g} |")
    lines.append("")
    if need is not None:
        verdict = "met" if last["half_width"] <= target else "not met"
        lines.append(f"Target: a half-width of at most {100 * target:.0f}% of the value; at {draws} draws "
                     f"it is {100 * last['half_width']:.0f}% ({verdict}). Scaling as 1 / sqrt(samples), about {need} "
                     f"draws ({need * n} samples) reach it; sampling them at this point takes about "
                     f"{need * per_draw_s / 60:.0f} min here.")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
