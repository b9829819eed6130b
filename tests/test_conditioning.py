"""Conditioning through data, the command line and evaluation; bad conditional input refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill import cli
from distill.recipe import load_recipe
from distill.errors import DistillError
from distill.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONSISTENCY = ROOT / "recipes" / "digits" / "consistency.yaml"
TINY_RUN = ["method.iters=2", "method.num_steps=10", "method.sample_steps=[1]", "trainer.batch_size=4",
            "eval.protocol=null", "trainer.progress=false", "trainer.checkpoint_every=0"]


def tiny_features():
    """A fixed random feature network for 16x16 RGB images (a stand-in for a real feature space in tests)."""
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.SiLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 7 * 7, 6))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    net.num_features = 6
    return net


def test_data_batches_carry_latents_and_caption_embeddings(tiny_pipelines, caption_data, tmp_path, monkeypatch):
    from distill.config import DataConfig
    from distill.data import ImageBatches, load_dataset
    from distill.pipelines import load_pipeline

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    p = load_pipeline(tiny_pipelines["sdxl"])
    cfg = DataConfig(name=str(caption_data), caption_column="caption")
    b = ImageBatches(load_dataset(cfg), cfg, pipeline=p)
    batch, _, _ = b.batch(0, 0, 6)
    assert batch["image"].shape == (6, 4, 8, 8)  # VAE latents, not 16x16 pixels
    assert batch["encoder_hidden_states"].shape == (6, 16, 64) and batch["pooled"].shape == (6, 32)
    assert batch["time_ids"].shape == (6, 6)
    rows = b.permutation(0)[:6].tolist()
    captions = load_dataset(cfg)[rows]["caption"]
    torch.testing.assert_close(batch["encoder_hidden_states"], p.encode_prompts(captions)["encoder_hidden_states"])
    assert [p.name for p in (tmp_path / "cache" / "latents").glob("*/*.npy")] == ["latents.npy"]
    assert sorted(p.name for p in (tmp_path / "cache" / "text").glob("*/*.npy")) == [
        "encoder_hidden_states.npy", "pooled.npy", "time_ids.npy"]
    # a second reader is served from the caches (no VAE or text encoder call)
    monkeypatch.setattr(type(p), "encode_images", lambda *a, **k: pytest.fail("latents were not cached"))
    monkeypatch.setattr(type(p), "encode_prompts", lambda *a, **k: pytest.fail("captions were not cached"))
    again, _, _ = ImageBatches(load_dataset(cfg), cfg, pipeline=p).batch(0, 0, 6)
    assert torch.equal(again["image"], batch["image"])


def test_bad_conditional_input_is_refused_before_any_work(tiny_pipelines, caption_data, tmp_path):
    cases = [
        # a text teacher with data lacking the caption column
        ([f"teacher={tiny_pipelines['sd']}", f"data.name={caption_data}", "data.caption_column=prompt"],
         "no caption column 'prompt'"),
        ([f"teacher={tiny_pipelines['sd']}", f"data.name={caption_data}"], "text-conditional .* no caption column"),
        # classifier-free guidance asked of an unconditional teacher
        ([f"teacher={tiny_pipelines['ddpm']}", "guidance.scale=3"], "unconditional: classifier-free guidance needs"),
        # a class teacher with data lacking labels
        ([f"teacher={tiny_pipelines['dit']}", f"data.name={caption_data}", "data.label_column=null"],
         "class-conditional .* no label column"),
    ]
    for i, (over, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        with pytest.raises(DistillError, match=message):
            Trainer(load_recipe(CONSISTENCY, [*over, *TINY_RUN]), out).fit()
        assert not out.exists(), over  # nothing written


def test_sample_cli_takes_prompts_labels_and_guidance(tiny_pipelines, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "sd.png"
    args = ["sample", str(tiny_pipelines["sd"]), "--prompt", "a red seven", "--guidance", "3", "--steps", "2",
            "--n", "4", "--out", str(out)]
    assert cli.main(args) == 0
    assert "for 'a red seven'" in capsys.readouterr().out and Image.open(out).mode == "RGB"
    for kind in ("sd3", "sdxl"):
        assert cli.main(["sample", str(tiny_pipelines[kind]), "--prompt", "a blue two", "--steps", "2", "--n", "2",
                         "--out", str(tmp_path / f"{kind}.png")]) == 0
    assert cli.main(["sample", str(tiny_pipelines["dit"]), "--label", "3", "--guidance", "2", "--steps", "2",
                     "--n", "2", "--out", str(tmp_path / "dit.png")]) == 0
    capsys.readouterr()
    errors = {
        ("sd",): "pass --prompt",
        ("dit",): "pass --label",
        ("ddpm", "--prompt", "a cat"): "unconditional",
        ("sd", "--label", "3"): "takes --prompt, not the other",
    }
    for (kind, *extra), message in errors.items():
        assert cli.main(["sample", str(tiny_pipelines[kind]), *extra, "--out", str(tmp_path / "x.png")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_eval_cli_scores_prompts_at_each_guidance_scale(tiny_pipelines, caption_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    proto = tmp_path / "tiny.yaml"
    proto.write_text(f"name: tiny-text\ndataset: {caption_data}\nextractor: test_conditioning:tiny_features\n"
                     "n: 12\nprompts: [a red seven, a blue two]\nguidance: [1, 3]\nbatch_size: 5\n")
    rows_file = tmp_path / "rows.jsonl"
    args = ["eval", str(tiny_pipelines["sd"]), "--protocol", str(proto), "--steps", "1,2", "--sampler", "ddim",
            "--out", str(rows_file), "--no-grids"]
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    points = [(r["steps"], r["guidance"], r["nfe"]) for r in rows[1:]]
    assert points == [(1, 1.0, 1), (1, 3.0, 2), (2, 1.0, 2), (2, 3.0, 4)]  # guidance doubles the network calls
    assert all(r["value"] > 0 for r in rows[1:])
    assert len({round(r["value"], 6) for r in rows[1:]}) == 4
    # an unconditional model is refused under a protocol of prompts, with nothing written
    assert cli.main(["eval", str(tiny_pipelines["ddpm"]), "--protocol", str(proto), "--out",
                     str(tmp_path / "none.jsonl"), "--no-grids"]) == 2
    assert "unconditional" in capsys.readouterr().err and not (tmp_path / "none.jsonl").exists()


def test_a_minimal_recipe_runs_with_its_defaults(tiny_teacher, tmp_path):
    """method.name, teacher and data are enough: the trainer runs the method's own length."""
    recipe = tmp_path / "minimal.yaml"
    recipe.write_text(f"method: {{name: consistency, iters: 3, num_steps: 10, sample_steps: [1]}}\n"
                      f"teacher: {tiny_teacher}\ndata: {{name: digits}}\n")
    cfg = load_recipe(recipe, ["trainer.batch_size=8", "eval.protocol=null", "trainer.progress=false"])
    assert cfg.trainer.max_steps == 3
    assert Trainer(cfg, tmp_path / "run").fit()["step"] == 3
    teacher_recipe = tmp_path / "teacher.yaml"
    teacher_recipe.write_text("method: {name: teacher}\n")
    assert load_recipe(teacher_recipe).trainer.max_steps == 1000  # a method that does not say: the default


def test_lazily_read_latents_and_captions_match_the_in_memory_ones(tiny_pipelines, caption_data, tmp_path,
                                                                     monkeypatch):
    from distill.config import DataConfig
    from distill.data import ImageBatches, load_dataset
    from distill.pipelines import load_pipeline

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    p = load_pipeline(tiny_pipelines["sd3"])
    memory_cfg = DataConfig(name=str(caption_data), caption_column="caption")
    lazy_cfg = DataConfig(name=str(caption_data), caption_column="caption", in_memory=False)
    memory = ImageBatches(load_dataset(memory_cfg), memory_cfg, seed=1, pipeline=p)
    lazy = ImageBatches(load_dataset(lazy_cfg), lazy_cfg, seed=1, pipeline=p)
    assert lazy._lazy is not None and lazy._lazy.latents is not None  # memory-mapped from the cache
    a, _, _ = memory.batch(0, 20, 8)  # crosses the epoch boundary
    b, _, _ = lazy.batch(0, 20, 8)
    assert a.keys() == b.keys() == {"image", "encoder_hidden_states", "pooled"}
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


class _Prompt:
    def __init__(self, text: str, digit: int, color: int) -> None:
        self.text, self.digit, self.color = text, digit, color


def tiny_prompts() -> list:
    """Two prompts with the labels an image made for them should be read as."""
    return [_Prompt("a red seven", 0, 0), _Prompt("a blue two", 1, 0)]


def zero_judge():
    """A feature extractor that reads every image as digit 0, color 0 (so prompt accuracy is predictable)."""
    from distill.eval.extractors import ModuleExtractor

    class Judge(ModuleExtractor):
        def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            zeros = torch.zeros(len(images), dtype=torch.long)
            return {"digit": zeros, "color": zeros}

    return Judge(tiny_features(), name="zero-judge", dim=6)


def test_prompt_accuracy_and_intervals_in_rows(tiny_pipelines, caption_data, tmp_path, monkeypatch):
    """A protocol with a judge scores prompt accuracy (here exactly the share of prompts the judge agrees with),
    the floor's accuracy on real images, and a bootstrap interval around every FD and accuracy."""
    from distill.eval.harness import evaluate
    from distill.eval.protocol import load_protocol

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    proto = tmp_path / "judged.yaml"
    proto.write_text(f"name: judged\ndataset: {caption_data}\nextractor: test_conditioning:zero_judge\nn: 12\n"
                     "prompts: test_conditioning:tiny_prompts\njudge: [digit, color]\nguidance: [1]\n")
    rows = evaluate(tiny_pipelines["sd"], load_protocol(proto), [1], ["ddim"], progress=False, grids=tmp_path / "g")
    floor, point = rows
    from PIL import Image

    with Image.open(point["grid_png"]) as grid:  # one row per prompt (2), up to 8 samples each (12 / 2 = 6)
        w, h = grid.size
    assert h * 3 == w or abs(h / w - 2 / 6) < 0.05, (w, h)
    assert point["accuracy"] == 0.5  # samples alternate between the two prompts; the judge agrees with one
    lo, hi = point["accuracy_ci"]
    assert 0 <= lo <= 0.5 <= hi <= 1
    lo, hi = point["value_ci"]
    assert lo <= point["value"] <= hi and lo < hi
    # the floor: half B of the data, judged against its own digit / color columns
    assert floor["accuracy"] is not None and 0 <= floor["accuracy"] <= 1
    assert floor["value_ci"][0] <= floor["value"] <= floor["value_ci"][1]


def brightness(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """A toy diagnostics function: each image's mean value and its brightest pixel."""
    return {"mean": images.mean(dim=(1, 2, 3)), "peak": images.amax(dim=(1, 2, 3))}


def test_diagnostics_and_pooled_draws_in_rows_and_the_leaderboard(tiny_pipelines, caption_data, tmp_path, monkeypatch):
    """A protocol's diagnostics give every row the mean of each aspect over its samples (all draws) and the floor row
    the real images'; the leaderboard shows them in a table beside FD."""
    from distill.eval.harness import evaluate
    from distill.eval.leaderboard import markdown
    from distill.eval.protocol import halves, load_protocol

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    proto = tmp_path / "diag.yaml"
    proto.write_text(f"name: diag\ndataset: {caption_data}\nextractor: test_conditioning:zero_judge\nn: 12\n"
                     "prompts: test_conditioning:tiny_prompts\nguidance: [1]\ndraws: 2\n"
                     "diagnostics: test_conditioning:brightness\n")
    protocol = load_protocol(proto)
    floor, point = evaluate(tiny_pipelines["sd"], protocol, [1], ["ddim"], progress=False)
    real = halves(protocol)[1]
    assert floor["aspects"]["mean"] == pytest.approx(float(real.mean(dim=(1, 2, 3)).mean()))
    assert set(point["aspects"]) == {"mean", "peak"} and point["aspects"]["mean"] <= point["aspects"]["peak"]
    assert point["pooled_n"] == 24 and point["draws"] == 2
    md = markdown([floor, point])
    assert "### Diagnostics on protocol 'diag'" in md and "| point | mean | peak |" in md
    assert f"| *real images (half B)* | *{floor['aspects']['mean']:.3f}* |" in md
