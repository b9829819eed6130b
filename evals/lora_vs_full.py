"""Benchmark: a LoRA student against a full student of the same recipe, budget and data, on the SD-shaped teacher.

    python evals/lora_vs_full.py                        (300 steps each, the text quickstart's consistency budget)
    python evals/lora_vs_full.py --iters 20 --samples 140 --out /tmp/lvf       (a smoke run)

Both run ``recipes/text-digits/consistency-sd.yaml`` (LCM) at a fixed guidance scale (``guidance.range=null``; a
``w``-conditioned LoRA student would need its guidance embedding beside the adapters, which a LoRA file applied to
the teacher cannot carry), each in its own ``distill run`` process, one after the other:

* full: every weight of a copy of the teacher trained (the recipe's learning rate);
* LoRA: ``student.lora.rank`` adapters on the teacher's attention and projection layers, the base shared with the
  teacher (``--lora-lr``; adapters start at zero and want a larger step).

Per student: trainable parameters (the tensors of the checkpoint's ``modules/student.safetensors``), the process's
peak resident memory while training (``ru_maxrss`` of the ``distill run`` child alone, from ``os.wait4``; the
scoring runs afterwards in its own ``distill eval`` process), the final checkpoint's size on disk,
the training wall time, and FD-text-digits with prompt accuracy at 1, 2 and 4 steps (protocol ``text-digits``;
``--samples`` per point). Writes ``evals/lora_vs_full.md`` and ``evals/lora_vs_full.json`` (or ``--out DIR``); the
runs go to ``runs/lora-vs-full/`` (or ``DIR/runs``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # evals/: the scripts' shared helper
from common import ROOT, add_out, add_threads, command, out_dir, provenance, set_threads, write_report  # noqa: E402

RECIPE = "recipes/text-digits/consistency-sd.yaml"


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _numel(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def run_one(name: str, overrides: list[str], runs: Path, threads: int, samples: int | None) -> dict[str, Any]:
    out = runs / name
    cmd = [sys.executable, "-m", "distill.cli", "run", RECIPE, "--out", str(out), "--fresh",
           f"trainer.threads={threads}", "trainer.progress=false", *overrides]
    print(" ".join(cmd[2:]), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name}: distill run failed (exit {os.waitstatus_to_exitcode(status)})")
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    scored = out / "eval.jsonl"
    scored.unlink(missing_ok=True)
    ev = [sys.executable, "-m", "distill.cli", "eval", str(out / "model"), "--protocol", "text-digits", "--steps",
          "1,2,4", "--out", str(scored), "--no-grids", "--name", name]
    if samples:
        ev += ["--samples", str(samples)]
    if subprocess.run(ev, env=env, cwd=ROOT).returncode != 0:
        raise SystemExit(f"{name}: distill eval failed")
    rows = [json.loads(line) for line in scored.read_text().splitlines() if line.strip()]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_s = [m for m in metrics if "steps_per_s" in m]
    return {
        "name": name,
        "trainable_params": _numel(ckpt / "modules" / "student.safetensors"),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "checkpoint_mib": round(_size(ckpt) / 2**20, 2),
        "wall_s": round(wall, 1),
        "steps_per_s": round(train_s[-1]["steps_per_s"], 3) if train_s else None,
        "points": {str(r["steps"]): {"fd": r["value"], "ci": r.get("value_ci"), "accuracy": r.get("accuracy")}
                   for r in rows if r["method"] != "data-floor"},
        "floor": next((r["value"] for r in rows if r["method"] == "data-floor"), None),
    }


def markdown(res: list[dict[str, Any]], args: argparse.Namespace, machine: str, command: str) -> str:
    full, lora = res
    steps = sorted(full["points"], key=int)
    lines = ["# LoRA against full students", "",
             f"LCM (`{RECIPE}`, guidance fixed at w = {args.guidance}) on the SD-shaped text-digits teacher, "
             f"{args.iters} steps at batch 64 each; full student at lr {args.full_lr}, LoRA rank {args.rank} at lr "
             f"{args.lora_lr}. FD-text-digits [95% bootstrap] and prompt accuracy on protocol `text-digits` (n = "
             f"{args.samples or 1400}; data floor {full['floor']:.2f}).", "",
             "| | trainable parameters | their gradients + AdamW moments | peak RSS | final checkpoint | training wall time | "
             + " | ".join(f"{k} step{'s' if k != '1' else ''}" for k in steps) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---|" * len(steps)]
    for r in res:
        cells = []
        for k in steps:
            p = r["points"][k]
            ci = f" [{p['ci'][0]:.1f}, {p['ci'][1]:.1f}]" if p.get("ci") else ""
            acc = f" · {100 * p['accuracy']:.1f}%" if p.get("accuracy") is not None else ""
            cells.append(f"{p['fd']:.2f}{ci}{acc}")
        label = "full" if r["name"] == "full" else f"LoRA rank {args.rank}"
        state = 3 * 4 * r["trainable_params"] / 2**20  # fp32 gradient, exp_avg, exp_avg_sq per trainable weight
        lines.append(f"| {label} | {r['trainable_params']:,} | {state:.1f} MiB | {r['peak_rss_mib']:,.0f} MiB | "
                     f"{r['checkpoint_mib']:.1f} MiB | {r['wall_s']:.0f} s | " + " | ".join(cells) + " |")
    ratio = ", ".join(f"{k}: {lora['points'][k]['fd'] / full['points'][k]['fd']:.2f}x" for k in steps)
    lines += ["", f"LoRA FD over full FD at each step count: {ratio} (the target is at most 1.2x). LoRA trains "
              f"{lora['trainable_params'] / full['trainable_params']:.1%} of the full student's parameters; its "
              f"checkpoint is {lora['checkpoint_mib'] / full['checkpoint_mib']:.1%} of the full one's. Peak RSS is the "
              "whole training process (torch, the data, the VAE and text encoder, the teacher): on a teacher of a "
              "few million parameters the training state that LoRA saves is a small part of it.", "",
              f"Measured on {machine}: `{command}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--full-lr", type=float, default=2e-4)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--samples", type=int, default=None, help="samples per point (default: the protocol's 1400)")
    add_threads(parser)
    add_out(parser, "lora_vs_full.{md,json}, and the runs in DIR/runs")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    out = out_dir(args.out)
    runs = out / "runs" if args.out else ROOT / "runs" / "lora-vs-full"
    common = [f"method.iters={args.iters}", "guidance.range=null", f"guidance.scale={args.guidance}",
              "eval.protocol=null", "trainer.checkpoint_every=0"]
    res = [run_one("full", [*common, f"method.optimizer.lr={args.full_lr}"], runs, args.threads,
                   args.samples),
           run_one("lora", [*common, f"student.lora.rank={args.rank}",
                                               f"method.optimizer.lr={args.lora_lr}"], runs, args.threads,
                   args.samples)]
    info = provenance(command(__file__, argv), packages=(), git=False)
    write_report(out, "lora_vs_full", markdown(res, args, info["machine"], info["command"]),
                 {**info, "results": res})
    print((out / "lora_vs_full.md").read_text())


if __name__ == "__main__":
    main()
