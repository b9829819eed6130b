"""Tiny random diffusers pipelines built from config, fully offline, for distill's tests.

diffusers' own tests build tiny pipelines the same way, but around ``hf-internal-testing/tiny-random-clip`` from
the Hub; here the CLIP tokenizer comes from :func:`distill.text.build_clip_tokenizer` (vocabulary
:data:`WORDS`, ``model_max_length`` 16), so nothing is downloaded. Each ``save_tiny_*`` function builds one
pipeline from a fixed seed, perturbs every network parameter with ``0.05 * N(0, 1)`` noise (random init leaves
zero-initialised layers -- adaLN-zero modulations, zero-init output projections and convolutions -- that make
outputs independent of the input, which would make parity tests pass vacuously), and writes it with
``save_pretrained(folder, safe_serialization=True)``. The same seed gives bit-identical weights on every call;
builders leave the global torch RNG as they found it.

Images are 16x16 and latents 8x8 (VAEs downsample once), 4 latent channels everywhere. Parameter counts (text
encoders with the 613-token vocabulary of :data:`WORDS`)::

    SD      UNet2DConditionModel 203,204    AutoencoderKL 43,711    CLIPTextModel 33,770
    SDXL    UNet2DConditionModel 270,900    AutoencoderKL 43,711    CLIPTextModel 33,770
                                                                    CLIPTextModelWithProjection 34,794
    SD3     SD3Transformer2DModel 79,696    AutoencoderKL 43,619    CLIPTextModelWithProjection 34,794 (x2)
    DiT     Transformer2DModel 51,856       AutoencoderKL 43,711    (16,016 of DiT's are its 1001-row label table)
    DDPM    UNet2DModel 176,849
    T2V     UNet3DConditionModel 88,580 AutoencoderKL 43,711    CLIPTextModel 33,770

The text-to-video pipeline (:func:`save_tiny_t2v`, not in :data:`BUILDERS`: only the video tests build it) makes
clips of 8x8 frames from 4x4x4 latents per frame; its UNet takes clips of any length.

A forward pass of any of these networks on a batch of 4 takes 1-7 ms on one CPU core (UNets ~6 ms, transformers
~1.5 ms, VAE decode ~3 ms, CLIP <1 ms).

Loading (diffusers 0.42.1, transformers 5.24.0, ``HF_HUB_OFFLINE=1``):

* SD, SDXL, DiT, DDPM: ``DiffusionPipeline.from_pretrained(folder)``. SD's ``model_index.json`` holds
  ``"safety_checker": [null, null]``, ``"feature_extractor": [null, null]`` and
  ``"requires_safety_checker": false``; both are optional components, so they load as ``None`` silently.
* DiT: the folder is written with ``Transformer2DModel`` (as ``facebook/DiT-XL-2-256`` on the Hub is), and
  diffusers remaps that class on load: the loaded ``pipe.transformer`` is a ``DiTTransformer2DModel`` with the
  same weights.
* SD3 without T5: ``model_index.json`` holds ``"text_encoder_3": [null, null]`` and
  ``"tokenizer_3": [null, null]``. In diffusers 0.42.1 these are not optional components of
  ``StableDiffusion3Pipeline``, so
  ``DiffusionPipeline.from_pretrained(folder)`` (or ``StableDiffusion3Pipeline.from_pretrained(folder)``)
  fails with ``ValueError: Pipeline <class '...StableDiffusion3Pipeline'> expected {..., 'text_encoder_3',
  'tokenizer_3', ...}, but only {...} were passed.``; it loads with
  ``DiffusionPipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)`` (same for
  ``StableDiffusion3Pipeline.from_pretrained``). The pipeline then feeds the transformer zeros in place of T5's
  embeddings: ``max_sequence_length`` (default 256) zero tokens of width ``joint_attention_dim`` after the 16
  CLIP tokens; pass ``max_sequence_length=8`` or so to keep calls fast. ``SD3_LOAD_KWARGS`` holds those kwargs.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

# The tokenizer's whole words; any other text still tokenizes, one byte symbol per token.
WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "photo", "picture", "drawing", "digit", "number", "handwritten",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "red", "green", "blue", "black", "white", "small", "big", "cat", "dog", "on", "in", "with", "and",
)
MODEL_MAX_LENGTH = 16  # tokens per prompt; SD uses 77, 16 keeps the text encoders' attention tiny
NUM_CLASSES = 1000  # DiT classes; must be 1000, see save_tiny_dit
SD3_LOAD_KWARGS: dict[str, Any] = {"text_encoder_3": None, "tokenizer_3": None}
PERTURB = 0.05


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG (network constructors draw their init from it) and restore it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add ``PERTURB * N(0, 1)`` to every parameter (own generator: independent of anything else drawn)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(PERTURB * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module.eval()


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tokenizer(folder: Path) -> Any:
    """The offline CLIP tokenizer, written where the pipeline will save it.

    The pipeline's save_pretrained adds ``tokenizer.json`` (transformers 5 writes only that and
    ``tokenizer_config.json``); building in place keeps ``vocab.json`` and ``merges.txt`` next to it, as in
    Stable Diffusion's own tokenizer folders.
    """
    from distill.text import build_clip_tokenizer

    return build_clip_tokenizer(WORDS, folder, model_max_length=MODEL_MAX_LENGTH)


def _clip(tokenizer: Any, seed: int, with_projection: bool) -> Any:
    """A 2-layer, 32-wide CLIP text encoder (projection 32) matching ``tokenizer``'s ids."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from distill.text import tiny_clip_text_config

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with _seeded(seed):
        model = cls(tiny_clip_text_config(tokenizer))
    return _perturb(model, seed + 1)


def _vae(seed: int, **overrides: Any) -> Any:
    """An AutoencoderKL 3 -> 4 channels that downsamples once: 16x16 images, 8x8 latents."""
    from diffusers import AutoencoderKL

    kwargs: dict[str, Any] = dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16,
    )
    kwargs.update(overrides)
    with _seeded(seed):
        vae = AutoencoderKL(**kwargs)
    return _perturb(vae, seed + 1)


def _cond_unet(seed: int, **overrides: Any) -> Any:
    """An SD-1.5-shaped UNet2DConditionModel on 4x8x8 latents."""
    from diffusers import UNet2DConditionModel

    kwargs: dict[str, Any] = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        # UNet2DConditionModel's "attention_head_dim" is (for legacy reasons) the number of heads: head dim 8.
        attention_head_dim=(2, 4), norm_num_groups=8, cross_attention_dim=32,
    )
    kwargs.update(overrides)
    with _seeded(seed):
        unet = UNet2DConditionModel(**kwargs)
    return _perturb(unet, seed + 1)


def _save(pipe: Any, folder: str | Path) -> Path:
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_sd(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A Stable-Diffusion-1.5-shaped pipeline: CLIPTextModel, UNet2DConditionModel, AutoencoderKL, DDPMScheduler.

    The scheduler has SD's training noise schedule (scaled_linear betas 0.00085..0.012, "leading" spacing,
    steps_offset 1); no safety checker. Default size 16x16 (unet.sample_size 8 x vae_scale_factor 2).
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    tokenizer = _tokenizer(Path(folder) / "tokenizer")
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, clip_sample=False, steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(seed + 10), text_encoder=_clip(tokenizer, seed + 20, False), tokenizer=tokenizer,
        unet=_cond_unet(seed), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _save(pipe, folder)


def save_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """A Stable-Diffusion-XL-shaped pipeline: CLIPTextModel + CLIPTextModelWithProjection, "text_time" UNet.

    Cross-attention width 64 = 32 (encoder 1) + 32 (encoder 2); the added condition is encoder 2's 32-dim pooled
    projection plus 6 size/crop numbers embedded with 8 dims each, so projection_class_embeddings_input_dim is
    32 + 6 * 8 = 80. EulerDiscreteScheduler with SDXL-base's config; ``force_zeros_for_empty_prompt`` is left at
    its default (True: the unconditional embedding for an empty negative prompt is zeros, not the encoded "").
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = _tokenizer(Path(folder) / "tokenizer"), _tokenizer(Path(folder) / "tokenizer_2")
    unet = _cond_unet(
        seed,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
        use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed + 10, scaling_factor=0.13025),
        text_encoder=_clip(tokenizer, seed + 20, False), text_encoder_2=_clip(tokenizer_2, seed + 30, True),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )
    return _save(pipe, folder)


def save_tiny_sd3(folder: str | Path, seed: int = 0) -> Path:
    """A Stable-Diffusion-3-shaped pipeline without T5: two CLIPTextModelWithProjection, SD3Transformer2DModel.

    joint_attention_dim 64 = 32 + 32, the width of the two CLIP encoders' concatenated hidden states (the
    pipeline zero-pads them to joint_attention_dim, and would silently crop them were it narrower, as diffusers'
    own SD3 test config with joint_attention_dim 32 does); pooled_projection_dim 64 = 32 + 32, their projections.
    4 latent channels (SD3's VAE has 16), patch size 2, so 16 image tokens. The VAE has SD3's scaling and shift
    factors and no quant convs; the pipeline decodes ``latents / scaling_factor + shift_factor`` and fails on a
    ``None`` shift_factor. Load it with :data:`SD3_LOAD_KWARGS` (see the module docstring).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2 = _tokenizer(Path(folder) / "tokenizer"), _tokenizer(Path(folder) / "tokenizer_2")
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
            pooled_projection_dim=64, pos_embed_max_size=8,
        )
    transformer = _perturb(transformer, seed + 1)
    vae = _vae(seed + 10, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=_clip(tokenizer, seed + 20, True), tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer_2, seed + 30, True), tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
    )
    return _save(pipe, folder)


def save_tiny_dit(folder: str | Path, seed: int = 0) -> Path:
    """A DiT-shaped pipeline: class-conditional Transformer2DModel (adaLN-zero, learned sigma), AutoencoderKL, DDIM.

    ``num_embeds_ada_norm`` is 1000, as ImageNet's: DiTPipeline hard-codes the null class as label 1000 for
    classifier-free guidance (``guidance_scale > 1``, default 4), so the label table needs 1000 classes plus the
    null row, or guided sampling fails with an IndexError. out_channels = 2 x in_channels (learned variance);
    the pipeline guides only the first ``in_channels`` output channels and drops the rest. ``id2label`` names a
    few classes so ``pipe.get_label_ids`` works. DDIMScheduler with DiT-XL-2-256's config.
    """
    from diffusers import DDIMScheduler, DiTPipeline, Transformer2DModel

    with _seeded(seed):
        transformer = Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
            num_attention_heads=2, attention_head_dim=8, attention_bias=True, activation_fn="gelu-approximate",
            num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero", norm_elementwise_affine=False,
        )
    transformer = _perturb(transformer, seed + 1)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    id2label = {str(i): name for i, name in enumerate(WORDS[10:20])}  # "0": "zero", ..., "9": "nine"
    pipe = DiTPipeline(transformer=transformer, vae=_vae(seed + 10), scheduler=scheduler, id2label=id2label)
    folder = _save(pipe, folder)
    # DiTPipeline does not register id2label, so save_pretrained drops it; from_pretrained passes it back to
    # __init__ when model_index.json holds it (as facebook/DiT-XL-2-256's does), so write it there.
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["id2label"] = id2label
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def save_tiny_ddpm(folder: str | Path, seed: int = 0) -> Path:
    """An unconditional pixel-space DDPMPipeline: 1-channel 8x8 UNet2DModel, cosine v-prediction DDPMScheduler."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    with _seeded(seed):
        unet = UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8, attention_head_dim=8,
        )
    unet = _perturb(unet, seed + 1)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction", clip_sample=False)
    return _save(DDPMPipeline(unet=unet, scheduler=scheduler), folder)


def save_tiny_t2v(folder: str | Path, seed: int = 0) -> Path:
    """A ModelScope-text-to-video-shaped ``TextToVideoSDPipeline``: CLIPTextModel, UNet3DConditionModel on latent
    clips (4, F, 4, 4) of any length F, the SD-shaped AutoencoderKL applied to each frame (8x8 frames: the stock
    pipeline needs sizes divisible by 8), and
    DDPMScheduler with SD's training schedule.

    ``TextToVideoSDPipeline`` is deprecated in diffusers (no fixes after 0.33.1; it warns when built) and still
    loads and runs in 0.42.1. UNet3DConditionModel's ``attention_head_dim`` is its number of heads (as in
    UNet2DConditionModel); its ``transformer_in`` has 8 heads of that width.
    """
    from diffusers import DDPMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    tokenizer = _tokenizer(Path(folder) / "tokenizer")
    with _seeded(seed):
        unet = UNet3DConditionModel(
            sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
            attention_head_dim=2, norm_num_groups=4, cross_attention_dim=32,
        )
    unet = _perturb(unet, seed + 1)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1, timestep_spacing="leading",
    )
    pipe = TextToVideoSDPipeline(vae=_vae(seed + 10, sample_size=8), text_encoder=_clip(tokenizer, seed + 20, False),
                                 tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    return _save(pipe, folder)


BUILDERS = {"sd": save_tiny_sd, "sdxl": save_tiny_sdxl, "sd3": save_tiny_sd3, "dit": save_tiny_dit,
            "ddpm": save_tiny_ddpm}
