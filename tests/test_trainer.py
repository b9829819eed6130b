"""The shared trainer: a teacher run through the CLI, checkpoints, resume, accumulation, the NaN guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill import cli
from distill.checkpoint import list_checkpoints, load_checkpoint, verify
from distill.recipe import load_recipe
from distill.errors import DistillError
from distill.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "recipes" / "digits" / "teacher.yaml"
TINY = [
    "method.unet.block_out_channels=[16, 32]",
    "method.unet.down_block_types=[DownBlock2D, AttnDownBlock2D]",
    "method.unet.up_block_types=[AttnUpBlock2D, UpBlock2D]",
    "method.unet.norm_num_groups=8",
    "method.unet.attention_head_dim=8",
    "trainer.batch_size=32",
    "trainer.progress=false",
]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_teacher_cli_50_steps_loss_falls_and_every_parameter_changes(tmp_path):
    """The issue's check, on the shipped recipe's real architecture: loss falls, every parameter changed."""
    overrides = ["trainer.max_steps=50", "trainer.log_every=1", "trainer.progress=false"]
    init = Trainer(load_recipe(TEACHER, overrides), tmp_path / "init").method.denoiser.net.state_dict()
    out = tmp_path / "run"
    assert cli.main(["teacher", str(TEACHER), "--out", str(out), *overrides]) == 0
    rows = _rows(out)
    assert len(rows) == 50
    losses = [r["denoiser/loss"] for r in rows]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    trained = load_file(str(list_checkpoints(out / "checkpoints")[-1] / "modules" / "denoiser.safetensors"))
    unchanged = [k for k, v in init.items() if torch.equal(trained[f"net.{k}"], v)]
    assert not unchanged, f"parameters that did not change: {unchanged}"
    # the run folder layout, and the model loads in stock diffusers
    assert (out / "config.yaml").is_file()
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out / "model")
    img = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (2, 8, 8, 1)


def test_resume_continues_exactly(tmp_path):
    """N steps in one go == N/2 steps, a new Trainer resumed from the checkpoint, N/2 more (bitwise)."""
    base = [*TINY, "trainer.checkpoint_every=4"]
    a = Trainer(load_recipe(TEACHER, [*base, "trainer.max_steps=8"]), tmp_path / "a")
    a.fit()
    b = Trainer(load_recipe(TEACHER, [*base, "trainer.max_steps=4"]), tmp_path / "b")
    b.fit()
    b2 = Trainer(load_recipe(TEACHER, [*base, "trainer.max_steps=8"]), tmp_path / "b")
    assert b2.resume() and b2.step == 4
    b2.fit()
    sa = load_checkpoint(list_checkpoints(tmp_path / "a" / "checkpoints")[-1])
    sb = load_checkpoint(list_checkpoints(tmp_path / "b" / "checkpoints")[-1])
    for name in sa["modules"]:
        for k, v in sa["modules"][name].items():
            assert torch.equal(v, sb["modules"][name][k]), (name, k)
    for k, v in sa["optimizers"]["denoiser"]["state"].items():
        for kk, vv in v.items():
            assert torch.equal(torch.as_tensor(vv), torch.as_tensor(sb["optimizers"]["denoiser"]["state"][k][kk]))
    assert sa["state"]["epoch"] == sb["state"]["epoch"] and sa["state"]["offset"] == sb["state"]["offset"]


def test_checkpoints_rotate_and_are_verified(tmp_path):
    t = Trainer(load_recipe(TEACHER, [*TINY, "trainer.max_steps=6", "trainer.checkpoint_every=2",
                                      "trainer.keep_checkpoints=2"]), tmp_path)
    t.fit()
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000004", "step-00000006"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    weights = ckpts[-1] / "modules" / "denoiser.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(DistillError, match="damaged"):
        verify(ckpts[-1])


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    """grad_accum=4 over batch 32 gives the same first update as one batch of 32 (same samples, same noise)."""
    outs = {}
    for accum in (1, 4):
        t = Trainer(load_recipe(TEACHER, [*TINY, "trainer.max_steps=1", f"trainer.grad_accum={accum}",
                                          "method.optimizer.grad_clip=null", "method.optimizer.warmup_steps=0",
                                          "method.optimizer.eps=1.0", "method.optimizer.lr=1.0"]),
                    tmp_path / str(accum))
        init = {k: v.clone() for k, v in t.method.denoiser.state_dict().items()}
        # make the loss's randomness independent of how the batch is split: fixed t and noise per sample
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(32, 1, 8, 8, generator=g)
        tt = torch.randint(0, 1000, (32,), generator=g)
        pos = {"i": 0}

        def fake_randint(lo, hi, like):
            i = pos["i"]
            return tt[i : i + like.shape[0]]

        def fake_randn_like(x):
            i = pos["i"]
            pos["i"] += x.shape[0]
            return noise[i : i + x.shape[0]]

        t.method.randint, t.method.randn_like = fake_randint, fake_randn_like  # the method's random draws
        t.fit()
        outs[accum] = {k: v.clone() for k, v in t.method.denoiser.state_dict().items()}
    # With eps = 1 Adam's first update is g / (|g| + 1), smooth in the gradient g (with a tiny eps it is
    # about sign(g), which rounding in the summation order flips for near-zero gradients).
    moved = max((outs[1][k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-2
    for k in outs[1]:
        torch.testing.assert_close(outs[1][k], outs[4][k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("guard", ["sync", "device"])
def test_nonfinite_step_is_skipped(tmp_path, guard):
    """Skipped on the host (one flag read per update) or on the device (fused AdamW's found_inf, a masked EMA,
    the flags read with the metrics rows): either way weights, EMA and optimizer state stay as they were."""
    t = Trainer(load_recipe(TEACHER, [*TINY, "trainer.max_steps=3", "trainer.log_every=1",
                                      f"trainer.nonfinite_guard={guard}"]), tmp_path)
    assert t.device_guard == (guard == "device")
    orig = t.method.loss
    t.tc.max_steps = 1
    t.fit()  # one good step, so that the optimizer has state to keep
    t.tc.max_steps = 3
    before = {k: v.clone() for k, v in t.method.denoiser.state_dict().items()}
    ema_before = {k: v.clone() for k, v in t.method.denoiser_ema.state_dict().items()}
    opt_before = {pid: {k: v.clone() for k, v in st.items()} for pid, st in t.optimizers["denoiser"].state_dict()["state"].items()}

    def nan_loss(role, batch, step):
        loss, logs = orig(role, batch, step)
        return loss * float("nan"), logs

    t.method.loss = nan_loss
    result = t.fit()
    assert result["skipped"] == 2
    after = t.method.denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ema_after = t.method.denoiser_ema.state_dict()
    assert all(torch.equal(ema_before[k], ema_after[k]) for k in ema_before)
    opt_after = t.optimizers["denoiser"].state_dict()["state"]
    assert all(torch.equal(v, opt_after[pid][k]) for pid, st in opt_before.items() for k, v in st.items())
    assert _rows(tmp_path)[-1]["skipped"] == 2 and _rows(tmp_path)[-1]["denoiser/skipped"] == 1.0


def test_device_guard_trains_as_the_host_guard_and_resumes_exactly(tmp_path):
    """nonfinite_guard=device (the CUDA default) changes where the flag is read, not the training: fused AdamW and
    the masked EMA end within float rounding of the host-side guard's run, and a resume continues bitwise."""
    base = [*TINY, "trainer.checkpoint_every=2", "trainer.log_every=3", "method.optimizer.warmup_steps=0"]
    init = Trainer(load_recipe(TEACHER, [*base, "trainer.max_steps=4"]), tmp_path / "init").method.state_dict()
    ends = {}
    for guard in ("sync", "device"):
        t = Trainer(load_recipe(TEACHER, [*base, "trainer.max_steps=4", f"trainer.nonfinite_guard={guard}"]),
                    tmp_path / guard)
        t.fit()
        ends[guard] = {k: v.clone() for k, v in t.method.state_dict().items()}
    moved = max((ends["sync"][k].float() - init[k].float()).abs().max().item() for k in init)
    assert moved > 1e-3
    for k in ends["sync"]:
        torch.testing.assert_close(ends["device"][k], ends["sync"][k], rtol=1e-3, atol=5e-5)  # moved: > 1e-3
    half = Trainer(load_recipe(TEACHER, [*base, "trainer.max_steps=4", "trainer.nonfinite_guard=device"]),
                   tmp_path / "resumed")
    half.tc.max_steps = 2
    half.fit()
    resumed = Trainer(load_recipe(TEACHER, [*base, "trainer.max_steps=4", "trainer.nonfinite_guard=device"]),
                      tmp_path / "resumed")
    resumed.fit()
    assert resumed.optimizers["denoiser"].optimizer.param_groups[0]["fused"] is True
    got = resumed.method.state_dict()
    assert all(torch.equal(got[k], ends["device"][k]) for k in got)


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["teacher", str(TEACHER), "--out", str(tmp_path), "trainer.max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "trainer.max_stepz: unknown key" in err and "Traceback" not in err
    assert not (tmp_path / "config.yaml").exists()
    assert cli.main(["sample", str(tmp_path / "missing"), "--out", str(tmp_path / "g.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad"
    (bad / "scheduler").mkdir(parents=True)
    (bad / "unet").mkdir()
    (bad / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel", "sample_size": 8}')
    (bad / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": "flow"}')
    assert cli.main(["sample", str(bad), "--out", str(tmp_path / "g.png")]) == 2
    assert "prediction_type 'flow' is not supported" in capsys.readouterr().err
    assert cli.main(["sample", "someone/some-model", "--out", str(tmp_path / "g.png")]) == 2
    assert "hub is offline" in capsys.readouterr().err


def test_resume_falls_back_past_a_damaged_checkpoint_and_fresh_clears(tmp_path):
    base = [*TINY, "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=3"]
    Trainer(load_recipe(TEACHER, base), tmp_path).fit()
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    (newest / "state.json").write_text("{}")  # damaged after its manifest was written
    t = Trainer(load_recipe(TEACHER, [*TINY, "trainer.max_steps=6", "trainer.checkpoint_every=2"]), tmp_path)
    with pytest.warns(UserWarning, match="Falling back"):
        assert t.resume()
    assert t.step == 2
    # a resume into a run of another architecture is one clear error
    other = Trainer(load_recipe(TEACHER, [*TINY, "method.unet.block_out_channels=[8, 16]", "trainer.max_steps=6"]),
                    tmp_path)
    with pytest.warns(UserWarning), pytest.raises(DistillError, match="does not fit this recipe"):
        other.resume()
    # --fresh: the earlier run's checkpoints and logs are gone before the new run starts
    fresh = Trainer(load_recipe(TEACHER, [*TINY, "trainer.max_steps=1", "trainer.checkpoint_every=0"]), tmp_path)
    fresh.fit(resume=False)
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000001"]
    assert len(_rows(tmp_path)) == 1


def test_bf16_autocast_on_cpu_and_fp16_refused_without_a_gpu(tmp_path):
    t = Trainer(load_recipe(TEACHER, [*TINY, "trainer.max_steps=2", "trainer.mixed_precision=bf16"]), tmp_path / "bf16")
    seen = []
    orig = t.method.loss

    def spy(role, batch, step):
        loss, logs = orig(role, batch, step)
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return loss, logs

    t.method.loss = spy
    result = t.fit()
    assert seen and all(seen) and result["skipped"] == 0
    if not torch.cuda.is_available():
        with pytest.raises(DistillError, match="fp16 needs a CUDA GPU"):
            Trainer(load_recipe(TEACHER, [*TINY, "trainer.mixed_precision=fp16"]), tmp_path / "fp16")


def test_library_entry_point(tmp_path):
    import distill

    result = distill.train(load_recipe(TEACHER, [*TINY, "trainer.max_steps=2"]), tmp_path)
    assert result["step"] == 2 and (tmp_path / "model" / "model_index.json").is_file()
    assert distill.load_denoiser(tmp_path / "model").prediction_type == "v_prediction"


def test_fp16_grad_scaler_skips_an_inf_step_and_its_state_round_trips(tmp_path, monkeypatch):
    """The fp16 path: the grad scaler (not the NaN guard) skips an overflowing step, and its scale is checkpointed.

    accelerate makes a GradScaler for fp16 on GPUs only, so torch's CPU GradScaler stands in for it here: the
    trainer's scaler path (scaled backward, the scaler's own skip, the scale in checkpoints) runs without a GPU.
    """
    import accelerate

    orig_init = accelerate.Accelerator.__init__

    def with_scaler(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10_000)

    monkeypatch.setattr(accelerate.Accelerator, "__init__", with_scaler)
    cfg = [*TINY, "trainer.log_every=1", "trainer.checkpoint_every=0", "method.optimizer.grad_clip=null"]
    t = Trainer(load_recipe(TEACHER, [*cfg, "trainer.max_steps=1"]), tmp_path)
    assert t.accelerator.scaler is not None
    t.fit()
    assert t.accelerator.scaler.get_scale() == 2.0**12  # a finite step keeps the scale
    before = {k: v.clone() for k, v in t.method.denoiser.state_dict().items()}
    orig_loss = t.method.loss

    def inf_grads(role, batch, step):
        loss, logs = orig_loss(role, batch, step)
        return loss * float("inf"), logs

    t.method.loss = inf_grads
    t.tc.max_steps = 2
    result = t.fit()
    assert result["skipped"] == 1 and _rows(tmp_path)[-1]["denoiser/skipped"] == 1.0
    assert t.accelerator.scaler.get_scale() == 2.0**11  # the scaler skipped the step and halved its scale
    assert all(torch.equal(v, t.method.denoiser.state_dict()[k]) for k, v in before.items())
    assert load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])["state"]["scaler"]["scale"] == 2.0**11
    resumed = Trainer(load_recipe(TEACHER, [*cfg, "trainer.max_steps=3"]), tmp_path)
    assert resumed.accelerator.scaler.get_scale() == 2.0**12  # a new scaler starts at init_scale...
    assert resumed.resume() and resumed.accelerator.scaler.get_scale() == 2.0**11  # ...the checkpoint restores it
