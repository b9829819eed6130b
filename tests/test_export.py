"""Students out as stock diffusers folders: `distill export`, and the same images as distill's own samplers.

For one student of each method: the folder loads with ``DiffusionPipeline.from_pretrained``, and
``pipe(num_inference_steps=k, generator=...)`` gives the images distill's sampler gives from the same noise, to
1e-4, at every step count the student supports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill import cli
from distill.recipe import load_recipe
from distill.errors import DistillError
from distill.export import parity
from distill.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "digits"
QUIET = ["trainer.progress=false", "trainer.batch_size=16", "eval.protocol=null", "trainer.checkpoint_every=0"]
RUNS = {
    "progressive": ["method.start_steps=4", "method.iters_per_phase=2"],
    "consistency": ["method.iters=2", "method.num_steps=20"],
    "adversarial": ["method.iters=2", "method.head_channels=8"],
}


def _run(tmp_path, teacher, method: str) -> Path:
    out = tmp_path / method
    Trainer(load_recipe(RECIPES / f"{method}.yaml", [f"teacher={teacher}", *QUIET, *RUNS[method]]), out).fit()
    return out


@pytest.mark.parametrize("method", list(RUNS))
def test_export_round_trip_same_noise_same_images(tmp_path, tiny_teacher, one_thread, method):
    from diffusers import DiffusionPipeline

    run = _run(tmp_path, tiny_teacher, method)
    folder = tmp_path / f"{method}-export"
    assert cli.main(["export", str(run), "--out", str(folder)]) == 0
    info = json.loads((folder / "distill.json").read_text())
    assert info["method"] == method
    # the export is the run's final student: the same weights as DIR/model, written at the end of `distill run`
    a = DiffusionPipeline.from_pretrained(folder).unet.state_dict()
    b = DiffusionPipeline.from_pretrained(run / "model").unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    expected = {"progressive": [1], "consistency": [1, 2, 4, 8], "adversarial": [1, 2, 4]}[method]
    assert info["steps"] == expected
    diffs = parity(folder)
    assert sorted(diffs) == expected
    assert all(d < 1e-4 for d in diffs.values()), diffs


def test_progressive_intermediate_students_and_the_teacher_match_stock_ddim(tmp_path, tiny_teacher, one_thread):
    run = _run(tmp_path, tiny_teacher, "progressive")
    assert parity(run / "students" / "2-step")[2] < 1e-4
    diffs = parity(ROOT / "distill" / "assets" / "digits-teacher", [1, 2, 4, 8])
    assert all(d < 1e-4 for d in diffs.values()), diffs


def test_parity_catches_a_pipeline_that_samples_differently(tmp_path, tiny_teacher, one_thread):
    """The check can fail: the same student with a scheduler on other timesteps is far from distill's sampler."""
    run = _run(tmp_path, tiny_teacher, "consistency")
    cfg_path = run / "model" / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["original_inference_steps"] = 10  # LCM now picks its timesteps from a 10-point grid, not the student's 20
    cfg_path.write_text(json.dumps(cfg))
    assert min(parity(run / "model", [4, 8]).values()) > 1e-3


def test_export_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    recipe = (RECIPES / "consistency.yaml").read_text()
    (tmp_path / "config.yaml").write_text(recipe.replace("teacher: distill/", f"teacher: {ROOT}/distill/"))
    with pytest.raises(DistillError, match="no checkpoint"):
        cli.cmd_export(cli.build_parser().parse_args(["export", str(tmp_path), "--out", str(tmp_path / "x")]))


def test_a_protocol_of_other_images_is_refused_and_training_goes_on(tmp_path, tiny_teacher, one_thread, capsys,
                                                                      monkeypatch):
    """A student whose images do not fit the protocol: one clear error from the harness; inside a run, the
    student is saved, a warning says why it was not scored, and training continues."""
    from conftest import tiny_unet

    from distill.denoisers import DiffusersDenoiser
    from distill.eval import harness
    from distill.export import save_pipeline

    sched = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon",
             "clip_sample": False}
    rgb = save_pipeline(DiffusersDenoiser(tiny_unet(sample_size=16, channels=3), sched), tmp_path / "rgb16")
    with pytest.raises(DistillError, match=r"3x16x16 samples, but protocol 'digits' scores 1x8x8"):
        harness.evaluate(rgb, "digits", [1], ["ddim"], progress=False)

    def refuse(*args, **kwargs):
        raise DistillError("makes 3x16x16 images, but protocol 'digits' scores 1x8x8 images")

    monkeypatch.setattr(harness, "evaluate", refuse)
    out = tmp_path / "run"
    over = [f"teacher={tiny_teacher}", "trainer.progress=false", "trainer.batch_size=16",
            "trainer.checkpoint_every=0", *RUNS["progressive"]]
    result = Trainer(load_recipe(RECIPES / "progressive.yaml", over), out).fit()
    assert result["step"] == 4  # both phases ran, though neither student could be scored
    assert (out / "students" / "2-step" / "model_index.json").is_file() and (out / "model" / "distill.json").is_file()
    assert not (out / "results.jsonl").exists()
    assert capsys.readouterr().out.count("saved but not evaluated") == 2


@pytest.mark.parametrize("teacher", ["text-digits-sd", "text-digits-sd3"])
@pytest.mark.parametrize("consistency,sampler", [(True, None), (False, "ddim")])
def test_exported_schedulers_keep_only_their_own_settings(tmp_path, teacher, consistency, sampler):
    """A student's scheduler is made from the teacher's settings; those its class does not take (the SD teacher's
    Euler options, the SD3 teacher's stochastic_sampling) are left out of its scheduler_config.json, where
    diffusers would warn about each one whenever the student is loaded."""
    import inspect

    from distill.export import stock_scheduler
    from distill.pipelines import load_pipeline

    folder = Path(__file__).resolve().parent.parent / "distill" / "assets" / teacher
    D = load_pipeline(folder).load_denoiser()
    sched = stock_scheduler(D, consistency, sampler, original_inference_steps=50 if consistency else None)
    sched.save_config(tmp_path)
    saved = set(json.loads((tmp_path / "scheduler_config.json").read_text())) - {"_class_name", "_diffusers_version"}
    takes = set(inspect.signature(type(sched).__init__).parameters)
    assert saved and saved <= takes, sorted(saved - takes)
    foreign = set(D.scheduler_config) - takes
    assert foreign, "the teacher's scheduler should have settings this class does not take, or the test shows nothing"
