"""The examples run: a custom distance named in a recipe, and a method written in one file outside distill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from distill.checkpoint import list_checkpoints, load_checkpoint
from distill.recipe import load_recipe
from distill.methods import METHODS
from distill.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def test_custom_loss_example_trains_with_its_distance(tmp_path, tiny_teacher):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    cmd = [sys.executable, str(EXAMPLES / "custom_loss.py"), "--teacher", str(tiny_teacher), "--steps", "3",
           "--out", str(out), "--no-eval"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "charbonnier" in r.stdout
    cfg = (out / "config.yaml").read_text()
    assert "custom_loss.py:charbonnier" in cfg
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["student/distance"] > 0
    # the distance itself: 0 for equal images, and growing with the error
    sys.path.insert(0, str(EXAMPLES))
    try:
        from custom_loss import charbonnier
    finally:
        sys.path.remove(str(EXAMPLES))
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(charbonnier(x, x), torch.zeros(3))
    assert (charbonnier(x, x + 0.5) > charbonnier(x, x + 0.1)).all()


def test_custom_method_example_trains_without_changing_the_trainer(tmp_path, tiny_teacher, one_thread, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe names the method by a path relative to the repository
    over = [f"teacher={tiny_teacher}", "trainer.batch_size=8", "trainer.progress=false", "eval.protocol=null",
            "method.iters=4", "method.teacher_steps=2", "method.optimizer.warmup_steps=0", "method.optimizer.lr=1e-3",
            "trainer.checkpoint_every=2"]
    t = Trainer(load_recipe(EXAMPLES / "custom_method.yaml", over), tmp_path)
    assert type(t.method).__name__ == "OneStepKD" and "OneStepKD" not in " ".join(METHODS.values())
    init = {k: v.clone() for k, v in t.method.student.state_dict().items()}
    t.fit()
    after = t.method.unwrap(t.method.student).state_dict()
    assert not [k for k in init if torch.equal(init[k], after[k])]  # every student parameter changed
    assert all(torch.equal(v, t.method.teacher.state_dict()[k]) for k, v in init.items())  # the teacher did not
    ck = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert ck["state"]["method"] == {"targets_made": 4 * 8}  # the method's own state is checkpointed
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "model")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    # resume restores the method's state
    t2 = Trainer(load_recipe(EXAMPLES / "custom_method.yaml", over), tmp_path)
    assert t2.resume() and t2.method.targets_made == 32



def test_user_code_by_file_path_errors_are_clear_and_not_cached(tmp_path):
    import pytest

    from distill.errors import DistillError
    from distill.plugins import load_object

    with pytest.raises(DistillError, match="no file"):
        load_object(str(tmp_path / "missing.py") + ":f", "distance")
    with pytest.raises(DistillError, match="not a name like"):
        load_object("no_colon_here", "method")
    broken = tmp_path / "types.py"  # named like a standard module: it must not shadow it
    broken.write_text("def f(a, b):\n    return undefined_name\nraise RuntimeError('half-written file')\n")
    with pytest.raises(DistillError, match="cannot import distance .*RuntimeError: half-written file"):
        load_object(f"{broken}:f", "distance")
    broken.write_text("def f(a, b):\n    return (a - b).abs().flatten(1).mean(1)\n")
    f = load_object(f"{broken}:f", "distance")  # the failed import was not cached
    assert f(torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)).tolist() == [1.0, 1.0]
    import types as std_types

    assert hasattr(std_types, "ModuleType")  # the standard module is untouched
