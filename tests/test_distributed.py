"""Several processes: 2 CPU processes (gloo) train like 1 at the same global batch, and resume across world sizes.

The adversarial recipe is the hardest case the trainer has: two roles with their own optimizers, the student's loss
running through the discriminator heads (both wrapped for several processes), an EMA, and four random draws per
step. Each launch starts real processes (torchrun, accelerate launch), so these tests take a few seconds each.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "digits" / "adversarial.yaml"
BIN = Path(sys.executable).parent
MODULES = ("student", "disc", "student_ema")


def _overrides(teacher) -> list[str]:
    # Adam's eps at 1e-6: an attention key bias has an exactly-zero gradient in exact arithmetic, and with eps 1e-8
    # Adam scales the float round-off in it (which differs between 1 and 2 processes) up to lr-sized steps.
    return [f"teacher={teacher}", "trainer.progress=false", "eval.protocol=null", "trainer.threads=1",
            "method.student_optimizer.warmup_steps=0", "method.student_optimizer.lr=3e-4",
            "method.student_optimizer.eps=1e-6", "method.disc_optimizer.eps=1e-6", "method.head_channels=8",
            "method.iters=4", "method.ema_decay=0.5", "method.r1_every=1", "trainer.checkpoint_every=2",
            "trainer.grad_accum=2"]  # micro-batches of 4 per rank (2 processes) or 8 (1): the layout is global


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(launcher: list[str], out: Path, teacher, batch: int) -> subprocess.CompletedProcess:
    cmd = [*launcher, "-m", "distill.cli", "run", str(RECIPE), "--out", str(out), *_overrides(teacher),
           f"trainer.batch_size={batch}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)


def _weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    last = list_checkpoints(out / "checkpoints")[-1]
    return {m: load_file(str(last / "modules" / f"{m}.safetensors")) for m in MODULES}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[m][k] - b[m][k]).abs().max().item() for m in MODULES for k in a[m])


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_across_world_sizes(tmp_path, tiny_teacher):
    one = tmp_path / "one"
    r = _run([sys.executable], one, tiny_teacher, batch=16)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = _weights(one)

    # 2 processes x batch 8 (gloo, torchrun) == 1 process x batch 16, within 1e-5 after 4 steps, with 2
    # micro-batches per step each
    two = tmp_path / "two"
    r = _run([*TORCHRUN, "--master_port", _port()], two, tiny_teacher, batch=8)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done:") == 1  # rank 0 alone reports
    got = _weights(two)
    assert _max_diff(ref, got) < 1e-5
    # a run made by 2 processes exports from 1 (no global-batch check when nothing is trained)
    from distill import cli

    assert cli.main(["export", str(two), "--out", str(tmp_path / "two-export"), "--no-check"]) == 0
    assert (tmp_path / "two-export" / "distill.json").is_file()
    # ...and the runs did train: 4 steps moved the student 50x beyond that tolerance
    start = load_file(str(list_checkpoints(one / "checkpoints")[0] / "modules" / "student.safetensors"))
    teacher = load_file(str(Path(tiny_teacher) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max((ref["student"][f"inner.net.{k}"] - v).abs().max().item() for k, v in teacher.items()) > 5e-4
    assert any(not torch.equal(start[k], ref["student"][k]) for k in start)

    # a 1-process checkpoint resumed by 2 processes (accelerate launch) at the same global batch: same end
    moved = tmp_path / "moved"
    (moved / "checkpoints").mkdir(parents=True)
    first = list_checkpoints(one / "checkpoints")[0]
    assert first.name == "step-00000002"
    shutil.copytree(first, moved / "checkpoints" / first.name)
    launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _port()]
    r = _run(launch, moved, tiny_teacher, batch=8)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout
    assert _max_diff(ref, _weights(moved)) < 1e-5

    # another global batch is refused, naming the setting that would make it exact; the checkpoint stays
    refused = tmp_path / "refused"
    (refused / "checkpoints").mkdir(parents=True)
    shutil.copytree(first, refused / "checkpoints" / first.name)
    r = _run([sys.executable], refused, tiny_teacher, batch=8)
    assert r.returncode == 2
    assert "global batch of 16" in r.stderr and "trainer.batch_size=16" in r.stderr
    assert [c.name for c in list_checkpoints(refused / "checkpoints")] == ["step-00000002"]


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tmp_path):
    """`distill eval` under torchrun: each process samples half the samples and the features are gathered; the FD
    of each point equals one process's to 1e-6 relative, and only the first process writes rows and grids."""
    import json

    teacher = ROOT / "distill" / "assets" / "digits-teacher"
    args = ["-m", "distill.cli", "eval", str(teacher), "--steps", "1,4", "--sampler", "ddim", "--samples", "301"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "DISTILL_CACHE": str(tmp_path / "cache")}
    values = {}
    for name, launcher in (("one", [sys.executable]), ("two", [*TORCHRUN, "--master_port", _port()])):
        out = tmp_path / f"{name}.jsonl"
        done = subprocess.run([*launcher, *args, "--out", str(out)], env=env, capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 3 and rows[-1]["processes"] == (1 if name == "one" else 2)
        values[name] = [r["value"] for r in rows]
    for a, b in zip(values["one"], values["two"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(a), (a, b)


@pytest.mark.slow
def test_two_processes_evaluate_their_students_together(tmp_path, tiny_teacher):
    """A run on 2 processes evaluates its exported student on both (each its share), and writes the rows once."""
    import json

    recipe = ROOT / "recipes" / "digits" / "consistency.yaml"
    cmd = [*TORCHRUN, "--master_port", _port(), "-m", "distill.cli", "run", str(recipe), "--out", str(tmp_path / "run"),
           f"teacher={tiny_teacher}", "trainer.progress=false", "trainer.threads=1", "method.iters=2",
           "method.num_steps=10", "method.sample_steps=[1, 2]", "trainer.batch_size=8", "eval.n=100",
           "eval.steps=[1, 2]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "DISTILL_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in rows] == [None, 1, 2] and all(r["processes"] == 2 for r in rows[1:])
