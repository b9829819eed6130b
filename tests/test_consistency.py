"""Consistency distillation: the boundary condition, the solver, the EMA target, training, export and config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.recipe import load_recipe
from distill.denoisers import ConsistencyDenoiser
from distill.pipelines import load_denoiser
from distill.errors import ConfigError, DistillError
from distill.samplers import sample_consistency, sample_ddim, sample_euler, sample_heun
from distill.schedules import vp_alpha
from distill.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "digits" / "consistency.yaml"
TINY = ["trainer.batch_size=16", "trainer.progress=false", "trainer.checkpoint_every=0", "eval.protocol=null"]


def _trainer(tmp_path, teacher, *overrides) -> Trainer:
    return Trainer(load_recipe(RECIPE, [f"teacher={teacher}", *TINY, *overrides]), tmp_path)


def _noise(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_boundary_condition_holds_at_sigma_min(tmp_path, tiny_teacher, one_thread):
    """f(x, sigma_min) is LCM's boundary value: the VP sample alpha(sigma_min) x, with no network term."""
    m = _trainer(tmp_path, tiny_teacher, "method.iters=1").method
    student, target = m.unwrap(m.student), m.target
    x = _noise(4, 1, 8, 8)
    s_min = torch.full((4,), m.teacher.sigma_min, dtype=torch.float64)
    assert m.sigmas[0] == m.teacher.sigma_min  # the training grid starts at the boundary
    with torch.no_grad():
        x_t = (x * vp_alpha(s_min)[:, None, None, None]).to(x.dtype)
        torch.testing.assert_close(student(x, s_min), x_t, rtol=3e-7, atol=0)  # float32: 2 roundings
        torch.testing.assert_close(target(x, s_min), x_t, rtol=3e-7, atol=0)  # float32: 2 roundings
        c_skip, c_out = student.scalings(s_min)
        assert torch.all(c_skip == 1) and torch.all(c_out == 0)
        # away from the boundary the teacher-initialised student is the teacher's denoiser, scaled by c_out ~ 1
        s = torch.full((4,), 2.0, dtype=torch.float64)
        c_skip, c_out = student.scalings(s)
        assert float(c_skip.max()) < 1e-5 and float((1 - c_out).abs().max()) < 1e-4
        torch.testing.assert_close(student(x, s), m.teacher(x, s), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("solver, sampler", [("ddim", sample_ddim), ("euler", sample_euler), ("heun", sample_heun)])
def test_solver_step_is_one_sampler_step(tmp_path, tiny_teacher, solver, sampler, one_thread):
    m = _trainer(tmp_path, tiny_teacher, f"method.solver={solver}", "method.num_steps=20", "method.iters=1").method
    for i in (0, 7, 19):  # the interval at the boundary, one in the middle, the top one
        s_prev, s = m.sigmas[i], m.sigmas[i + 1]
        x = float(s) * _noise(3, 1, 8, 8, seed=i)
        ours = m.solver_step(x, torch.full((3,), float(s)), torch.full((3,), float(s_prev)))
        theirs = sampler(m.teacher, x, torch.stack([s, s_prev]))
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * max(1.0, float(s)))


def test_grids(tmp_path, tiny_teacher):
    m = _trainer(tmp_path, tiny_teacher, "method.iters=1", "method.num_steps=50").method
    sched = m.teacher.schedule
    # LCM's skipping-step grid: t = 0, k - 1, 2k - 1, ..., T - 1 with k = T / N = 20
    expect_t = [0] + [20 * j - 1 for j in range(1, 51)]
    assert torch.equal(m.sigmas, sched.sigmas[torch.tensor(expect_t)])
    assert m.sampling_timesteps(4) == [999, 759, 499, 259]  # LCMScheduler's choice from the 50-point grid
    m20 = _trainer(tmp_path / "n20", tiny_teacher, "method.iters=1", "method.num_steps=20").method
    assert m20.sampling_timesteps(4) == [999, 749, 499, 249]
    assert m.sampling_sigmas(2) == [float(sched.sigmas[999]), float(sched.sigmas[499]), 0.0]
    k = _trainer(tmp_path / "k", tiny_teacher, "method.solver=heun", "method.num_steps=18", "method.iters=1").method
    assert len(k.sigmas) == 19 and (k.sigmas.diff() > 0).all()
    assert float(k.sigmas[0]) == pytest.approx(sched.sigma_min) and float(k.sigmas[-1]) == pytest.approx(sched.sigma_max)


def test_target_moves_by_ema_only(tmp_path, tiny_teacher, one_thread):
    t = _trainer(tmp_path, tiny_teacher, "method.iters=3", "method.mu=0.9", "method.optimizer.lr=0.001",
                 "method.optimizer.warmup_steps=0")
    m = t.method
    opt_params = {id(p) for o in t.optimizers.values() for g in o.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in m.target.parameters())
    assert not any(p.requires_grad for p in m.target.parameters())
    history = []
    orig = m.end_of_step

    def spy(step):
        history.append(({k: v.clone() for k, v in m.target.state_dict().items()},
                        {k: v.clone() for k, v in m.unwrap(m.student).state_dict().items()}))
        return orig(step)

    target0 = {k: v.clone() for k, v in m.target.state_dict().items()}
    m.end_of_step = spy
    t.fit()
    prev = target0
    for target, student in history:
        for k in target:
            expect = prev[k].lerp(student[k], 1 - 0.9)
            torch.testing.assert_close(target[k], expect, rtol=0, atol=1e-7)
            assert not torch.equal(target[k], student[k]) or torch.equal(prev[k], student[k])
        prev = target
    assert all(p.grad is None for p in m.target.parameters())


def test_short_run_loss_falls_and_every_parameter_changes(tmp_path, tiny_teacher):
    t = _trainer(tmp_path, tiny_teacher, "method.iters=60", "method.optimizer.lr=0.002", "method.optimizer.schedule=constant",
                 "method.mu=0.5", "method.num_steps=10", "method.sample_steps=[1,2]", "method.weighting=uniform",
                 "trainer.log_every=1")
    init = {k: v.clone() for k, v in t.method.unwrap(t.method.student).named_parameters()}
    t.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["student/loss"] for r in rows]
    assert all(map(lambda v: v == v and abs(v) != float("inf"), losses))
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10]), (losses[:10], losses[-10:])
    after = dict(t.method.unwrap(t.method.student).named_parameters())
    unchanged = [k for k in init if torch.equal(init[k], after[k])]
    assert not unchanged, unchanged


def test_custom_distance_by_dotted_path_is_used(tmp_path, tiny_teacher, monkeypatch, one_thread):
    mod = tmp_path / "my_distances.py"
    mod.write_text(
        "import torch\n"
        "calls = []\n"
        "def counted(pred, target):\n"
        "    calls.append(pred.shape[0])\n"
        "    return 3.0 + (pred - target).abs().flatten(1).mean(1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    t = _trainer(tmp_path / "run", tiny_teacher, "method.distance=my_distances:counted", "method.iters=3",
                 "trainer.log_every=1")
    t.fit()
    import my_distances

    assert my_distances.calls == [16, 16, 16]  # one call per step of batch 16
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["student/loss"] > 3.0 for r in rows)  # the loss is the custom distance's value
    with pytest.raises(DistillError, match="cannot import distance"):
        _trainer(tmp_path / "bad", tiny_teacher, "method.distance=my_distances:missing", "method.iters=1")


def test_lpips_without_its_package_says_what_to_do(tmp_path, tiny_teacher, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lpips(name, *args, **kwargs):
        if name == "lpips":
            raise ImportError("No module named 'lpips'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lpips)
    with pytest.raises(DistillError, match="lpips.*package.*weights"):
        _trainer(tmp_path, tiny_teacher, "method.distance=lpips", "method.iters=1")


def test_config_validates_and_reports_every_problem():
    cfg = load_recipe(RECIPE)
    assert cfg.method_name == "consistency" and cfg.trainer.max_steps == cfg.method.iters
    bad = ["method.solver=rk4", "method.mu=1.0", "method.distance=cosine", "method.num_steps=4",
           "method.weighting=bogus", "method.export=ema"]
    with pytest.raises(ConfigError) as err:
        load_recipe(RECIPE, bad)
    msg = str(err.value)
    for needle in ("solver", "mu", "distance", "sample_steps", "weighting", "export"):
        assert needle in msg, (needle, msg)


def test_ddim_grid_must_divide_the_teacher_schedule(tmp_path, tiny_teacher):
    with pytest.raises(DistillError, match="not a multiple of num_steps"):
        _trainer(tmp_path, tiny_teacher, "method.num_steps=30", "method.iters=1")


def test_export_runs_in_stock_diffusers_like_the_consistency_sampler(tmp_path, tiny_teacher, one_thread):
    from diffusers import DiffusionPipeline

    t = _trainer(tmp_path, tiny_teacher, "method.iters=2")
    t.fit()
    folder = tmp_path / "model"
    info = json.loads((folder / "distill.json").read_text())
    assert info["sampler"] == "consistency" and info["steps"] == [1, 2, 4, 8]
    D = load_denoiser(folder)
    assert isinstance(D, ConsistencyDenoiser) and D.timestep_scaling == 10.0
    # the exported network is the EMA target
    for a, b in zip(D.parameters(), t.method.target.parameters()):
        assert torch.equal(a, b)
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2, 4):
        sigmas = torch.tensor(info["sigmas"][str(steps)], dtype=torch.float64)
        theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=steps,
                      output_type="np").images
        g = torch.Generator().manual_seed(3)
        z = torch.randn(2, 1, 8, 8, generator=g)
        ours = sample_consistency(D, z * sigmas[0].float(), sigmas, generator=g)
        ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        assert abs(ours - theirs).max() < 1e-4, steps


def test_resume_is_exact_with_the_target(tmp_path, tiny_teacher, one_thread):
    from distill.checkpoint import list_checkpoints, load_checkpoint

    over = ["method.iters=4", "trainer.checkpoint_every=2", "method.num_steps=10", "method.sample_steps=[1]"]
    _trainer(tmp_path / "a", tiny_teacher, *over).fit()
    b = _trainer(tmp_path / "b", tiny_teacher, *over)
    b.tc.max_steps = 2
    b.fit()
    b2 = _trainer(tmp_path / "b", tiny_teacher, *over)
    b2.fit()
    ka = load_checkpoint(list_checkpoints(tmp_path / "a" / "checkpoints")[-1])
    kb = load_checkpoint(list_checkpoints(tmp_path / "b" / "checkpoints")[-1])
    assert set(ka["modules"]) == {"student", "target"}
    for name in ("student", "target"):
        for k, v in ka["modules"][name].items():
            assert torch.equal(v, kb["modules"][name][k]), (name, k)


@pytest.mark.slow
def test_quality_floor_on_digits(tmp_path):
    """A short run on the shipped digits teacher: the 1- and 2-step students must beat the teacher's own DDIM at
    the same step counts by 5x and 2x (on the same protocol and seeds)."""
    from distill.eval.harness import evaluate
    from distill.eval.protocol import load_protocol

    cfg = load_recipe(RECIPE, ["method.iters=300", "method.sample_steps=[1,2]", "eval.steps=[1,2]",
                               "trainer.progress=false", "trainer.checkpoint_every=0", "eval.n=300"])
    Trainer(cfg, tmp_path).fit()
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    student = {r["steps"]: r["value"] for r in rows if r["method"] == "consistency"}
    teacher = evaluate(ROOT / "distill" / "assets" / "digits-teacher", load_protocol("digits", n=300), [1, 2],
                       ["ddim"], progress=False)
    t = {r["steps"]: r["value"] for r in teacher[1:]}
    assert student[1] < t[1] / 5 and student[2] < t[2] / 2, (student, t)


def test_discretisation_curriculum(tmp_path, tiny_teacher, one_thread):
    t = _trainer(tmp_path, tiny_teacher, "method.num_steps=[10, 20]", "method.iters=4", "trainer.log_every=1")
    m = t.method
    assert [m.steps_at(s) for s in range(4)] == [10, 10, 20, 20]
    assert len(m.grids[10]) == 11 and torch.equal(m.sigmas, m.grids[20])
    seen = []

    cached = m.on_device  # the grids are copied to the device once, then taken from its cache

    def recording(key, make, device, dtype=None):
        grid = cached(key, make, device, dtype)
        if isinstance(key, tuple) and key[0] == "grid":
            assert torch.equal(grid.double(), m.grids[key[1]].to(grid.device).float().double())
            seen.append(key[1])
        return grid

    m.on_device = recording
    t.fit()
    assert seen == [10, 10, 20, 20]  # each step's loss walks its stage's grid
    assert json.loads((tmp_path / "model" / "distill.json").read_text())["original_inference_steps"] == 20
