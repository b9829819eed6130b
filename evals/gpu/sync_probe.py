"""Where a training step waits for the GPU: each recipe's steps under ``torch.cuda.set_sync_debug_mode("warn")``,
with the Python stack of every synchronizing call recorded (a device check; on a CPU there is nothing to find).

    python evals/gpu/sync_probe.py --methods teacher,consistency --steps 3 --sampling 1 --out OUT/sync_probe.md

Steps 1-2 warm up; the next ``--steps`` are recorded. metrics rows are pushed past the run (log_every), so every
sync found is one the loop does at each step.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
RECIPES = {m: ROOT / "recipes" / "digits" / f"{m}.yaml" for m in ("teacher", "progressive", "consistency", "adversarial")}


def probe(method: str, steps: int) -> collections.Counter:
    from distill.recipe import load_recipe
    from distill.trainer import Trainer

    overrides = ["trainer.progress=false", "eval.protocol=null", "trainer.checkpoint_every=0", "trainer.log_every=100000"]
    if method != "teacher":
        overrides.append(f"teacher={ROOT / 'distill/assets/digits-teacher'}")
    found: collections.Counter = collections.Counter()
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "/distill/" in f.filename or "/diffusers/" in f.filename
                  or "/accelerate/" in f.filename or "/torch/" in f.filename]
        where = " <- ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
                            for f in reversed(frames[-4:]))
        found[where] += 1

    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(load_recipe(RECIPES[method], overrides), tmp)
        t.tc.max_steps = 2 + steps

        def on_step(step: int) -> None:
            if step == 2:
                warnings.simplefilter("always")
                warnings.showwarning = record
                if torch.cuda.is_available():
                    torch.cuda.set_sync_debug_mode("warn")
            if step == 2 + steps:
                if torch.cuda.is_available():
                    torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = shown

        t.fit(on_step=on_step)
    return found


def probe_sampling(steps: int) -> collections.Counter:
    """The same record around ``steps``-step DDIM sampling of the digits teacher, after one warm-up call."""
    from distill.pipelines import load_denoiser
    from distill.samplers import sample_ddim
    from distill.schedules import scale_noise

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    D = load_denoiser(ROOT / "distill/assets/digits-teacher").to(device).eval()
    sigmas = D.schedule.grid(steps, "trailing")
    found: collections.Counter = collections.Counter()
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "/distill/" in f.filename or "/torch/" in f.filename]
        found[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))] += 1

    def call() -> torch.Tensor:
        return sample_ddim(D, scale_noise(torch.randn((256, *D.shape()), device=device), float(sigmas[0])), sigmas)

    call()
    warnings.simplefilter("always")
    warnings.showwarning = record
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
    try:
        for _ in range(3):
            call()
    finally:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = shown
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="teacher,consistency,progressive,adversarial")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sampling", type=int, default=0, help="also probe N-step DDIM sampling (0: no)")
    args = parser.parse_args()
    lines = [f"# Synchronizing calls per training step ({torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
             f"torch {torch.__version__})", "", f"`python evals/gpu/sync_probe.py --methods {args.methods} --steps {args.steps}`: "
             f"calls that made the host wait for the device in {args.steps} recorded steps of each recipe (after 2 "
             "warm-up steps), with the innermost frames of distill, diffusers, accelerate and torch.", ""]
    for m in args.methods.split(","):
        found = probe(m, args.steps)
        lines += [f"## {m}: {sum(found.values())} in {args.steps} steps", ""]
        lines += [f"- {n} x {where}" for where, n in found.most_common()] or ["- none"]
        lines.append("")
    if args.sampling:
        found = probe_sampling(args.sampling)
        lines += [f"## sampling: DDIM, {args.sampling} step(s), batch 256: {sum(found.values())} in 3 calls", ""]
        lines += [f"- {n} x {where}" for where, n in found.most_common()] or ["- none"]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
