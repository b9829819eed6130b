"""Benchmark: images per second of 1-step sampling of the shipped digits teacher, three ways.

    python evals/bench_sampling.py                                  (batches 1 and 256)
    python evals/bench_sampling.py --iters 3 --repeats 1 --out /tmp/bench     (a smoke run)
    python evals/bench_sampling.py --batches 1,64,256 --threads 4 --device cuda

At each batch size B this times

* distill: ``distill.samplers.sample_ddim`` (or ``--sampler consistency``) for one step on the teacher's trailing
  grid, on ``distill.pipelines.load_denoiser(teacher)``, from ``sigma_max * randn`` (the noise draw is timed too);
* pipeline: the stock diffusers pipeline of the teacher exported by ``distill.export.save_pipeline(D, folder,
  sampler="ddim")`` (a ``DDPMPipeline`` with a trailing ``DDIMScheduler``), loaded with
  ``diffusers.DiffusionPipeline.from_pretrained`` and called as ``pipe(batch_size=B, num_inference_steps=1,
  output_type="np")`` (its own noise draw and its conversion to a NumPy array included);
* bare: the network forward alone, ``unet(x, t).sample`` at batch B under ``torch.no_grad()``, on a prepared
  input and timestep.

Each timing block is ``--iters`` calls after ``--warmup`` untimed ones; the three alternate (in a rotating order)
``--repeats`` times and the median is reported, with the ratios distill/bare and pipeline/bare (the goal: distill
>= 0.95x the bare forward at batch 256). CUDA is synchronised at the end of every block. A parity line checks that
the exported pipeline samples what distill's sampler does (``distill.export.parity``).

Writes ``evals/bench_sampling.md`` and ``evals/bench_sampling.json`` (or ``--out DIR``/bench_sampling.{md,json}).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # evals/: the scripts' shared helper
from common import (ROOT, add_device, add_out, add_threads, command, fmt, measured_by, out_dir,  # noqa: E402
                    provenance, resolve_device, set_threads, sync, write_report)

from distill.errors import DistillError  # noqa: E402

TEACHER = ROOT / "distill" / "assets" / "digits-teacher"
GOAL = 0.95  # distill / bare at batch 256
GOAL_BATCH = 256


def build(device: torch.device, sampler: str, folder: Path) -> tuple[dict[str, Callable[[int], Any]], float | None]:
    """The three callables ``fn(batch_size)``, and the parity of the exported pipeline with distill's sampler."""
    from diffusers import DiffusionPipeline, UNet2DModel

    from distill.pipelines import load_denoiser
    from distill.export import parity, save_pipeline
    from distill.samplers import get_sampler
    from distill.schedules import scale_noise

    D = load_denoiser(TEACHER).eval()
    save_pipeline(D, folder, sampler="ddim")
    try:
        check = parity(folder, steps=[1], n=4)[1]  # max |pipeline - distill| over 4 images in [0, 1]
    except DistillError as exc:
        print(f"warning: parity check failed: {exc}", file=sys.stderr)
        check = None
    D = D.to(device)
    sigmas = D.schedule.grid(1, "trailing")  # (sigma_max, 0): the teacher's last timestep, one step
    sigma_max = float(sigmas[0])
    shape = tuple(D.shape())
    fn = get_sampler(sampler)

    def distill_call(b: int) -> torch.Tensor:
        return fn(D, scale_noise(torch.randn((b, *shape), device=device), sigma_max), sigmas)

    pipe = DiffusionPipeline.from_pretrained(folder).to(device)
    pipe.set_progress_bar_config(disable=True)

    def pipeline_call(b: int) -> Any:
        return pipe(batch_size=b, num_inference_steps=1, output_type="np").images

    unet = UNet2DModel.from_pretrained(TEACHER / "unet", use_safetensors=True).to(device).eval()
    t = torch.tensor(int(pipe.scheduler.config.num_train_timesteps) - 1, device=device)  # 999, as 1 trailing step
    inputs: dict[int, torch.Tensor] = {}

    def bare_call(b: int) -> torch.Tensor:
        x = inputs.get(b)
        if x is None:
            x = inputs[b] = torch.randn((b, *shape), device=device)
        with torch.no_grad():
            return unet(x, t).sample

    return {"distill": distill_call, "pipeline": pipeline_call, "bare": bare_call}, check


def time_block(fn: Callable[[int], Any], batch: int, iters: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(batch)
    sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="1-step sampling throughput: distill, stock pipeline, bare forward")
    parser.add_argument("--batches", default="1,256", help="comma-separated batch sizes (default 1,256)")
    parser.add_argument("--iters", type=int, default=50, help="calls per timing block (default 50)")
    parser.add_argument("--repeats", type=int, default=5, help="timing blocks per variant; the median is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant and batch before timing")
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "consistency"), help="distill's sampler")
    add_threads(parser)
    add_device(parser)
    add_out(parser, "bench_sampling.md/.json")
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches: {args.batches!r} is not a comma-separated list of integers")
    if not batches or min(batches) < 1 or args.iters < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("batch sizes, --iters, --repeats and --threads must be >= 1 (--warmup >= 0)")
    device = resolve_device(parser, args.device)
    out = out_dir(args.out)
    set_threads(args.threads)
    cmd = command(__file__, argv)

    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as tmp:
        try:
            fns, check = build(device, args.sampler, Path(tmp) / "pipeline")
        except DistillError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"parity: max |pipeline - distill| over 4 one-step images in [0, 1]: {fmt(check, '.2e')}", flush=True)
        results: list[dict[str, Any]] = []
        for b in batches:
            for name, fn in fns.items():
                for _ in range(args.warmup):
                    fn(b)
            times: dict[str, list[float]] = {k: [] for k in fns}
            names = list(fns)
            for r in range(args.repeats):
                for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order between repeats
                    times[name].append(time_block(fns[name], b, args.iters, device))
                print(f"batch {b}, repeat {r + 1}/{args.repeats}: "
                      + ", ".join(f"{k} {b * args.iters / v[-1]:,.0f} img/s" for k, v in times.items()), flush=True)
            ips = {k: b * args.iters / statistics.median(v) for k, v in times.items()}
            results.append({"batch": b, "images_per_s": ips, "distill_over_bare": ips["distill"] / ips["bare"],
                            "pipeline_over_bare": ips["pipeline"] / ips["bare"], "block_s": times})

    info = {**provenance(cmd, device=device, packages=("torch", "diffusers")), "threads": args.threads,
            "iters": args.iters, "repeats": args.repeats, "warmup": args.warmup, "sampler": args.sampler,
            "parity_max_abs_diff": check, "goal": {"batch": GOAL_BATCH, "distill_over_bare_min": GOAL},
            "rows": results}
    lines = [
        "# Speed: 1-step sampling of the digits teacher",
        "",
        measured_by(info, ("torch", "diffusers")),
        "",
        f"Images per second, the median of {args.repeats} block(s) of {args.iters} calls each after {args.warmup} "
        f"warm-up calls. distill: `sample_{args.sampler}` one step on `load_denoiser(teacher)`, noise draw "
        "included; pipeline: the exported folder's stock `DDPMPipeline` (trailing `DDIMScheduler`), "
        "`pipe(batch_size=B, num_inference_steps=1, output_type=\"np\")`; bare: `unet(x, t).sample` under "
        "`torch.no_grad()` on a prepared input.",
        "",
        "| batch | distill img/s | pipeline img/s | bare forward img/s | distill/bare | pipeline/bare |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ips = r["images_per_s"]
        lines.append(f"| {r['batch']} | {fmt(ips['distill'], ',.0f')} | {fmt(ips['pipeline'], ',.0f')} | "
                     f"{fmt(ips['bare'], ',.0f')} | "
                     f"{r['distill_over_bare']:.2f} | {r['pipeline_over_bare']:.2f} |")
    at = next((r for r in results if r["batch"] == GOAL_BATCH), None)
    if at is not None:
        ok = at["distill_over_bare"] >= GOAL
        lines += ["", f"Goal: distill >= {GOAL:.2f}x the bare forward at batch {GOAL_BATCH}: "
                  f"{'met' if ok else 'not met'} ({at['distill_over_bare']:.2f})."]
    lines += ["", f"Parity: the exported pipeline and distill's sampler differ by at most {fmt(check, '.1e')} "
              "(4 one-step images in [0, 1], same noise; `distill.export.parity`)."]
    text = "\n".join(lines) + "\n"
    md, js = write_report(out, "bench_sampling", text, info)
    print()
    print(text)
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
