"""Safety: pickles are never unpickled, non-finite runs stop, non-finite weights are never checkpointed."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from distill.checkpoint import _sha256, list_checkpoints, load_checkpoint
from distill.recipe import load_recipe
from distill.pipelines import load_denoiser
from distill.errors import DistillError
from distill.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "recipes" / "digits" / "teacher.yaml"
TINY = ["method.unet.block_out_channels=[16, 32]", "method.unet.down_block_types=[DownBlock2D, AttnDownBlock2D]",
        "method.unet.up_block_types=[AttnUpBlock2D, UpBlock2D]", "method.unet.norm_num_groups=8",
        "method.unet.attention_head_dim=8", "trainer.batch_size=16", "trainer.progress=false"]


class Boom:
    """Unpickling this writes a marker file: proof that a pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Boom(str(marker))))


def test_pickled_teacher_weights_are_refused_unopened(tmp_path):
    marker = tmp_path / "executed"
    folder = tmp_path / "teacher"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    _evil(folder / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(DistillError, match="no .safetensors weights; distill never unpickles"):
        load_denoiser(folder)
    # a pickle renamed to .safetensors fails to parse, still unexecuted
    os.replace(folder / "unet" / "diffusion_pytorch_model.bin", folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(DistillError):
        load_denoiser(folder)
    assert not marker.exists()


def test_pickled_checkpoint_is_refused_unopened(tmp_path):
    marker = tmp_path / "executed"
    Trainer(load_recipe(TEACHER, [*TINY, "trainer.max_steps=1"]), tmp_path / "run").fit()
    ck = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    target = ck / "modules" / "denoiser.safetensors"
    _evil(target, marker)
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["files"]["modules/denoiser.safetensors"] = _sha256(target)  # even with a matching hash
    (ck / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DistillError, match="cannot be read as safetensors"):
        load_checkpoint(ck)
    assert not marker.exists()


@pytest.mark.parametrize("guard", ["sync", "device"])
def test_nonfinite_streak_stops_and_keeps_the_last_good_checkpoint(tmp_path, guard):
    t = Trainer(load_recipe(TEACHER, [*TINY, "trainer.max_steps=10", "trainer.checkpoint_every=2",
                                      "trainer.max_nonfinite_streak=3", f"trainer.nonfinite_guard={guard}"]), tmp_path)
    orig = t.method.loss

    def nan_after_two(role, batch, step):
        loss, logs = orig(role, batch, step)
        return (loss * float("nan") if step >= 2 else loss), logs

    t.method.loss = nan_after_two
    with pytest.raises(DistillError, match="3 steps in a row had a NaN/inf"):
        t.fit()
    # skipped steps change nothing, so the checkpoint at step 4 holds step 2's (finite) weights
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000002", "step-00000004"]
    a, b = (load_checkpoint(c)["modules"]["denoiser"] for c in ckpts)
    assert all(torch.equal(a[k], b[k]) and torch.isfinite(b[k]).all() for k in a)


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    t = Trainer(load_recipe(TEACHER, [*TINY, "trainer.max_steps=1"]), tmp_path)
    t.fit()
    before = [c.name for c in list_checkpoints(tmp_path / "checkpoints")]
    with torch.no_grad():
        next(t.method.denoiser.parameters()).view(-1)[0] = float("inf")
    t.step = 5
    with pytest.raises(DistillError, match="non-finite values"):
        t.save()
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == before
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_crash_during_a_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    import distill.checkpoint as C

    t = Trainer(load_recipe(TEACHER, [*TINY, "trainer.max_steps=2"]), tmp_path)
    t.fit()
    good = list_checkpoints(tmp_path / "checkpoints")
    calls = {"n": 0}
    real = C.save_file

    def crash_on_second(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"half a file")
            raise RuntimeError("killed mid-write")
        return real(tensors, path)

    monkeypatch.setattr(C, "save_file", crash_on_second)
    t.step = 3
    with pytest.raises(RuntimeError):
        t.save()
    assert list_checkpoints(tmp_path / "checkpoints") == good  # the half-written one is never a candidate
    monkeypatch.setattr(C, "save_file", real)
    t2 = Trainer(load_recipe(TEACHER, [*TINY, "trainer.max_steps=4"]), tmp_path)
    assert t2.resume() and t2.step == 2


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    import errno

    import distill.checkpoint as C
    from distill import cli

    out = tmp_path / "run"
    args = ["run", str(TEACHER), "--out", str(out), *TINY, "trainer.max_steps=4", "trainer.checkpoint_every=2"]
    real = C.save_file

    def full_after_first(tensors, path):
        if list_checkpoints(out / "checkpoints"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(C, "save_file", full_after_first)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "previous checkpoint is kept" in err and "Traceback" not in err
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_to_the_same_weights(tmp_path):
    """SIGKILL a `distill run` mid-run, start it again: its final weights equal an uninterrupted run's."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    def cmd(out):
        return [sys.executable, "-m", "distill.cli", "teacher", str(TEACHER), "--out", str(out), *TINY,
                "trainer.max_steps=300", "trainer.checkpoint_every=20", "trainer.keep_checkpoints=3"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd(tmp_path / "whole"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(c.name >= "step-00000040" for c in list_checkpoints(tmp_path / "killed" / "checkpoints")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model").exists()
    subprocess.run(cmd(tmp_path / "killed"), check=True, env=env, capture_output=True)
    a = load_file(str(tmp_path / "whole" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
