"""trainer.fsdp: every network sharded over 2 CPU processes (FSDP2 on gloo) trains like 1 process at the same
global batch, writes whole-tensor checkpoints that resume across sharded and unsharded runs, and exports a stock
pipeline.

The adversarial recipe is the case with the most parts: two roles, the student's loss through the discriminator
heads, a teacher-feature backbone that runs the sharded teacher network without its wrapper, and an EMA of a
sharded student. Progressive distillation copies its student at every phase (a milestone, gathered whole).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import TORCHRUN, _port

from distill.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _run(launcher: list[str], recipe: str, out: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = [*launcher, "-m", "distill.cli", "run", str(ROOT / "recipes" / "digits" / recipe), "--out", str(out),
           "trainer.progress=false", "eval.protocol=null", "trainer.threads=1", *overrides]
    return subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True, cwd=ROOT, timeout=300)


def _one_and_sharded(tmp_path: Path, recipe: str, over: list[str], batch: int) -> tuple[Path, Path, str]:
    """The recipe on 1 process at ``batch`` and sharded over 2 at half of it (the same global batch): both run
    folders, and the sharded run's stdout."""
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    r = _run([sys.executable], recipe, one, [*over, f"trainer.batch_size={batch}"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run([*TORCHRUN, "--master_port", _port()], recipe, fsdp,
             [*over, f"trainer.batch_size={batch // 2}", "trainer.fsdp=true"])
    assert r.returncode == 0, r.stderr[-3000:]
    return one, fsdp, r.stdout


def _last(out: Path, modules: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    last = list_checkpoints(out / "checkpoints")[-1]
    return {m: load_file(str(last / "modules" / f"{m}.safetensors")) for m in modules}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[m][k] - b[m][k]).abs().max().item() for m in a for k in a[m])


ADVERSARIAL = ("student", "disc", "student_ema")


def _adversarial(teacher) -> list[str]:
    # Adam's eps at 1e-6, as in test_distributed: round-off in exactly-zero gradients must not become lr-sized steps
    # (no R1 penalty: it differentiates through the backbone twice, which FSDP2 cannot; refused, tested below)
    return [f"teacher={teacher}", "method.student_optimizer.warmup_steps=0", "method.student_optimizer.lr=3e-4",
            "method.student_optimizer.eps=1e-6", "method.disc_optimizer.eps=1e-6", "method.head_channels=8",
            "method.iters=4", "method.ema_decay=0.5", "method.r1_weight=0", "trainer.checkpoint_every=2",
            "trainer.grad_accum=2"]


@pytest.mark.slow
def test_sharded_training_matches_one_process_and_resumes_across_layouts(tmp_path, tiny_teacher):
    # 2 processes, every network sharded (the teacher too), batch 8 each: the same 4 steps as 1 process at 16
    one, fsdp, stdout = _one_and_sharded(tmp_path, "adversarial.yaml", _adversarial(tiny_teacher), 16)
    ref = _last(one, ADVERSARIAL)
    said = next(line for line in stdout.splitlines() if line.startswith("fsdp:"))
    assert all(n in said for n in ("student", "teacher", "disc", "student_ema")), said
    local, whole = (float(v) for v in re.findall(r"([0-9.]+) MiB", said))
    assert local < 0.6 * whole  # each process holds about half of every network
    got = _last(fsdp, ADVERSARIAL)
    assert set(got["student"]) == set(ref["student"])  # whole tensors under the unsharded names
    assert all(got[m][k].shape == ref[m][k].shape for m in ADVERSARIAL for k in ref[m])
    assert _max_diff(ref, got) < 1e-5
    # ...and it trained: 4 steps moved the student far beyond that tolerance
    start = load_file(str(list_checkpoints(one / "checkpoints")[0] / "modules" / "student.safetensors"))
    assert max((start[k] - ref["student"][k]).abs().max().item() for k in start) > 1e-4
    # the export is an ordinary pipeline folder with whole weights, equal to the unsharded run's
    a = load_file(str(one / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(fsdp / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(a) == set(b) and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    # a sharded run stopped at step 2 and resumed sharded ends bitwise where the uninterrupted one did
    again = tmp_path / "again"
    (again / "checkpoints").mkdir(parents=True)
    mid = list_checkpoints(fsdp / "checkpoints")[0]
    assert mid.name == "step-00000002"
    shutil.copytree(mid, again / "checkpoints" / mid.name)
    r = _run([*TORCHRUN, "--master_port", _port()], "adversarial.yaml", again,
             [*_adversarial(tiny_teacher), "trainer.batch_size=8", "trainer.fsdp=true"])
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _last(again, ADVERSARIAL)
    assert all(torch.equal(resumed[m][k], got[m][k]) for m in ADVERSARIAL for k in got[m])

    # an unsharded 1-process checkpoint resumed by 2 sharded processes ends where the 1-process run ended
    moved = tmp_path / "moved"
    (moved / "checkpoints").mkdir(parents=True)
    first = list_checkpoints(one / "checkpoints")[0]
    shutil.copytree(first, moved / "checkpoints" / first.name)
    r = _run([*TORCHRUN, "--master_port", _port()], "adversarial.yaml", moved,
             [*_adversarial(tiny_teacher), "trainer.batch_size=8", "trainer.fsdp=true"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout
    assert _max_diff(ref, _last(moved, ADVERSARIAL)) < 1e-5

    # ...and a sharded checkpoint resumed by one unsharded process, too
    back = tmp_path / "back"
    (back / "checkpoints").mkdir(parents=True)
    shutil.copytree(mid, back / "checkpoints" / mid.name)
    r = _run([sys.executable], "adversarial.yaml", back, [*_adversarial(tiny_teacher), "trainer.batch_size=16"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert _max_diff(ref, _last(back, ADVERSARIAL)) < 1e-5

    # the R1 penalty on a sharded backbone is refused with the setting to change, not a storage error
    r = _run([*TORCHRUN, "--master_port", _port()], "adversarial.yaml", tmp_path / "r1",
             [*_adversarial(tiny_teacher), "trainer.batch_size=8", "trainer.fsdp=true", "method.r1_weight=0.001"])
    assert r.returncode != 0 and "method.r1_weight=0" in r.stderr


@pytest.mark.slow
def test_sharded_progressive_exports_every_phase(tmp_path, tiny_teacher):
    """Progressive distillation loads each phase's student into its teacher and exports a milestone per phase:
    both go through sharded networks, and the milestones come out whole, equal to one process's."""
    over = [f"teacher={tiny_teacher}", "method.start_steps=4", "method.iters_per_phase=[2, 2]",
            "method.optimizer.warmup_steps=0", "method.optimizer.eps=1e-6", "method.ema_decay=0.5"]
    one, fsdp, _ = _one_and_sharded(tmp_path, "progressive.yaml", over, 16)
    for folder in ("students/2-step", "model"):
        a = load_file(str(one / folder / "unet" / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(fsdp / folder / "unet" / "diffusion_pytorch_model.safetensors"))
        assert set(a) == set(b) and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, folder
        assert json.loads((fsdp / folder / "distill.json").read_text())["steps"]


def test_fsdp_refuses_lora_students_and_warns_on_one_process(tmp_path, tiny_teacher):
    from distill.recipe import load_recipe
    from distill.errors import DistillError
    from distill.trainer import Trainer

    cfg = load_recipe(ROOT / "recipes" / "digits" / "consistency.yaml",
                      [f"teacher={tiny_teacher}", "trainer.fsdp=true", "trainer.progress=false", "eval.protocol=null",
                       "trainer.threads=1", "trainer.batch_size=4", "student.lora.rank=2"])
    with pytest.warns(UserWarning, match="nothing to shard across"):
        trainer = Trainer(cfg, tmp_path / "run")
    assert not trainer.sharded
    # on several processes a LoRA student is refused, naming the setting to change
    trainer.world = 2
    with pytest.raises(DistillError, match="trainer.fsdp: false"):
        trainer._shard()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_sharded_text_teacher_with_guidance_matches_one_process(tmp_path, tiny_pipelines, caption_data, kind):
    """A text teacher under classifier-free guidance (the guided wrapper, a text-conditioned UNet or transformer)
    and a w-conditioned student (a guidance embedding), all sharded: the same weights as one process."""
    over = [f"teacher={tiny_pipelines[kind]}", f"data.name={caption_data}", "data.caption_column=caption",
            "guidance.scale=3", "guidance.range=[1, 6]", "guidance.embedding_dim=32", "method.iters=3",
            "method.num_steps=10", "method.sample_steps=[1, 2]", "method.optimizer.warmup_steps=0",
            "method.optimizer.eps=1e-6", "trainer.checkpoint_every=0"]
    one, fsdp, stdout = _one_and_sharded(tmp_path, "consistency.yaml", over, 8)
    assert any(line.startswith("fsdp:") and "teacher" in line for line in stdout.splitlines())
    a, b = _last(one, ("student", "target")), _last(fsdp, ("student", "target"))
    assert _max_diff(a, b) < 1e-5


def test_gathering_a_wrapper_without_a_template_names_the_fix(monkeypatch):
    """A custom method that exports a new wrapper around sharded networks gets a message saying what to return,
    not an attribute error from inside FSDP."""
    from torch import nn

    from distill import sharding
    from distill.errors import DistillError

    monkeypatch.setattr(sharding, "is_sharded", lambda module: True)
    with pytest.raises(DistillError, match="Return the attribute itself, or set trainer.fsdp: false"):
        sharding.gathered(nn.Linear(2, 2))
    monkeypatch.undo()
    plain = nn.Linear(2, 2)
    assert sharding.gathered(plain) is plain  # an unsharded network is its own whole copy
