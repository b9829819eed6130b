"""Every recipe on text-conditional latent teachers: the tiny Stable Diffusion (VP UNet) and SD3 (flow transformer)
pipelines, with captions and classifier-free guidance, 10 steps each.

Each run: finite losses; every trainable parameter the network's forward reaches changes; the student is exported
as the teacher's own pipeline class, loads in stock diffusers, generates from prompts, and matches distill's sampler
(``distill.export.parity``) to 1e-4 of the latents' scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.recipe import load_recipe
from distill.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "progressive": ["method.start_steps=4", "method.iters_per_phase=[5, 5]"],
    "consistency": ["method.iters=10", "method.num_steps=10", "method.sample_steps=[1, 2]"],
    "adversarial": ["method.iters=10", "method.head_channels=8", "method.ema_decay=0", "method.r1_every=2"],
    "custom": ["method.iters=10", "method.teacher_steps=2"],
}


def recipe_path(name: str) -> Path:
    return ROOT / ("examples/custom_method.yaml" if name == "custom" else f"recipes/digits/{name}.yaml")


def dead_parameters(folder: Path) -> set[str]:
    """Names of the teacher network's parameters whose gradient is identically zero on a random input: parts
    its forward computes but never uses (SD3's last joint block makes text queries it discards)."""
    from distill.pipelines import load_pipeline

    p = load_pipeline(folder)
    D = p.load_denoiser()
    cond = p.encode_prompts(["a red seven", "a blue two"])
    x = torch.randn(2, *p.sample_shape, generator=torch.Generator().manual_seed(0))
    D(x, torch.tensor([0.5, 3.0]), **cond).square().sum().backward()
    return {n for n, q in D.net.named_parameters() if q.grad is None or not q.grad.any()}


def train(name: str, teacher: Path, data: Path, out: Path, *extra: str) -> tuple[Trainer, dict, dict]:
    over = [f"teacher={teacher}", f"data.name={data}", "data.caption_column=caption", "trainer.batch_size=4",
            "trainer.log_every=1", "eval.protocol=null", "trainer.progress=false", "trainer.checkpoint_every=0",
            "trainer.threads=1", *RECIPES[name], *extra]
    cwd = Path.cwd()
    import os

    os.chdir(ROOT)  # the custom recipe names its file relative to the repository
    try:
        t = Trainer(load_recipe(recipe_path(name), over), out)
    finally:
        os.chdir(cwd)
    before = {n: q.detach().clone() for n, q in t.method.named_parameters() if q.requires_grad}
    t.fit()
    after = {n: q.detach() for n, q in t.method.named_parameters()}
    return t, before, after


@pytest.mark.parametrize("kind", ["sd", "sd3"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_on_a_text_to_image_teacher(tiny_pipelines, caption_data, tmp_path, kind, name, one_thread):
    from diffusers import DiffusionPipeline

    from distill.export import parity
    from distill.pipelines import load_kwargs

    teacher = tiny_pipelines[kind]
    t, before, after = train(name, teacher, caption_data, tmp_path / "run", "guidance.scale=3")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [v for r in rows for k, v in r.items() if k.endswith("/loss")]
    assert len(rows) == 10 and all(torch.isfinite(torch.tensor(losses)))
    dead = dead_parameters(teacher)
    unchanged = [n for n, q in before.items() if torch.equal(q, after[n])
                 and not any(n.endswith(d) for d in dead)]
    assert not unchanged, unchanged
    model = tmp_path / "run" / "model"
    index = json.loads((model / "model_index.json").read_text())
    teacher_class = json.loads((teacher / "model_index.json").read_text())["_class_name"]
    assert index["_class_name"] == teacher_class
    info = json.loads((model / "distill.json").read_text())
    assert info["guidance"] == 1.0  # a fixed-w student needs no guidance: the stock call passes 1, which skips CFG
    pipe = DiffusionPipeline.from_pretrained(model, **load_kwargs(model))
    assert type(pipe).__name__ == teacher_class
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red seven", num_inference_steps=info["steps"][0], guidance_scale=info["guidance"],
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and float(abs(images).sum()) > 0
    if kind == "sd3" and info["sampler"] == "consistency":
        # FlowMatchLCM's own grid ends at t = 0.001 (its 2nd of 2 steps would change nothing): the student steps at
        # t = 1 - i / k, which the stock call gets as sigmas= (parity below runs it so)
        assert info["scheduler_sigmas"] == {str(k): [1 - i / k for i in range(k)] for k in info["steps"]}
    for k, diff in parity(model, n=2).items():
        assert diff <= 1e-4, (k, diff)


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_guidance_embedded_student_serves_a_range_of_w(tiny_pipelines, caption_data, tmp_path, kind, one_thread):
    from distill.pipelines import load_denoiser
    from distill.export import parity
    from distill.pipelines import load_pipeline

    teacher = tiny_pipelines[kind]
    t, _, _ = train("consistency", teacher, caption_data, tmp_path / "run", "guidance.range=[1, 6]",
                    "guidance.scale=4", "guidance.embedding_dim=32")
    student = t.method.target  # the exported network (EMA target), still taking w as an input
    assert student.takes_guidance
    p = load_pipeline(teacher)
    cond = p.encode_prompts(["a red seven", "a blue two"])
    x = torch.randn(2, *p.sample_shape, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([2.0, 2.0])
    with torch.no_grad():
        outs = [student(x, s, **cond, guidance=torch.full((2,), w)) for w in (1.5, 4.0, 6.0)]
    assert (outs[0] - outs[1]).abs().max() > 1e-6 and (outs[1] - outs[2]).abs().max() > 1e-6
    info = json.loads((tmp_path / "run" / "model" / "distill.json").read_text())
    exported = load_denoiser(tmp_path / "run" / "model")
    if kind == "sd":
        # UNets keep the input (time_cond_proj_dim): the stock pipeline feeds guidance_scale to it
        assert info["guidance"] == 4.0  # what a stock pipeline gets as guidance_scale
        assert exported.takes_guidance
    else:
        # transformers have no stock guidance input: w is baked into the exported network, so the folder is sampled
        # at guidance_scale 1 (classifier-free guidance on top would guide twice)
        assert info["guidance"] == 1.0 and info["baked_guidance"] == 4.0
        assert not exported.takes_guidance
        with torch.no_grad():
            torch.testing.assert_close(exported(x, s, **cond), outs[1], rtol=1e-4, atol=1e-4)
    for k, diff in parity(tmp_path / "run" / "model", n=2).items():
        assert diff <= 1e-4, (k, diff)


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_guidance_embedding_learns_at_its_own_rate(tiny_pipelines, caption_data, tmp_path, kind, one_thread):
    from distill.errors import DistillError

    t, before, after = train("consistency", tiny_pipelines[kind], caption_data, tmp_path / "run",
                             "guidance.range=[1, 6]", "guidance.embedding_dim=32", "guidance.embedding_lr_scale=10")
    groups = t.optimizers["student"].param_groups
    assert [g["lr_scale"] for g in groups] == [1.0, 10.0]
    names = {id(q): n for n, q in t.method.student.named_parameters()}
    layer = "time_embedding.cond_proj." if kind == "sd" else "guidance_embedder."
    new = [n for n, q in t.method.student.named_parameters() if layer in n]
    assert new and sorted(names[id(q)] for q in groups[1]["params"]) == sorted(new)
    assert groups[0]["lr"] > 0 and groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])
    assert all(not torch.equal(before[n], after[n]) for n in before if layer in n)
    # the default keeps one group, and a rate scale must be positive
    plain = train("consistency", tiny_pipelines[kind], caption_data, tmp_path / "plain", "guidance.range=[1, 6]",
                  "guidance.embedding_dim=32", "method.iters=1")[0]
    assert len(plain.optimizers["student"].param_groups) == 1
    with pytest.raises(DistillError, match="embedding_lr_scale must be > 0"):
        load_recipe(recipe_path("consistency"), ["guidance.range=[1, 6]", "guidance.embedding_lr_scale=0"])


@pytest.mark.parametrize("kind", ["sdxl", "dit"])
def test_consistency_on_sdxl_and_class_conditional_dit(tiny_pipelines, caption_data, tmp_path, kind, one_thread):
    """SDXL's pooled and size conditioning, and DiT's class labels (data.label_column), reach every network call."""
    from distill.export import parity

    extra = ["data.caption_column=null", "data.label_column=label"] if kind == "dit" else []
    t, before, after = train("consistency", tiny_pipelines[kind], caption_data, tmp_path / "run", "guidance.scale=2",
                             *extra)
    assert all(not torch.equal(q, after[n]) for n, q in before.items())
    for k, diff in parity(tmp_path / "run" / "model", n=2).items():
        assert diff <= 1e-4, (k, diff)


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_scaffold_then_teacher_training_with_caption_dropout(tiny_pipelines, caption_data, tmp_path, kind, one_thread):
    """`distill scaffold` makes a pipeline with a fresh network beside trained parts; `distill teacher` trains that
    network on captioned data (as latents), dropping captions for classifier-free guidance, and exports the teacher
    as the same pipeline class with every part."""
    from diffusers import DiffusionPipeline

    from distill import cli
    from distill.pipelines import load_kwargs
    from distill.pipelines import load_pipeline

    spec = tmp_path / "spec.yaml"
    vae = tiny_pipelines["sd"] / "vae"
    spec.write_text((ROOT / "tests" / "data" / f"tiny-{kind}-scaffold.yaml").read_text().replace("VAE", str(vae)))
    scaffold = tmp_path / "scaffold"
    assert cli.main(["scaffold", str(spec), "--out", str(scaffold)]) == 0
    assert load_pipeline(scaffold).class_name == ("StableDiffusionPipeline" if kind == "sd" else
                                                  "StableDiffusion3Pipeline")
    weighting = "snr+1" if kind == "sd" else "flow"
    over = ["--out", str(tmp_path / "run"), f"teacher={scaffold}", f"data.name={caption_data}",
            "data.caption_column=caption", "trainer.max_steps=4", "trainer.batch_size=4", "trainer.log_every=1",
            "trainer.progress=false", "trainer.checkpoint_every=0", "method.cond_dropout=0.5",
            f"method.weighting={weighting}", "method.ema_decay=0.5"]
    assert cli.main(["teacher", str(ROOT / "recipes" / "digits" / "teacher.yaml"), *over]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["denoiser/loss"] == r["denoiser/loss"] for r in rows)
    model = tmp_path / "run" / "model"
    pipe = DiffusionPipeline.from_pretrained(model, **load_kwargs(model))
    assert {"vae", "text_encoder", "tokenizer"} <= set(pipe.components)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red seven", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


def test_scaffold_takes_saved_tokenizer_and_text_encoder(tiny_pipelines, tmp_path):
    """A scaffold spec can name a saved (trained) tokenizer and text encoder instead of building new ones: the
    pipeline gets exactly those weights; an encoder whose vocabulary is not the tokenizer's, or a saved encoder
    given config keys as well, is refused with a message."""
    import transformers

    from distill.errors import DistillError
    from distill.scaffold import build_scaffold, load_spec

    saved = tiny_pipelines["sd"]
    text = (ROOT / "tests" / "data" / "tiny-sd-scaffold.yaml").read_text().replace("VAE", str(saved / "vae"))
    text = text.replace("tokenizer: {words: tiny_pipelines:WORDS, model_max_length: 16}",
                        f"tokenizer: {{path: {saved / 'tokenizer'}}}")
    text = text.replace("{_class_name: CLIPTextModel, seed: 0, hidden_size: 32}",
                        f"{{_class_name: CLIPTextModel, path: {saved / 'text_encoder'}}}")
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    out = build_scaffold(load_spec(spec), tmp_path / "scaffold")
    ours = transformers.CLIPTextModel.from_pretrained(out / "text_encoder").state_dict()
    theirs = transformers.CLIPTextModel.from_pretrained(saved / "text_encoder").state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    tok = transformers.CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert tok("a red seven").input_ids == transformers.CLIPTokenizer.from_pretrained(saved / "tokenizer")(
        "a red seven").input_ids

    wrong = tmp_path / "wrong-vocab"
    transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=len(tok) + 5, hidden_size=32,
                                                           intermediate_size=37, num_hidden_layers=1,
                                                           num_attention_heads=4)).save_pretrained(wrong)
    spec.write_text(text.replace(str(saved / "text_encoder"), str(wrong)))
    with pytest.raises(DistillError, match="vocabulary"):
        build_scaffold(load_spec(spec), tmp_path / "scaffold2")
    spec.write_text(text.replace(f"path: {saved / 'text_encoder'}}}", f"path: {saved / 'text_encoder'}, seed: 3}}"))
    with pytest.raises(DistillError, match="takes no config keys, got seed"):
        load_spec(spec)
