"""Progressive distillation: the two-step target, phase transitions, training, validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_teacher
from distill.recipe import load_recipe
from distill.errors import ConfigError, DistillError
from distill.samplers import sample_ddim
from distill.trainer import Trainer

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "digits" / "progressive.yaml"
TINY = ["trainer.batch_size=16", "trainer.progress=false", "trainer.checkpoint_every=0", "eval.protocol=null"]


def _trainer(tmp_path, teacher, *overrides) -> Trainer:
    cfg = load_recipe(RECIPE, [f"teacher={teacher}", *TINY, *overrides])
    return Trainer(cfg, tmp_path)


def test_target_is_two_teacher_ddim_steps(tmp_path, tiny_teacher):
    m = _trainer(tmp_path, tiny_teacher, "method.start_steps=8", "method.iters_per_phase=1").method
    grid = m.grid(8)  # the teacher's grid of the first phase (student: 4 steps)
    x = grid[2].float() * torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    s, s_mid, s_next = (torch.full((5,), float(v)) for v in grid[2:5])
    two = m.two_teacher_steps(x, s, s_mid, s_next)
    by_sampler = sample_ddim(m.teacher, x, grid[2:5])
    torch.testing.assert_close(two, by_sampler, rtol=1e-5, atol=1e-5)
    # the target is the x0 whose single DDIM step s -> s_next lands on the same point
    x_tilde = m.target(x, s, s_mid, s_next)
    one = x_tilde + (s_next / s)[:, None, None, None] * (x - x_tilde)
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-4)


def test_phase_transition_student_teaches_next_phase(tmp_path, tiny_teacher):
    t = _trainer(tmp_path, tiny_teacher, "method.start_steps=4", "method.iters_per_phase=3", "eval.protocol=digits",
                 "eval.n=100")
    m = t.method
    seen = []
    orig = m.end_of_step

    def spy(step):
        before = {k: v.clone() for k, v in m.unwrap(m.student).state_dict().items()}
        ev = orig(step)
        if ev is not None:
            seen.append((step, before, {k: v.clone() for k, v in m.teacher.state_dict().items()}, m.phase, ev))
        return ev

    m.end_of_step = spy
    t.fit()
    assert [s[0] for s in seen] == [3, 6]
    step, student_at_end, teacher_after, phase, ev = seen[0]
    assert phase == 1 and ev.reset_optimizers
    assert all(torch.equal(student_at_end[k], teacher_after[k]) for k in student_at_end)  # phase 1's teacher
    assert [mm.name for mm in ev.milestones] == ["2-step"]
    info = json.loads((tmp_path / "students" / "2-step" / "distill.json").read_text())
    assert info["sampler"] == "ddim" and info["steps"] == [2] and len(info["sigmas"]["2"]) == 3
    assert (tmp_path / "students" / "1-step" / "distill.json").is_file()
    assert json.loads((tmp_path / "model" / "distill.json").read_text())["steps"] == [1]
    rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["steps"] for r in rows if r["method"] == "progressive") == [1, 2]
    # the exported student loads in stock diffusers with a DDIM scheduler
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "model")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_short_run_loss_falls_and_every_parameter_changes(tmp_path, tiny_teacher):
    t = _trainer(tmp_path, tiny_teacher, "method.start_steps=2", "method.iters_per_phase=60", "method.lr=0.002",
                 "method.optimizer.schedule=constant", "trainer.log_every=1")
    init = {k: v.clone() for k, v in t.method.student.state_dict().items()}
    t.fit()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["student/loss"] for r in rows]
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])
    after = t.method.unwrap(t.method.student).state_dict()
    unchanged = [k for k in init if torch.equal(init[k], after[k])]
    assert not unchanged, unchanged


def test_bad_teachers_and_configs_are_refused_before_training(tmp_path):
    sample_teacher = save_tiny_teacher(tmp_path / "x0-teacher", prediction_type="sample")
    with pytest.raises(DistillError, match="epsilon or v_prediction"):
        _trainer(tmp_path / "a", sample_teacher, "method.iters_per_phase=1")
    eps_teacher = save_tiny_teacher(tmp_path / "eps-teacher", prediction_type="epsilon")
    with pytest.raises(DistillError, match="start_steps <= 1000"):
        _trainer(tmp_path / "b", eps_teacher, "method.start_steps=2048", "method.iters_per_phase=1")
    with pytest.raises(ConfigError, match="power of 2"):
        load_recipe(RECIPE, ["method.start_steps=48", "method.end_steps=5"])
    with pytest.raises(ConfigError, match="lists 2 values for 6 phases"):
        load_recipe(RECIPE, ["method.lr=[0.001, 0.002]"])
    with pytest.raises(ConfigError, match="runs 1200 steps"):
        load_recipe(RECIPE, ["trainer.max_steps=100"])


@pytest.mark.slow
def test_quality_floor_on_digits(tmp_path):
    """A short run on the shipped digits teacher: its 1-step student must beat the teacher's 1-step DDIM
    by 10x and its 2-step student the 2-step DDIM by 3x (this short run from a 4-step teacher: 15x and
    3.8x; the full recipe: 93x and 25x), on the same protocol and seeds."""
    from distill.eval.harness import evaluate
    from distill.eval.protocol import load_protocol

    root = Path(__file__).resolve().parent.parent
    cfg = load_recipe(RECIPE, ["method.start_steps=4", "method.iters_per_phase=[100, 200]", "trainer.progress=false",
                               "trainer.checkpoint_every=0", "eval.n=300"])
    Trainer(cfg, tmp_path).fit()
    rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
    student = {r["steps"]: r["value"] for r in rows if r["method"] == "progressive"}
    teacher = evaluate(root / "distill" / "assets" / "digits-teacher", load_protocol("digits", n=300), [1, 2],
                       ["ddim"], progress=False)
    t = {r["steps"]: r["value"] for r in teacher[1:]}
    assert student[1] < t[1] / 10 and student[2] < t[2] / 3, (student, t)  # measured: 15x and 3.8x


def test_resume_across_a_phase_boundary_is_exact(tmp_path, tiny_teacher):
    """6 steps in one go == 4 steps (past the phase change at 3), a new Trainer resumed, 2 more: bitwise."""
    from distill.checkpoint import list_checkpoints, load_checkpoint

    over = ["method.start_steps=4", "method.iters_per_phase=3", "trainer.checkpoint_every=4"]
    _trainer(tmp_path / "a", tiny_teacher, *over).fit()
    b = _trainer(tmp_path / "b", tiny_teacher, *over)
    b.tc.max_steps = 4  # stop after step 4, as a preempted run would
    b.fit()
    b2 = _trainer(tmp_path / "b", tiny_teacher, *over)
    assert b2.resume() and b2.step == 4 and b2.method.phase == 1
    b2.fit()
    ka = load_checkpoint(list_checkpoints(tmp_path / "a" / "checkpoints")[-1])
    kb = load_checkpoint(list_checkpoints(tmp_path / "b" / "checkpoints")[-1])
    for name in ("student", "teacher"):
        for k, v in ka["modules"][name].items():
            assert torch.equal(v, kb["modules"][name][k]), (name, k)
    for pid, st in ka["optimizers"]["student"]["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(kb["optimizers"]["student"]["state"][pid][k]))


def test_a_teacher_that_does_not_fit_the_data_is_refused_before_training(tmp_path):
    """Channels, resolution and prediction type are checked against the data before any step (one message)."""
    from conftest import tiny_unet

    from distill.denoisers import DiffusersDenoiser
    from distill.export import save_pipeline

    sched = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample",
             "clip_sample": False}
    wrong = save_pipeline(DiffusersDenoiser(tiny_unet(sample_size=16, channels=3), sched), tmp_path / "rgb16")
    with pytest.raises(DistillError) as err:
        Trainer(load_recipe(RECIPE, [f"teacher={wrong}", "trainer.progress=false"]), tmp_path / "run")
    msg = str(err.value)
    assert "3 channels, the data has 1" in msg and "16x16 images, the data's are 8x8" in msg
    assert "predicts 'sample'" in msg
