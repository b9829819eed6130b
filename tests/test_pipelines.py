"""Teachers as whole diffusers pipelines: distill's samplers against the stock pipelines, and the bad-input errors.

Tiny random SD, SDXL, SD3 and DiT pipelines (``tests/tiny_pipelines.py``, built offline) are sampled by the stock
pipeline and by distill's sampler + classifier-free guidance wrapper from the same initial latents, prompts and
guidance scale, at 1, 4 and 20 steps: DDIM and Euler for the VP pipelines, flow Euler for SD3. The bound is 1e-4
of the output's scale (random networks' latents reach tens; ``close``), as in ``test_samplers_parity.py``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from distill.errors import DistillError
from distill.guidance import CFGDenoiser
from distill.pipelines import load_pipeline
from distill.samplers import sample_ddim, sample_euler
from distill.schedules import scale_noise

PROMPTS = ["a red seven", "the digit two in blue"]


def close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> bool:
    scale = max(1.0, ref.abs().max().item())
    return (ours - ref).abs().max().item() <= tol * scale


def _stock(folder, scheduler_cls, **scheduler_kwargs):
    from diffusers import DiffusionPipeline

    from distill.pipelines import load_kwargs

    pipe = DiffusionPipeline.from_pretrained(folder, **load_kwargs(folder))
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **scheduler_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(folder, sigmas, z, sampler, w, prompts=None, labels=None, ve_start=None):
    """distill's sampler from the stock pipeline's starting latents ``z``: a VP scheduler (DDIM) starts at
    ``x_t = z``, VE ``z / alpha``; Euler starts at VE ``z * init_noise_sigma`` (``ve_start``); a flow scheduler at
    ``t = 1`` with ``z`` itself, distill's state at sigma = inf."""
    p = load_pipeline(folder)
    D = p.load_denoiser().eval()
    cond = p.encode_prompts(prompts) if prompts is not None else p.labels(labels)
    model = CFGDenoiser(D, p.unconditional(), w) if w != 1 else D
    if ve_start is not None:
        x = z * ve_start
    else:
        x = scale_noise(z, float(sigmas[0])) if torch.isinf(sigmas[0]) else z / float(D.schedule.c_in(sigmas[:1]))
    with torch.no_grad():
        return sampler(model, x, sigmas, cond=cond)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_vp_text_pipelines_match_stock(tiny_pipelines, kind, steps, sampler, one_thread):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    folder = tiny_pipelines[kind]
    if sampler == "ddim":
        pipe = _stock(folder, DDIMScheduler, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    else:
        pipe = _stock(folder, EulerDiscreteScheduler, timestep_spacing="trailing")
    pipe.scheduler.set_timesteps(steps)
    if sampler == "ddim":
        sigmas = load_pipeline(folder).load_denoiser().schedule.grid(steps, "trailing")
    else:
        sigmas = pipe.scheduler.sigmas.double()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=3.0, latents=z.clone(), output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    start = None if sampler == "ddim" else float(pipe.scheduler.init_noise_sigma)
    ours = _ours(folder, sigmas, z, sample_ddim if sampler == "ddim" else sample_euler, 3.0, PROMPTS, ve_start=start)
    assert close(ours, ref), (ours - ref).abs().max()


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_sd3_flow_euler_matches_stock(tiny_pipelines, steps, one_thread):
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = tiny_pipelines["sd3"]
    pipe = _stock(folder, FlowMatchEulerDiscreteScheduler)
    sigmas = load_pipeline(folder).load_denoiser().schedule.grid(steps)
    assert torch.isinf(sigmas[0])  # t = 1: the flow's pure noise, carried as the unit noise itself
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=3.0, latents=z.clone(), output_type="latent").images
    for sampler in (sample_euler, sample_ddim):  # flow Euler is the DDIM step in VE sigmas
        ours = _ours(folder, sigmas, z, sampler, 3.0, PROMPTS)
        assert close(ours, ref), (ours - ref).abs().max()


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_dit_matches_stock(tiny_pipelines, steps, one_thread):
    from diffusers import DDIMScheduler

    folder = tiny_pipelines["dit"]
    pipe = _stock(folder, DDIMScheduler, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    sigmas = load_pipeline(folder).load_denoiser().schedule.grid(steps, "trailing")
    with torch.no_grad():
        # DiT draws its latents from the generator itself and returns decoded images in [0, 1]
        ref = pipe([3, 7], num_inference_steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(1),
                   output_type="pt").images
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    latents = _ours(folder, sigmas, z, sample_ddim, 3.0, labels=[3, 7])
    ours = (load_pipeline(folder).decode(latents) / 2 + 0.5).clamp(0, 1)
    assert close(ours, ref), (ours - ref).abs().max()


def test_guidance_is_one_batched_forward_and_w1_is_the_conditional_model(tiny_pipelines, one_thread):
    p = load_pipeline(tiny_pipelines["sd"])
    D = p.load_denoiser().eval()
    calls = []
    D.register_forward_hook(lambda m, args, kw, out: calls.append(args[0].shape[0]), with_kwargs=True)
    cond = p.encode_prompts(PROMPTS)
    x, s = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 3.0])
    with torch.no_grad():
        guided = CFGDenoiser(D, p.unconditional(), 5.0)(x, s, **cond)
        assert calls == [4]  # conditional and unconditional halves in one forward
        c, u = D(x, s, **cond), D(x, s, **{k: v.expand_as(cond[k]) for k, v in p.unconditional().items()})
        torch.testing.assert_close(guided, u + 5.0 * (c - u), rtol=1e-4, atol=1e-4)  # batch 4 vs 2 kernels
        calls.clear()
        torch.testing.assert_close(CFGDenoiser(D, p.unconditional(), 1.0)(x, s, **cond), c)
        assert calls == [2]  # w = 1: the conditional half alone


def test_pipeline_descriptions(tiny_pipelines):
    expect = {"ddpm": ("DDPMPipeline", None, False, "vp"), "sd": ("StableDiffusionPipeline", "text", True, "vp"),
              "sdxl": ("StableDiffusionXLPipeline", "text", True, "vp"),
              "sd3": ("StableDiffusion3Pipeline", "text", True, "flow"), "dit": ("DiTPipeline", "class", True, "vp")}
    for kind, (cls, cond, latent, schedule) in expect.items():
        p = load_pipeline(tiny_pipelines[kind])
        assert (p.class_name, p.conditioning, p.spec.latent) == (cls, cond, latent)
        assert p.load_denoiser().schedule.kind == schedule
    sdxl = load_pipeline(tiny_pipelines["sdxl"])
    u = sdxl.unconditional()
    assert float(u["encoder_hidden_states"].abs().max()) == 0  # force_zeros_for_empty_prompt, as the stock pipeline
    assert u["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]]
    assert load_pipeline(tiny_pipelines["dit"]).unconditional()["class_labels"].tolist() == [1000]


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_pipelines_are_refused_with_one_message(tiny_pipelines, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_pipelines["sd"], bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(DistillError, match="supports DDPMPipeline, StableDiffusionPipeline, StableDiffusionXL"):
        load_pipeline(bad)
    (bad / "model_index.json").write_text(json.dumps(index))
    vae = json.loads((bad / "vae" / "config.json").read_text())
    (bad / "vae" / "config.json").write_text(json.dumps({**vae, "latent_channels": 16}))
    with pytest.raises(DistillError, match="VAE makes 16-channel latents but the unet takes 4"):
        load_pipeline(bad)
    (bad / "vae" / "config.json").write_text(json.dumps(vae))
    for f in (bad / "text_encoder").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(DistillError, match="text_encoder.*no .safetensors"):
        load_pipeline(bad).encode_prompts(["a red seven"])
    shutil.rmtree(bad / "text_encoder")
    (bad / "text_encoder").mkdir()
    (bad / "text_encoder" / "config.json").write_text("{}")
    (bad / "text_encoder" / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(DistillError, match="cannot load text_encoder .* offline"):
        load_pipeline(bad).encode_prompts(["a red seven"])


@pytest.mark.parametrize("kind", ["ddpm", "sd", "sdxl", "sd3", "dit"])
def test_export_round_trip_keeps_the_pipeline_class(tiny_pipelines, tmp_path, kind, one_thread):
    """A loaded teacher written back out: the same pipeline class with every component, loadable by stock
    diffusers, sampling (DDIM / flow Euler, guidance 3 where conditional) as distill does."""
    from diffusers import DiffusionPipeline

    from distill.export import parity, save_pipeline
    from distill.pipelines import load_kwargs

    p = load_pipeline(tiny_pipelines[kind])
    out = save_pipeline(p.load_denoiser(), tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(out, **load_kwargs(out))
    assert type(pipe).__name__ == p.class_name
    w = None if kind == "ddpm" else 3.0
    for k, diff in parity(out, steps=[1, 4], n=2, guidance=w).items():
        assert diff <= 1e-4, (k, diff)
    with pytest.raises(DistillError, match="teacher's own folder"):
        save_pipeline(p.load_denoiser(), tiny_pipelines[kind])


@pytest.mark.parametrize("kind", ["sd", "sd3"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras", "unipc"])
def test_stock_solvers_match_the_stock_pipelines(tiny_pipelines, kind, name, one_thread):
    """The training-free baselines (DPM-Solver++(2M), with Karras sigmas, UniPC) run as diffusers runs them: with
    guidance 3 on the same latents, distill's driver matches the stock pipeline using that scheduler."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from distill.samplers import SAMPLERS, scheduler_sigmas, stock_scheduler

    if kind == "sd3" and name == "dpmpp_2m_karras":
        pytest.skip("Karras sigmas and flow sigmas are exclusive in diffusers' DPM-Solver")
    folder = tiny_pipelines[kind]
    p = load_pipeline(folder)
    D = p.load_denoiser().eval()
    sched = stock_scheduler(D, name)
    pipe = _stock(folder, DPMSolverMultistepScheduler if name.startswith("dpm") else UniPCMultistepScheduler)
    pipe.scheduler = type(sched).from_config(sched.config)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=6, guidance_scale=3.0, latents=z.clone(), output_type="latent").images
        sigmas = scheduler_sigmas(D, name, 6)
        x = z * float(pipe.scheduler.init_noise_sigma) / float(D.schedule.c_in(sigmas[:1]))
        ours = SAMPLERS[name](CFGDenoiser(D, p.unconditional(), 3.0), x, sigmas, cond=p.encode_prompts(PROMPTS))
    assert close(ours, ref), (ours - ref).abs().max()
