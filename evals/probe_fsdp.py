"""Probe: does PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) train a diffusers UNet on CPU processes
(gloo), and does it match one process? The evidence that led to the trainer's ``trainer.fsdp`` (tests/test_fsdp.py
tests the trainer itself).

    torchrun --nproc_per_node 2 evals/probe_fsdp.py            (writes evals/probe_fsdp.md from rank 0)
    torchrun --nproc_per_node 2 evals/probe_fsdp.py --out /tmp/probe

A small ``UNet2DModel`` (the digits shape, 2 blocks) is trained for 3 AdamW steps on a global batch of 16 twice:
in one process on the whole batch (the reference, computed on every rank), and with every block and the root
wrapped by ``fully_shard`` (parameters become ``DTensor`` shards; each rank takes half of the batch). A frozen
copy, sharded the same way, makes part of the target under ``no_grad`` (a teacher). The report gives the
losses of both, the largest difference of the first step's gradients and of the weights after 3 steps, the
parameter placement, and the step time of FSDP2 against DDP on the same work.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # evals/: the scripts' shared helper
from common import add_out, measured_by, out_dir, provenance, write_report  # noqa: E402

STEPS = 3


def unet() -> nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)


def batch(step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.randn(n, 1, 8, 8, generator=g)


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def train(mode: str, rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, teacher = unet(), unet().requires_grad_(False).eval()
    with torch.no_grad():  # a teacher that differs from the student's start
        for p in teacher.parameters():
            p.mul_(0.9)
    if mode == "fsdp":
        for net in (model, teacher):
            for block in [*net.down_blocks, net.mid_block, *net.up_blocks]:
                fully_shard(block)
            fully_shard(net)
    net = DDP(model) if mode == "ddp" else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, grad0, t0 = [], None, time.perf_counter()
    for s in range(STEPS):
        x, t, noise = batch(s)
        if mode != "single":
            n = len(x) // world
            x, t, noise = (v[rank * n:(rank + 1) * n] for v in (x, t, noise))
        with torch.no_grad():
            target = noise + teacher(x, t).sample
        loss = nn.functional.mse_loss(net(x, t).sample, target)
        loss.backward()
        if s == 0:
            grad0 = [full(p.grad).clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        reduced = loss.detach().clone()
        if mode != "single":
            dist.all_reduce(reduced, op=dist.ReduceOp.AVG)
        losses.append(float(reduced))
    first = next(model.parameters())
    return {"losses": losses, "grad0": grad0, "params": [full(p).detach().clone() for p in model.parameters()],
            "s_per_step": (time.perf_counter() - t0) / STEPS, "placement": f"{type(first).__name__} "
            f"{getattr(first, 'placements', '')} local {tuple(getattr(first, 'to_local', lambda: first)().shape)}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_out(parser, "probe_fsdp.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = train("single", rank, world)
    fsdp = train("fsdp", rank, world)
    fsdp = train("fsdp", rank, world)  # timed warm (the first run pays for sharding set-up)
    ddp = train("ddp", rank, world)
    if rank == 0:
        gdiff = max(float((a - b).abs().max()) for a, b in zip(fsdp["grad0"], ref["grad0"]))
        pdiff = max(float((a - b).abs().max()) for a, b in zip(fsdp["params"], ref["params"]))
        lines = ["# Probe: FSDP2 on CPU processes (gloo)", "",
                 measured_by(provenance(f"torchrun --nproc_per_node {world} evals/probe_fsdp.py", git=False),
                             ("torch",)), "",
                 f"A digits-shaped UNet2DModel, {STEPS} AdamW steps on a global batch of 16 (a frozen, sharded "
                 "teacher makes part of the target), in 1 process and sharded with `fully_shard` over "
                 f"{world} gloo processes.", "",
                 "| | value |", "|---|---|",
                 f"| FSDP2 runs on gloo | yes: parameters are {fsdp['placement']} |",
                 f"| losses, 1 process | {', '.join(f'{v:.6f}' for v in ref['losses'])} |",
                 f"| losses, FSDP2 | {', '.join(f'{v:.6f}' for v in fsdp['losses'])} |",
                 f"| largest gradient difference, step 1 | {gdiff:.2e} |",
                 f"| largest weight difference after {STEPS} steps | {pdiff:.2e} (Adam divides round-off in "
                 "near-zero gradients by their tiny second moment; see docs/recipes-and-trainer.md) |",
                 f"| step time, FSDP2 / DDP | {1e3 * fsdp['s_per_step']:.0f} ms / {1e3 * ddp['s_per_step']:.0f} ms |",
                 ""]
        write_report(out_dir(args.out), "probe_fsdp", "\n".join(lines))
        print("\n".join(lines))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
