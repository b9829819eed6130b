"""Students and teachers out as stock diffusers pipeline folders, of the teacher's own pipeline class.

A student keeps its teacher's pipeline: the network (``unet/`` or ``transformer/``) is the student's, the scheduler a
stock one that samples it, and every other component (VAE, text encoders, tokenizers) is copied from the teacher's
folder unchanged, so ``DiffusionPipeline.from_pretrained(folder)`` gives the same class as the teacher's:

| student | VP teacher (DDPM, SD, SDXL, DiT) | flow teacher (SD3) |
|---|---|---|
| samples with DDIM (progressive) | ``DDIMScheduler``, trailing spacing | ``FlowMatchEulerDiscreteScheduler`` |
| consistency function (consistency, adversarial) | ``LCMScheduler`` (its boundary scalings) | ``FlowMatchLCMScheduler`` |
| a teacher | the teacher's own scheduler | the teacher's own scheduler |

A LoRA student (``student.lora``, :mod:`distill.lora`) is written twice: fused (its adapters merged into a copy
of the network) as the folder above, and as ``lora/`` inside it: ``pytorch_lora_weights.safetensors`` for
``pipe.load_lora_weights`` on the teacher's pipeline, the ``scheduler_config.json`` to swap in, and
``distill.json``. :func:`parity` checks either kind of folder.

Two things diffusers 0.42 needs for an SD3 folder without T5, both handled here or documented: its VAE config must
set ``shift_factor`` (the pipeline adds it when decoding; a null fails), which an export sets to 0 where null; and
such a folder loads only with ``from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)``
(:func:`distill.pipelines.load_kwargs`).
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.denoisers import ConsistencyDenoiser, DiffusersDenoiser
from distill.errors import DistillError
from distill.pipelines import NETWORK_FOLDERS, load_kwargs

LORA_FOLDER = "lora"  # a LoRA student's adapters, inside its fused pipeline folder


def stock_scheduler(denoiser: DiffusersDenoiser, consistency: bool, sampler: str | None,
                    original_inference_steps: int | None = None, timestep_scaling: float = 10.0) -> Any:
    """The stock diffusers scheduler that samples a network the way distill's sampler does (table above)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, LCMScheduler

    from distill.schedules import _scheduler_object

    kind = denoiser.schedule.kind

    def own(cls: type) -> dict[str, Any]:
        """The teacher's scheduler settings that ``cls`` takes: the others (a teacher's Euler or DPM options, a
        flow scheduler's ``stochastic_sampling``) would be written to the student's scheduler_config.json, and
        diffusers warns about each on every load."""
        params = inspect.signature(cls.__init__).parameters
        return {k: v for k, v in denoiser.scheduler_config.items() if k in params}

    if consistency:
        if kind == "flow":
            return FlowMatchLCMScheduler.from_config(own(FlowMatchLCMScheduler))
        if kind != "vp":
            raise DistillError(f"a consistency student of a {kind} teacher has no stock scheduler to export with.")
        kwargs = {"original_inference_steps": original_inference_steps} if original_inference_steps else {}
        return LCMScheduler.from_config(own(LCMScheduler), timestep_scaling=timestep_scaling, clip_sample=False,
                                        thresholding=False, set_alpha_to_one=True, timestep_spacing="trailing",
                                        prediction_type=denoiser.prediction_type, **kwargs)
    if sampler == "ddim":
        if kind == "flow":
            return FlowMatchEulerDiscreteScheduler.from_config(own(FlowMatchEulerDiscreteScheduler))  # flow Euler: DDIM
        return DDIMScheduler.from_config(own(DDIMScheduler), timestep_spacing="trailing", clip_sample=False,
                                         set_alpha_to_one=True, prediction_type=denoiser.prediction_type)
    return _scheduler_object(denoiser.scheduler_config, "DDPMScheduler")


def save_pipeline(denoiser: nn.Module, folder: str | Path, sampler: str | None = None,
                  original_inference_steps: int | None = None, *, guidance: float | None = None,
                  source: str | Path | None = None) -> Path:
    """Write ``denoiser`` as a pipeline folder of its teacher's class (``model_index.json``, the network, a stock
    scheduler, the teacher's other components); weights are safetensors.

    ``source`` is the teacher's pipeline folder (default: the one the denoiser was loaded from; a bare UNet2DModel
    denoiser without one becomes a ``DDPMPipeline``). A transformer student with a guidance embedding gets
    ``guidance`` (its ``w``) baked into its network, since stock pipelines have no guidance input for it.
    """
    from diffusers import DDPMPipeline

    from distill.guidance import bake_guidance
    from distill.lora import is_lora, merged

    folder = Path(folder)
    if is_lora(denoiser):  # a LoRA student: the adapters merged into a copy of the network
        denoiser = merged(denoiser)
    consistency = isinstance(denoiser, ConsistencyDenoiser)
    inner = denoiser.inner if consistency else denoiser
    if not isinstance(inner, DiffusersDenoiser):
        raise DistillError(f"only diffusers-backed denoisers can be exported, got {type(denoiser).__name__}.")
    if hasattr(inner, "guidance_embedder"):
        if guidance is None:
            raise DistillError("a guidance-embedded transformer student is exported at one guidance scale; pass "
                               "guidance=w (distill.json records it).")
        inner = bake_guidance(inner, guidance)
    scaling = denoiser.timestep_scaling if consistency else 10.0
    scheduler = stock_scheduler(inner, consistency, sampler, original_inference_steps, scaling)
    net = inner.net
    source = Path(source) if source is not None else (Path(inner.source) if inner.source else None)
    if source is None or not (source / "model_index.json").is_file():
        # an unconditional network without a folder of its own goes into the stock unconditional pipeline's layout;
        # DDPMPipeline samples (B, C, H, W) images only, so a 1-D (audio-rank) network's folder is for distill to
        # load and sample (distill.models, distill sample), and the parity check says it cannot sample it
        if type(net).__name__ not in ("UNet2DModel", "UNet1DModel"):
            raise DistillError(f"a {type(net).__name__} is exported into its teacher's pipeline folder layout; the "
                               "denoiser does not know the folder it came from (load it with distill.load_denoiser).")
        DDPMPipeline(unet=net, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
        return folder
    if folder.resolve() == source.resolve():
        raise DistillError(f"{folder} is the teacher's own folder; export the student somewhere else.")
    index = json.loads((source / "model_index.json").read_text())
    net_name = next((k for k in NETWORK_FOLDERS if isinstance(index.get(k), list) and index[k][0] is not None), None)
    if net_name is None:
        raise DistillError(f"{source}/model_index.json names no unet or transformer.")
    folder.mkdir(parents=True, exist_ok=True)
    for name, entry in index.items():
        if name.startswith("_") or name in (net_name, "scheduler") or not isinstance(entry, list) or entry[0] is None:
            continue
        if (source / name).is_dir():
            shutil.copytree(source / name, folder / name, dirs_exist_ok=True)
    net.save_pretrained(folder / net_name, safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    index[net_name] = ["diffusers", type(net).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    vae_cfg = folder / "vae" / "config.json"
    if index.get("_class_name") == "StableDiffusion3Pipeline" and vae_cfg.is_file():
        cfg = json.loads(vae_cfg.read_text())
        if cfg.get("shift_factor") is None:  # the SD3 pipeline decodes with latents / scale + shift_factor
            cfg["shift_factor"] = 0.0
            vae_cfg.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return folder


def save_student(denoiser: nn.Module, folder: str | Path, info: dict, *,
                 teacher: str | Path | None = None) -> Path:
    """A pipeline folder plus ``distill.json`` (method, sampler, step counts, sigma grids, the ``guidance`` to pass
    as ``guidance_scale``; for a transformer ``w``-student, whose ``w`` is baked into its network, 1 and
    ``baked_guidance: w``) for the harness and for users; a LoRA student also gets ``folder/lora/``
    (:func:`distill.lora.save_lora`; ``info["teacher"]`` names the teacher it applies to). Last, the model card
    ``README.md`` (:func:`distill.model_card.write_model_card`: the exact stock call, not yet any results);
    ``teacher`` (the recipe's teacher, hub id or folder) names its ``base_model``, by default ``info["teacher"]``
    or the folder the student's network was loaded from."""
    from distill.lora import is_lora, save_lora
    from distill.model_card import write_model_card

    inner = getattr(denoiser, "inner", denoiser)
    source = getattr(inner, "source", None)
    folder = save_pipeline(denoiser, folder, info.get("sampler"), info.get("original_inference_steps"),
                           guidance=info.get("guidance"))
    if hasattr(inner, "guidance_embedder") and info.get("guidance") is not None:
        # a transformer w-student: save_pipeline baked w into the exported network, whose conditional estimate is
        # now the guided one; classifier-free guidance on top would guide twice, so the folder is sampled at 1
        # (info is updated in place: the caller's card and evaluation read the same values as distill.json)
        info["baked_guidance"], info["guidance"] = info["guidance"], 1.0
    (folder / "distill.json").write_text(json.dumps(info, indent=1))
    if is_lora(denoiser):
        save_lora(denoiser, folder / LORA_FOLDER, info, folder / "scheduler" / "scheduler_config.json",
                  info.get("teacher"))
    write_model_card(folder, info, teacher=teacher or info.get("teacher") or source)
    return folder


def _stock_call_kwargs(class_name: str, n: int, prompts: list[str] | None, labels: list[int] | None,
                       guidance: float | None) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if prompts is not None:
        kw["prompt"] = [prompts[i % len(prompts)] for i in range(n)]
    elif labels is not None:
        kw["class_labels"] = [labels[i % len(labels)] for i in range(n)]
    else:
        kw["batch_size"] = n
    if class_name != "DDPMPipeline":
        kw["guidance_scale"] = 1.0 if guidance is None else float(guidance)
    return kw


def parity(folder: str | Path, steps: list[int] | None = None, n: int = 4, seed: int = 0,
           prompts: list[str] | None = None, labels: list[int] | None = None,
           guidance: float | None = None, teacher: str | Path | None = None) -> dict[int, float]:
    """How far the stock diffusers pipeline is from distill's own sampler on the same inputs.

    For each step count ``k`` (default: every count a student supports; 1, 2, 4, 8 for a teacher) this runs
    ``DiffusionPipeline.from_pretrained(folder)`` at ``num_inference_steps=k`` and distill's sampler for the folder
    (DDIM for a progressive student or a teacher, whose stock scheduler is swapped for DDIM with trailing spacing;
    multistep consistency for a consistency or adversarial student) from the same unit noise, with the same
    generator for any re-noising, and returns the max abs difference of the outputs: images in [0, 1] for pixel
    pipelines and DiT (which returns no latents), latents for SD, SDXL, SD3 and TextToVideoSD (passed in as
    ``latents=``; a video pipeline's clips have :attr:`~distill.pipelines.TeacherPipeline.num_frames` frames).
    Conditional pipelines get ``prompts`` (default two fixed ones) or class ``labels`` (default 0, 1, ...), and
    ``guidance`` (default: the student's ``distill.json`` value, else 1) as ``guidance_scale``; distill applies
    it with :class:`~distill.guidance.CFGDenoiser`, or feeds it to a guidance-embedded student.

    A LoRA folder (``pytorch_lora_weights.safetensors`` beside ``scheduler_config.json``, :mod:`distill.lora`)
    is checked the way a user loads it: the stock side is ``DiffusionPipeline.from_pretrained(teacher)`` with
    ``load_lora_weights(folder)`` and that scheduler, distill's side the teacher's network with the adapters
    injected by peft (``teacher`` defaults to the one its ``distill.json`` names).
    """
    from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from distill.models import open_model
    from distill.eval.sweep import sigma_grid
    from distill.guidance import CFGDenoiser
    from distill.samplers import get_sampler
    from distill.schedules import scale_noise

    from distill.lora import is_lora_folder
    from distill.models import lora_model, stock_lora_pipeline

    if is_lora_folder(folder):
        m, pipe = lora_model(folder, teacher), stock_lora_pipeline(folder, teacher)
    else:
        m, pipe = open_model(folder), DiffusionPipeline.from_pretrained(folder, **load_kwargs(folder))
    D, pipe_info = m.denoiser, m.pipeline
    cls = pipe_info.class_name
    shape = (n, *pipe_info.sample_shape)
    if len(shape) != 4 and not pipe_info.spec.vae_per_frame:  # image pipelines draw (B, C, H, W) noise
        raise DistillError(f"{folder} holds a network of {'x'.join(map(str, shape[1:]))} samples; the parity check "
                           f"compares {cls}'s images (B, C, H, W) and cannot sample it.")
    pipe.set_progress_bar_config(disable=True)
    if m.method == "teacher":  # a teacher keeps its own scheduler; compare DDIM with diffusers' own DDIM
        if D.schedule.kind == "flow":
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        else:
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                       clip_sample=False, set_alpha_to_one=True)
    sample = get_sampler(m.samplers[0] if m.method != "teacher" else "ddim")
    w = guidance if guidance is not None else m.guidance
    cond: dict[str, torch.Tensor] = {}
    if pipe_info.conditioning == "text":
        prompts = list(prompts or ["a red seven", "the digit two in blue"])
        cond = pipe_info.encode_prompts([prompts[i % len(prompts)] for i in range(n)])
        labels = None
    elif pipe_info.conditioning == "class":
        labels = list(labels or range(n))
        cond = pipe_info.labels([labels[i % len(labels)] for i in range(n)])
        prompts = None
    else:
        prompts = labels = None
    call = _stock_call_kwargs(cls, n, prompts, labels, w)
    if pipe_info.any_frames:  # a video pipeline: clips of the folder's length (its latents are passed in)
        call["num_frames"] = shape[2]
    model: Any = D
    if cond and D.takes_guidance:
        cond["guidance"] = torch.full((n,), 1.0 if w is None else float(w))
    elif cond and w is not None and w > 1:
        model = CFGDenoiser(D, pipe_info.unconditional(), float(w))
    takes_latents = "latents" in inspect.signature(pipe.__call__).parameters
    meta_path = Path(folder) / "distill.json"
    stock_sigmas = json.loads(meta_path.read_text()).get("scheduler_sigmas", {}) if meta_path.is_file() else {}
    out: dict[int, float] = {}
    for k in steps or list(m.steps or (1, 2, 4, 8)):
        extra = {"sigmas": stock_sigmas[str(k)]} if str(k) in stock_sigmas else {}
        sigmas = torch.tensor(m.sigmas[k], dtype=torch.float64) if k in m.sigmas else sigma_grid(D, k, "trailing")
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            z = torch.randn(shape, generator=g)
            if takes_latents:
                # the pipeline starts from these latents; re-noising draws from a fresh generator on both sides.
                # The stock SD3 pipeline does not pass its generator to the scheduler's step, so FlowMatchLCM draws
                # from torch's global stream: seed that too (a user reproduces it with torch.manual_seed)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    theirs = pipe(**call, **extra, num_inference_steps=k, latents=z, output_type="latent",
                                  generator=torch.Generator().manual_seed(seed))[0]  # .images, a video's .frames
                g = torch.Generator().manual_seed(seed)
            else:  # DDPMPipeline, DiTPipeline: they draw the initial noise from the generator themselves (and
                # DiT's step draws any re-noising from the global stream)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    theirs = pipe(**call, num_inference_steps=k, generator=torch.Generator().manual_seed(seed),
                                  output_type="np").images
                if cls == "DiTPipeline":  # its re-noising came from the global stream, seeded afresh
                    g = torch.Generator().manual_seed(seed)
            c0 = D.schedule.c_in(sigmas[:1])
            x = scale_noise(z, sigmas[0]) if torch.isinf(sigmas[0]) else z / float(c0)
            ours = sample(model, x, sigmas, generator=g, cond=cond)
        if not takes_latents:
            ours = pipe_info.to_images(ours) if pipe_info.spec.latent else ours
            ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
            theirs = torch.as_tensor(theirs).numpy()
        else:
            theirs = torch.as_tensor(theirs)
            ours = ours.to(theirs.dtype)
            scale = max(1.0, float(abs(theirs).max()))
            out[k] = float(abs(ours - theirs).max()) / scale
            continue
        out[k] = float(abs(ours - theirs).max())
    return out
