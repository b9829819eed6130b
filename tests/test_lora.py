"""LoRA students (``student.lora``) on the tiny SD (UNet) and SD3 (transformer) pipelines and the digits UNet: only
the adapters (and a guidance embedding) train, the teacher is the un-adapted network bitwise on the same base
tensors, checkpoints hold only adapters and resume bitwise, and both exports (fused, and LoRA weights applied to the
teacher by stock diffusers' ``load_lora_weights``) match distill's sampler to 1e-4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.recipe import load_recipe
from distill.errors import ConfigError, DistillError
from distill.trainer import Trainer
from test_conditional_recipes import dead_parameters

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "consistency": ["method.iters=4", "method.num_steps=10", "method.sample_steps=[1, 2]"],
    "adversarial": ["method.iters=4", "method.head_channels=8", "method.ema_decay=0.5", "method.r1_every=2"],
    "progressive": ["method.start_steps=4", "method.iters_per_phase=[2, 2]"],
    "distribution_matching": ["method.iters=4", "method.fake_updates=2", "method.gan_weight=0",
                              "method.student_steps=2", "method.sample_steps=[1, 2]"],
}
RANK = ["student.lora.rank=4"]


def make(method: str, teacher: Path, data: Path | None, out: Path, *extra: str) -> Trainer:
    over = [f"teacher={teacher}", "trainer.batch_size=4", "trainer.log_every=1", "eval.protocol=null",
            "trainer.progress=false", "trainer.checkpoint_every=0", "trainer.threads=1", *METHODS[method], *extra]
    if data is not None:
        over += [f"data.name={data}", "data.caption_column=caption", "guidance.scale=3"]
    return Trainer(load_recipe(ROOT / "recipes" / "digits" / f"{method}.yaml", over), out)


def base_state(folder: Path) -> dict[str, torch.Tensor]:
    from distill.pipelines import load_pipeline

    return load_pipeline(folder).load_network().state_dict()


@pytest.mark.parametrize("kind,w", [("sd", False), ("sd3", False), ("sd", True), ("sd3", True)])
def test_only_adapters_train_every_one_moves_and_the_base_stays(tiny_pipelines, caption_data, tmp_path, kind, w,
                                                                 one_thread):
    teacher = tiny_pipelines[kind]
    extra = ["guidance.range=[1, 6]", "guidance.embedding_dim=32"] if w else []
    t = make("consistency", teacher, caption_data, tmp_path / "run", *RANK, *extra)
    student = t.method.student
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    new_layers = {n for n in trainable if ".lora_" not in n}
    if not w:
        assert not new_layers
    elif kind == "sd":  # the rebuilt UNet's guidance input, trained in full
        assert new_layers == {"inner.net.time_embedding.cond_proj.weight"}
    else:
        assert new_layers and all(n.startswith("inner.guidance_embedder.") for n in new_layers)
    n_train = sum(p.numel() for n, p in student.named_parameters() if n in trainable)
    n_all = sum(p.numel() for p in student.parameters())
    assert n_train < 0.1 * n_all
    # the student's base tensors are the teacher's own (one copy in memory), and its target too
    teacher_net = t.method.teacher.inner.net
    ptrs = {p.data_ptr() for p in teacher_net.parameters()}
    base = [p for n, p in student.named_parameters() if n not in trainable and ".lora_" not in n]
    assert base and all(p.data_ptr() in ptrs for p in base)
    assert all(p.data_ptr() in ptrs for n, p in t.method.target.named_parameters()
               if ".lora_" not in n and n not in new_layers)
    before = {n: p.detach().clone() for n, p in student.named_parameters() if n in trainable}
    t.fit()
    after = dict(student.named_parameters())
    # as for full students, layers whose output the forward discards (SD3's last block's text queries) get a zero
    # gradient: their adapters stay at their start
    dead = {n.rsplit(".", 1)[0] for n in dead_parameters(teacher)}
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n])]
    assert [n for n in unchanged if n.removeprefix("inner.net.").split(".lora_")[0] not in dead] == []
    saved = base_state(teacher)
    ours = teacher_net.state_dict()
    assert ours.keys() == saved.keys() and all(torch.equal(v, saved[k]) for k, v in ours.items())
    lora = tmp_path / "run" / "model" / "lora"
    assert (lora / "pytorch_lora_weights.safetensors").is_file() != w  # a w-student is exported fused only


@pytest.mark.parametrize("kind,method", [("sd", "consistency"), ("sd3", "adversarial"),
                                         ("sd", "distribution_matching")])
def test_the_teacher_is_the_unadapted_network_bitwise(tiny_pipelines, caption_data, tmp_path, kind, method,
                                                      one_thread):
    from distill.guidance import CFGDenoiser
    from distill.pipelines import load_pipeline

    teacher = tiny_pipelines[kind]
    t = make(method, teacher, caption_data, tmp_path / "run", *RANK)
    p = load_pipeline(teacher)
    fresh = CFGDenoiser(p.load_denoiser().eval(), p.unconditional(), 3.0)
    cond = p.encode_prompts(["a red seven", "a blue two"])
    x = torch.randn(2, *p.sample_shape, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.5, 4.0])
    students = []

    def check(step: int) -> None:
        with torch.no_grad():
            ours, theirs = t.method.teacher(x, s, **cond), fresh(x, s, **cond)
            students.append(t.method.student(x, s, **cond))
        assert torch.equal(ours, theirs), step

    check(0)
    t.fit(on_step=check)
    assert len(students) == 5 and not torch.equal(students[0], students[-1])  # the student moved; the teacher not
    net = t.method.teacher.inner.net
    ptrs = {q.data_ptr() for q in net.parameters()}
    if method == "adversarial":  # the discriminator's backbone reads the teacher's own (un-adapted) network
        assert t.method.backbone.teacher is t.method.teacher.inner
    if method == "distribution_matching":  # the fake denoiser: its own adapters on the same base tensors
        fake = t.method.fake.denoiser
        lora = {n: q for n, q in fake.named_parameters() if ".lora_" in n}
        student = dict(t.method.student.inner.named_parameters())
        assert lora and all(q.requires_grad and q.data_ptr() != student[n].data_ptr() for n, q in lora.items())
        assert all(q.data_ptr() in ptrs for n, q in fake.named_parameters() if ".lora_" not in n)


@pytest.mark.parametrize("kind,method,extra", [
    ("sd3", "distribution_matching", ["method.ema_decay=0.5"]),
    ("sd", "consistency", ["guidance.range=[1, 6]", "guidance.embedding_dim=32"]),
])
def test_checkpoints_hold_only_adapters_and_resume_is_exact(tiny_pipelines, caption_data, tmp_path, kind, method,
                                                            extra, one_thread):
    """N steps in one go equal N/2, a resume in a new trainer, N/2 more, bitwise; the checkpoint's networks are
    adapters (and the w-student's guidance input) only."""
    from distill.checkpoint import list_checkpoints, load_checkpoint

    over = [*RANK, "trainer.checkpoint_every=2", *extra]
    a = make(method, tiny_pipelines[kind], caption_data, tmp_path / "a", *over)
    a.fit()
    b = make(method, tiny_pipelines[kind], caption_data, tmp_path / "b", *over)
    b.tc.max_steps = 2
    b.fit()
    b2 = make(method, tiny_pipelines[kind], caption_data, tmp_path / "b", *over)
    assert b2.resume() and b2.step == 2
    b2.fit()
    last = {r: list_checkpoints(tmp_path / r / "checkpoints")[-1] for r in "ab"}
    ka, kb = (load_checkpoint(last[r]) for r in "ab")
    for name, mod in ka["modules"].items():
        assert mod.keys() == kb["modules"][name].keys()
        for k, v in mod.items():
            assert torch.equal(v, kb["modules"][name][k]), (name, k)
            assert ".lora_" in k or "cond_proj" in k, (name, k)
    for role, opt in ka["optimizers"].items():
        for pid, st in opt["state"].items():
            for key, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(kb["optimizers"][role]["state"][pid][key]))
    assert ka["state"]["method"] == kb["state"]["method"]
    # the student's file against its full network (fp32, what a full student's checkpoint would hold)
    student_file = (last["a"] / "modules" / "student.safetensors").stat().st_size
    full = sum(q.numel() * 4 for q in a.method.student.parameters())
    assert student_file < 0.1 * full, (student_file, full)
    # the exported students of both runs are the same
    for f in ("model/unet", "model/transformer", "model/lora"):
        pa = tmp_path / "a" / f
        for file in (pa.glob("*.safetensors") if pa.is_dir() else []):
            from safetensors.torch import load_file

            sa, sb = load_file(str(file)), load_file(str(tmp_path / "b" / f / file.name))
            assert all(torch.equal(v, sb[k]) for k, v in sa.items())


@pytest.mark.parametrize("kind", ["sd", "sd3"])
@pytest.mark.parametrize("method", ["consistency", "progressive", "adversarial"])
def test_fused_and_lora_exports_load_in_stock_diffusers(tiny_pipelines, caption_data, tmp_path, kind, method,
                                                        one_thread):
    import diffusers
    from diffusers import DiffusionPipeline

    from distill.export import parity
    from distill.pipelines import load_kwargs
    from distill.models import lora_model
    from distill.pipelines import load_pipeline

    teacher = tiny_pipelines[kind]
    t = make(method, teacher, caption_data, tmp_path / "run", *RANK, "student.lora.alpha=8")
    t.fit()
    model, lora = tmp_path / "run" / "model", tmp_path / "run" / "model" / "lora"
    assert sorted(p.name for p in lora.iterdir()) == ["distill.json", "pytorch_lora_weights.safetensors",
                                                      "scheduler_config.json"]
    info = json.loads((lora / "distill.json").read_text())
    assert info["teacher"] == str(teacher.resolve()) and info["lora"]["rank"] == 4 and info["lora"]["alpha"] == 8
    assert info["steps"] == json.loads((model / "distill.json").read_text())["steps"]
    sched = json.loads((lora / "scheduler_config.json").read_text())
    assert sched == json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    for folder in (model, lora):
        for k, diff in parity(folder, n=2).items():
            assert diff <= 1e-4, (folder.name, k, diff)
    # distill's reading of the LoRA folder is the trained student
    exported = t.method.export_denoiser()
    p = load_pipeline(teacher)
    cond = p.encode_prompts(["a red seven", "a blue two"])
    x = torch.randn(2, *p.sample_shape, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.5, 4.0])
    with torch.no_grad():
        ours, read = exported(x, s, **cond), lora_model(lora).denoiser(x, s, **cond)
    torch.testing.assert_close(read, ours, rtol=1e-5, atol=1e-5)
    from safetensors.torch import load_file

    weights = load_file(str(lora / "pytorch_lora_weights.safetensors"))
    prefix = "unet." if kind == "sd" else "transformer."
    assert all(k.startswith(prefix) for k in weights)
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in weights.items())  # trained: B left zero
    # what docs/lora.md tells a user to write, against the fused pipeline
    pipe = DiffusionPipeline.from_pretrained(teacher, **load_kwargs(teacher))
    pipe.load_lora_weights(lora)
    pipe.scheduler = getattr(diffusers, sched["_class_name"]).from_pretrained(lora)
    fused = DiffusionPipeline.from_pretrained(model, **load_kwargs(model))
    assert type(pipe.scheduler) is type(fused.scheduler)
    steps = info["steps"][-1]
    outs = []
    short = {"max_sequence_length": 8} if kind == "sd3" else {}  # no T5: zeros after the CLIP tokens
    for pp in (pipe, fused):
        pp.set_progress_bar_config(disable=True)
        torch.manual_seed(0)  # FlowMatchLCMScheduler re-noises from the global stream
        outs.append(pp(["a red seven", "a blue two"], num_inference_steps=steps, guidance_scale=1.0,
                       output_type="latent", generator=torch.Generator().manual_seed(0), **short).images)
    scale = max(1.0, float(outs[1].abs().max()))
    assert float((outs[0] - outs[1]).abs().max()) / scale <= 1e-4


def test_digits_unet_lora_student(tiny_teacher, tmp_path, one_thread):
    """An unconditional UNet2DModel teacher: the default targets adapt its attention and resnet convolutions; its
    LoRA file is written (DDPMPipeline has no LoRA loader in diffusers, which the folder says) and reads back as the
    trained student."""
    from distill.export import parity
    from distill.models import lora_model

    t = make("consistency", tiny_teacher, None, tmp_path / "run", *RANK, "trainer.batch_size=8")
    names = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, q in t.method.student.named_parameters() if q.requires_grad}
    assert {"to_q", "to_k", "to_v", "0", "conv1", "conv2"} <= names
    t.fit()
    lora = tmp_path / "run" / "model" / "lora"
    info = json.loads((lora / "distill.json").read_text())
    assert info["lora"]["stock_loader"] is False and info["pipeline"] == "DDPMPipeline"
    for k, diff in parity(tmp_path / "run" / "model", n=4).items():
        assert diff <= 1e-4, (k, diff)
    with pytest.raises(DistillError, match="no LoRA loader"):
        parity(lora, n=2)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.1, 1.0, 5.0, 50.0])
    with torch.no_grad():
        torch.testing.assert_close(lora_model(lora).denoiser(x, s), t.method.target(x, s), rtol=1e-5, atol=1e-5)


def test_bad_lora_configs_are_refused(tiny_pipelines, caption_data, tmp_path):
    recipe = ROOT / "recipes" / "digits" / "consistency.yaml"
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe, ["student.lora.rank=0", "student.lora.alpha=-1", "student.lora.target_modules=[]"])
    msg = str(err.value)
    assert "student.lora.rank must be >= 1" in msg and "student.lora.alpha must be > 0" in msg
    assert "student.lora.target_modules must be a non-empty list" in msg
    with pytest.raises(ConfigError, match=r"student.lora.rnak: unknown key \(did you mean 'rank'\?\)"):
        load_recipe(recipe, ["student.lora.rnak=4"])
    with pytest.raises(ConfigError, match="student.lora: method 'teacher' trains its network in full"):
        load_recipe(ROOT / "recipes" / "digits" / "teacher.yaml", ["student.lora.rank=4"])
    assert load_recipe(recipe, ["student.lora.rank=4"]).to_dict()["student"]["lora"]["rank"] == 4
    assert "student" not in load_recipe(recipe).to_dict()  # full students keep their resolved config as before
    teacher = tiny_pipelines["sd"]
    with pytest.raises(DistillError, match=r"to_qq match no module .* to_q, to_k"):
        make("consistency", teacher, caption_data, tmp_path / "a", *RANK, "student.lora.target_modules=[to_q, to_qq]")
    with pytest.raises(DistillError, match="LoRA adapts Linear and Conv2d layers only"):
        make("consistency", teacher, caption_data, tmp_path / "b", *RANK, "student.lora.target_modules=[norm1]")
    t = make("consistency", teacher, caption_data, tmp_path / "c", *RANK, "student.lora.target_modules=[to_q]")
    adapted = {n.split(".lora_")[0] for n, q in t.method.student.named_parameters() if q.requires_grad}
    assert adapted and all(n.endswith("to_q") for n in adapted)


@pytest.mark.slow
def test_two_processes_train_a_lora_student_like_one(tmp_path, tiny_teacher):
    """DDP wraps only the adapters' module; the shared frozen base is broadcast in place. 2 processes (gloo) at
    batch 8 train like 1 at 16, within 1e-5 after 4 steps (the settings of tests/test_distributed.py)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from distill.checkpoint import list_checkpoints
    from test_distributed import TORCHRUN, _overrides, _port

    def run(launcher: list[str], out: Path, batch: int) -> dict[str, dict[str, torch.Tensor]]:
        cmd = [*launcher, "-m", "distill.cli", "run", str(ROOT / "recipes" / "digits" / "adversarial.yaml"),
               "--out", str(out), *_overrides(tiny_teacher), f"trainer.batch_size={batch}", *RANK]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        last = list_checkpoints(out / "checkpoints")[-1]
        return {p.stem: load_file(str(p)) for p in (last / "modules").glob("*.safetensors")}

    one = run([sys.executable], tmp_path / "one", 16)
    two = run([*TORCHRUN, "--master_port", _port()], tmp_path / "two", 8)
    assert set(one) == {"student", "disc", "student_ema"} == set(two)
    assert all(".lora_" in k for k in one["student"])
    assert max((v - two[m][k]).abs().max().item() for m in one for k, v in one[m].items()) < 1e-5
    assert max(v.abs().max().item() for k, v in one["student"].items() if ".lora_B." in k) > 1e-4  # it trained
