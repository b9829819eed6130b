"""``student.init``: a distillation student that starts from another student of the same teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.errors import ConfigError
from distill.recipe import load_recipe
from distill.errors import DistillError
from distill.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "digits"
TINY = ["trainer.batch_size=8", "trainer.progress=false", "eval.protocol=null", "trainer.checkpoint_every=0",
        "trainer.threads=1"]


@pytest.fixture(scope="module")
def consistency_student(tmp_path_factory, tiny_teacher):
    """A tiny consistency student of the tiny teacher, trained a few steps at a high rate so it differs from it."""
    out = tmp_path_factory.mktemp("cm")
    over = [f"teacher={tiny_teacher}", *TINY, "method.iters=3", "method.optimizer.lr=1e-2",
            "method.optimizer.warmup_steps=0"]
    Trainer(load_recipe(RECIPES / "consistency.yaml", over), out).fit()
    return out / "model"


def _dmd(tmp_path, teacher, *over) -> Trainer:
    return Trainer(load_recipe(RECIPES / "distribution_matching.yaml",
                               [f"teacher={teacher}", *TINY, "method.iters=2", *over]), tmp_path)


def test_the_student_starts_from_the_init_and_the_teacher_still_teaches(tmp_path, tiny_teacher, consistency_student,
                                                                        one_thread):
    from distill.pipelines import load_pipeline

    started = load_pipeline(consistency_student).load_network().state_dict()
    t = _dmd(tmp_path, tiny_teacher, f"student.init={consistency_student}")
    student = t.method.student.inner.net.state_dict()
    tnet = load_pipeline(tiny_teacher).load_network().state_dict()
    assert all(torch.equal(v, student[k]) for k, v in started.items())
    # the consistency student moved away from the teacher, so the check above could fail
    assert any(not torch.equal(v, tnet[k]) for k, v in started.items())
    # the fake denoiser and the frozen teacher are the teacher's network, not the init's
    for net in (t.method.fake.denoiser.net, t.method.teacher.net):
        assert all(torch.equal(v, tnet[k]) for k, v in net.state_dict().items())
    # without init the student is the teacher
    plain = _dmd(tmp_path / "plain", tiny_teacher).method.student.inner.net.state_dict()
    assert all(torch.equal(v, tnet[k]) for k, v in plain.items())


def test_an_init_of_another_architecture_is_refused_with_the_difference(tmp_path, tiny_teacher, one_thread):
    from conftest import tiny_unet

    from distill.denoisers import DiffusersDenoiser
    from distill.export import save_pipeline

    sched = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
             "clip_sample": False}
    other = tiny_unet()
    wide = type(other)(**{**dict(other.config), "block_out_channels": (16, 24)})
    folder = save_pipeline(DiffusersDenoiser(wide, sched), tmp_path / "wide")
    with pytest.raises(DistillError, match=r"block_out_channels .*student.init"):
        _dmd(tmp_path / "run", tiny_teacher, f"student.init={folder}")
    eps = save_pipeline(DiffusersDenoiser(tiny_unet(), {**sched, "prediction_type": "epsilon"}), tmp_path / "eps")
    with pytest.raises(DistillError, match="prediction_type is 'epsilon', the teacher's 'v_prediction'"):
        _dmd(tmp_path / "run2", tiny_teacher, f"student.init={eps}")


def test_a_missing_init_says_what_to_run_first(tmp_path, tiny_teacher, one_thread):
    with pytest.raises(DistillError, match=r"student.init: runs/nothing/model does not exist.*run that recipe first"):
        _dmd(tmp_path, tiny_teacher, "student.init=runs/nothing/model")


def test_init_with_lora_or_without_a_student_is_refused_in_the_config():
    with pytest.raises(ConfigError, match="student.init: method 'teacher' has no student"):
        load_recipe(RECIPES / "teacher.yaml", ["student.init=somewhere"])
    with pytest.raises(ConfigError, match="init: a LoRA student starts as the teacher"):
        load_recipe(RECIPES / "consistency.yaml", ["student.init=somewhere", "student.lora.rank=4"])
