"""Diagnostic: how much of a digits model's FD is its class proportions, and how much is one draw's luck.

    python evals/mode_balance.py distill/assets/digits-teacher:32:dpmpp_2m RUN/model:1 [...] --out DIR

Each model is ``PATH:STEPS[:SAMPLER]`` (a student's own sampler by default; a teacher needs one, e.g.
``dpmpp_2m``). For each, on the ``digits`` protocol (FD-digits against half A of the data):

* **protocol draw**: the FD of the protocol's own ``n`` samples (seeds ``seed .. seed + n - 1``), the leaderboard's
  number;
* **other draws**: the FD of ``--draws`` more draws of ``n`` samples each, from disjoint seed blocks (from
  ``--seed-base``): how far the same model's number moves with the noise it is given;
* **classes**: the shipped digits classifier's (the FD-digits network's) predicted class of every sample of those
  draws, as the fewest and most of any class (in % of the samples; 10% each is uniform) and the total variation
  distance of the class shares from half B's;
* **class-balanced FD**: the FD of ``m`` samples of each predicted class taken from the pooled draws (``m`` the
  fewest of any class among half B's ``n`` images), so a model whose only fault is how often it draws each digit
  scores like one without that fault. Half B's own row is the real data through the same selection;
* **pooled FD**: the FD of all the draws together (``(draws + 1) n`` samples) against half A: the generated side's
  sampling noise mostly averaged away (half A's stays, the same for every model).

Writes ``mode_balance.md`` and ``mode_balance.json`` into ``--out`` (default: print only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # evals/: the scripts' shared helper
from common import add_threads, measured_by, out_dir, provenance, set_threads, write_report  # noqa: E402


def parse_spec(spec: str) -> tuple[str, int, str | None]:
    parts = spec.rsplit(":", 2)
    if len(parts) >= 2 and parts[-1].isdigit():
        return ":".join(parts[:-1]), int(parts[-1]), None
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], int(parts[1]), parts[2]
    raise SystemExit(f"model {spec!r}: give PATH:STEPS or PATH:STEPS:SAMPLER (e.g. RUN/model:1, "
                     "distill/assets/digits-teacher:32:dpmpp_2m)")


def class_shares(labels: torch.Tensor) -> np.ndarray:
    return torch.bincount(labels, minlength=10).double().numpy() / max(len(labels), 1)


def balanced(images: torch.Tensor, labels: torch.Tensor, m: int) -> tuple[torch.Tensor, int]:
    """The first ``m`` images of each class (fewer where a class has fewer); and the fewest any class gave."""
    picks = [torch.nonzero(labels == c).flatten()[:m] for c in range(10)]
    return images[torch.cat(picks)], min(len(p) for p in picks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="PATH:STEPS[:SAMPLER]")
    parser.add_argument("--draws", type=int, default=4, help="draws of n samples besides the protocol's (default 4)")
    parser.add_argument("--seed-base", type=int, default=100_000, help="first seed of the other draws")
    parser.add_argument("--n", type=int, default=None, help="samples a draw (default: the protocol's, 898)")
    add_threads(parser, default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for mode_balance.{md,json} (default: print only)")
    args = parser.parse_args(argv)
    if args.threads:
        set_threads(args.threads)

    from distill.benchmarks.digits.judge import load_digits_net
    from distill.eval.harness import point_draw
    from distill.models import open_model
    from distill.eval.protocol import halves, load_protocol, reference
    from distill.eval.sweep import generate

    proto = load_protocol("digits", **({"n": args.n} if args.n else {}))
    ref = reference(proto)
    net = load_digits_net(None).eval()

    def classify(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(images.clamp(-1, 1)).argmax(-1)

    half_b = halves(proto)[1][: ref.n]  # the floor's real images
    b_labels = classify(half_b)
    b_shares = class_shares(b_labels)
    m = int(torch.bincount(b_labels, minlength=10).min())
    b_bal, _ = balanced(half_b, b_labels, m)
    rows: list[dict[str, Any]] = [{
        "model": "real data (half B)", "steps": None, "sampler": None, "protocol_fd": ref.floor, "draws": [],
        "class_min": float(b_shares.min()), "class_max": float(b_shares.max()), "class_tv": 0.0,
        "balanced_fd": ref.fd(b_bal), "balanced_n": len(b_bal)}]
    for spec in args.models:
        path, steps, sampler = parse_spec(spec)
        model = open_model(path)
        sampler = sampler or model.samplers[0]
        draw = point_draw(model, sampler, steps, proto)
        shape = tuple(ref.shape)
        own = generate(draw, ref.n, shape, seed=proto.seed)
        others = [generate(draw, ref.n, shape, seed=args.seed_base + i * ref.n) for i in range(args.draws)]
        pooled = torch.cat([own, *others])
        labels = classify(pooled)
        shares = class_shares(labels)
        bal, fewest = balanced(pooled, labels, m)
        name = Path(path).parent.name if Path(path).name == "model" else Path(path).name
        rows.append({"model": name, "path": path, "steps": steps, "sampler": sampler, "protocol_fd": ref.fd(own),
                     "draws": [ref.fd(x) for x in others], "class_min": float(shares.min()),
                     "class_max": float(shares.max()), "class_tv": float(0.5 * np.abs(shares - b_shares).sum()),
                     "balanced_fd": ref.fd(bal), "balanced_n": len(bal), "fewest": fewest,
                     "pooled_fd": ref.fd(pooled), "pooled_n": len(pooled)})
        print(json.dumps(rows[-1]), flush=True)

    info = provenance(f"python evals/mode_balance.py {' '.join(args.models)} --draws {args.draws}", packages=())
    head = (f"# How much of FD-digits is class proportions, and how much one draw\n\n"
            f"{measured_by(info)}\n\nn = {ref.n} samples a draw; the class-balanced FD takes {m} samples "
            f"of each predicted class ({10 * m} in all; {m} is the fewest of any class in half B); the pooled FD uses "
            f"{(args.draws + 1) * ref.n} samples of each model.\n")
    lines = ["| model | steps | sampler | FD, protocol draw | FD, other draws: mean (min-max) | fewest / most of a "
             "class | TV from half B | class-balanced FD | pooled FD |", "|---|---:|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        d = r["draws"]
        spread = f"{np.mean(d):.2f} ({min(d):.2f}-{max(d):.2f})" if d else "-"
        pooled_cell = f"{r['pooled_fd']:.2f}" if "pooled_fd" in r else "-"
        short = f" (only {r['fewest']} of one class)" if r.get("fewest", m) < m else ""
        lines.append(f"| {r['model']} | {r['steps'] or '-'} | {r['sampler'] or '-'} | {r['protocol_fd']:.2f} | "
                     f"{spread} | {100 * r['class_min']:.1f}% / {100 * r['class_max']:.1f}% | {r['class_tv']:.3f} | "
                     f"{r['balanced_fd']:.2f}{short} | {pooled_cell} |")
    md = head + "\n" + "\n".join(lines) + "\n"
    print(md)
    if args.out:
        write_report(out_dir(args.out), "mode_balance", md,
                     {"machine": info["machine"], "git": info["git"], "rows": rows})
    return 0


if __name__ == "__main__":
    from distill.errors import DistillError

    try:
        raise SystemExit(main())
    except DistillError as exc:  # a model folder that does not load, a protocol that does not fit: say which
        raise SystemExit(f"error: {exc}") from None
