"""Benchmark: where a training step of the digits teacher's UNet spends its time on this CPU, and what changes it.

    python evals/bench_step.py                                (threads 1 and 2, every variant)
    python evals/bench_step.py --threads 2 --variants fp32,channels_last --steps 5 --out /tmp/bench   (a smoke run)

One step is what ``distill teacher`` does per optimizer step on the digits recipe, written bare: a forward of the
shipped digits ``UNet2DModel`` at batch 128 on 8x8 inputs, an MSE loss, the backward and an AdamW update. Each
variant is timed as the median over ``--repeats`` blocks of ``--steps`` steps after ``--warmup`` untimed ones:

* ``fp32``: the plain step (the trainer's default);
* ``channels_last``: the network and its input in ``torch.channels_last`` memory format (oneDNN's preferred
  layout for convolutions);
* ``bf16``: the forward under ``torch.autocast("cpu", torch.bfloat16)``, attention included;
* ``bf16-attn32``: the same with attention over short sequences in fp32 (``distill.precision``), which is how the
  trainer runs ``trainer.mixed_precision: bf16`` on a CPU;
* ``compile``: ``torch.compile(unet)`` with the inductor backend (``trainer.compile: inductor``), its compile time
  reported apart and outside the timed blocks.

With ``--omp`` it also times the OpenMP wait policy: the ``fp32`` step at 2 threads in two processes at once (two
jobs on one machine, or the 2 ranks of a gloo run) and in one process alone, with ``OMP_WAIT_POLICY`` unset (GNU
OpenMP's default: idle threads spin for a while after each parallel region, then sleep), ``ACTIVE`` (they keep
spinning) and ``PASSIVE`` (they sleep at once; what the ``distill`` command and the Makefile set by default).

With ``--attention`` it also times attention alone (``F.scaled_dot_product_attention``, forward and backward) in
fp32 and bf16 at a few sequence lengths, from the digits UNet's 16 tokens up: torch's bf16 kernel is much slower
than its fp32 one on short sequences on a CPU, which is why ``bf16-attn32`` exists.

For the ``fp32`` step at the largest thread count it also writes the ten most expensive operators (self CPU time,
from ``torch.profiler``). The CPU's flags that decide which kernels run (AVX-512, AMX, AVX512-BF16) and torch's
oneDNN / MKL build settings are printed with the table, because the same step differs severalfold between CPUs.
Run under ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` it shows the same step on a CPU without AVX-512
(and so without native bf16), as ``evals/bench_step_avx2/`` does.

Writes ``evals/bench_step.md`` and ``evals/bench_step.json`` (or ``--out DIR``/bench_step.{md,json}).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # evals/: the scripts' shared helper
from common import (ROOT, add_out, command, cpu_flags, measured_by, out_dir, provenance,  # noqa: E402
                    write_report)

from distill.precision import ShortAttentionFP32  # noqa: E402

TEACHER = ROOT / "distill" / "assets" / "digits-teacher"
VARIANTS = ("fp32", "channels_last", "bf16", "bf16-attn32", "compile")


def make_step(variant: str) -> tuple[Callable[[], torch.Tensor], float]:
    """A closure doing one training step, and the seconds spent building it (compile time for ``compile``)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel.from_pretrained(TEACHER / "unet", use_safetensors=True).train()
    size = unet.config.sample_size
    x = torch.randn(128, unet.config.in_channels, size, size)
    t = torch.randint(0, 1000, (128,))
    target = torch.randn_like(x)
    if variant == "channels_last":
        unet = unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        target = target.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    net: Callable[..., Any] = unet
    t0 = time.perf_counter()
    if variant == "compile":
        net = torch.compile(unet, backend="inductor")

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        if variant == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(x, t).sample
        elif variant == "bf16-attn32":
            with torch.autocast("cpu", dtype=torch.bfloat16), ShortAttentionFP32():
                out = net(x, t).sample
        else:
            out = net(x, t).sample
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        return loss.detach()

    if variant == "compile":
        step()  # the compile happens here
    return step, time.perf_counter() - t0


def time_variant(variant: str, threads: int, steps: int, repeats: int, warmup: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    try:
        step, build_s = make_step(variant)
    except Exception as exc:  # a backend that does not work here (no compiler for inductor): say so in the table
        return {"variant": variant, "threads": threads, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - t0) / steps)
    med = statistics.median(times)
    return {"variant": variant, "threads": threads, "s_per_step": med, "steps_per_s": 1 / med,
            "spread": [min(times), max(times)], "build_s": build_s if variant == "compile" else None}


ATTENTION_SHAPES = ((128, 2, 16, 32), (128, 2, 64, 32), (32, 4, 256, 64), (8, 8, 1024, 64))  # (B, heads, L, d)


def time_attention(threads: int, repeats: int = 5) -> list[dict[str, Any]]:
    """Attention's forward and backward, ms per call (median of ``repeats``), fp32 against bf16 inputs."""
    torch.set_num_threads(threads)
    rows = []
    for shape in ATTENTION_SHAPES:
        row: dict[str, Any] = {"shape": list(shape), "threads": threads}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(*shape, generator=gen).to(dtype).requires_grad_(True) for _ in range(3))

            def call() -> None:
                torch.nn.functional.scaled_dot_product_attention(q, k, v).float().sum().backward()

            for _ in range(2):
                call()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            row[f"{name}_ms"] = 1e3 * statistics.median(times)
        rows.append(row)
    return rows


def top_ops(threads: int, n: int = 10) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    step, _ = make_step("fp32")
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / 3,
             "share": e.self_cpu_time_total / total} for e in events[:n]]


def worker(threads: int, steps: int, repeats: int, warmup: int) -> None:
    """``--worker``: time the fp32 step and print steps/s as JSON (run in a subprocess by :func:`omp_policy`)."""
    print(json.dumps(time_variant("fp32", threads, steps, repeats, warmup)))


def omp_policy(steps: int, repeats: int) -> list[dict[str, Any]]:
    """The fp32 step at 2 threads under each OpenMP wait policy, in 1 process alone and in 2 at once."""
    import subprocess

    rows = []
    for policy in ("unset", "ACTIVE", "PASSIVE"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy != "unset":
            env["OMP_WAIT_POLICY"] = policy
        cmd = [sys.executable, __file__, "--worker", "--threads", "2", "--steps", str(steps), "--repeats", str(repeats)]
        for procs in (1, 2):
            print(f"timing OMP_WAIT_POLICY={policy} with {procs} process(es)...", file=sys.stderr, flush=True)
            running = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
            rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["steps_per_s"] for p in running]
            rows.append({"policy": policy, "processes": procs, "steps_per_s": rates})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the digits UNet's training step on this CPU, per variant")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported (default 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--omp", action="store_true", help="also time OMP_WAIT_POLICY ACTIVE against PASSIVE")
    parser.add_argument("--attention", action="store_true", help="also time attention alone, fp32 against bf16")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    add_out(parser, "bench_step.{md,json}")
    args = parser.parse_args(argv)
    if args.worker:
        worker(int(args.threads.split(",")[0]), args.steps, args.repeats, args.warmup)
        return 0
    threads = [int(t) for t in args.threads.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        parser.error(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    rows = []
    for th in threads:
        for v in variants:
            print(f"timing {v} at {th} thread(s)...", file=sys.stderr, flush=True)
            rows.append(time_variant(v, th, args.steps, args.repeats, args.warmup))
    omp = omp_policy(args.steps, args.repeats) if args.omp else []
    attention = time_attention(max(threads)) if args.attention else []
    ops = top_ops(max(threads))
    torch.set_num_threads(max(threads))
    info = provenance(command(__file__, argv), packages=("torch",), git=False)
    config = torch.__config__.show()
    build = [ln.strip(" -") for ln in config.splitlines()
             if any(k in ln for k in ("MKL-DNN", "oneDNN", "OpenMP", "CPU capab")) and "Build settings" not in ln]
    isa = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    lines = ["# Speed: the digits UNet's training step on this CPU", "",
             measured_by(info, ("torch",)), "",
             f"CPU flags: {cpu_flags()}. torch build: {'; '.join(build)}. "
             f"CPU capability used: {torch.backends.cpu.get_cpu_capability()}"
             + (f", held down by {', '.join(f'{k}={v}' for k, v in isa.items())}" if isa else "") + ".", "",
             "One step = forward of the shipped digits UNet2DModel at batch 128 (8x8), MSE, backward, AdamW. Median "
             f"of {args.repeats} blocks of {args.steps} steps after {args.warmup} warm-up steps.", "",
             "| variant | threads | steps/s | s/step | against fp32 at the same threads | spread (s/step) |",
             "|---|---:|---:|---:|---:|---|"]
    base = {r["threads"]: r.get("s_per_step") for r in rows if r["variant"] == "fp32"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['threads']} | — | — | — | failed: {r['error']} |")
            continue
        rel = f"{base[r['threads']] / r['s_per_step']:.2f}x" if base.get(r["threads"]) else "—"
        extra = f" (compile {r['build_s']:.0f} s)" if r.get("build_s") else ""
        lines.append(f"| {r['variant']}{extra} | {r['threads']} | {r['steps_per_s']:.2f} | {r['s_per_step']:.3f} | "
                     f"{rel} | {r['spread'][0]:.3f}-{r['spread'][1]:.3f} |")
    if omp:
        lines += ["", "The OpenMP wait policy: the fp32 step at 2 threads per process, each process's steps/s "
                  "(two processes run at once on the same cores):", "",
                  "| OMP_WAIT_POLICY | processes | steps/s of each |", "|---|---:|---|"]
        lines += [f"| {r['policy']} | {r['processes']} | {', '.join(f'{v:.2f}' for v in r['steps_per_s'])} |"
                  for r in omp]
    if attention:
        lines += ["", f"Attention alone (`F.scaled_dot_product_attention`, forward and backward, torch's default CPU "
                  f"kernel) at {max(threads)} thread(s), ms per call:", "",
                  "| batch, heads, tokens, head dim | fp32 | bf16 | bf16 against fp32 |", "|---|---:|---:|---:|"]
        lines += [f"| {', '.join(map(str, r['shape']))} | {r['fp32_ms']:.2f} | {r['bf16_ms']:.2f} | "
                  f"{r['bf16_ms'] / r['fp32_ms']:.2f}x |" for r in attention]
    lines += ["", f"Where the fp32 step spends its time at {max(threads)} thread(s) (torch.profiler, self CPU time):", "",
              "| operator | ms per step | share |", "|---|---:|---:|"]
    lines += [f"| `{o['op']}` | {o['self_ms_per_step']:.1f} | {100 * o['share']:.1f}% |" for o in ops]
    write_report(out_dir(args.out), "bench_step", "\n".join(lines) + "\n",
                 {"command": info["command"], "machine": info["machine"], "rows": rows, "top_ops": ops, "omp": omp,
                  "attention": attention, "cpu_flags": cpu_flags()})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
