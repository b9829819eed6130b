"""Samples of any rank go through the same code: an image [B, C, H, W], a video [B, C, F, H, W], audio [B, C, L].

Tiny video-rank and audio-rank denoisers through every sampler (the same numbers as the image layout of the same
values), data loading, evaluation with a toy feature extractor, media output, ``distill sample``, and one training
step of every method on an audio-rank teacher (a UNet1DModel) and on a video-rank one (a text-to-video
``TextToVideoSDPipeline``: UNet3DConditionModel on latent clips, a per-frame VAE, CLIP captions).
"""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.configuration_utils import FrozenDict
from torch import nn

from distill.config import DataConfig
from distill.data import ImageBatches, load_dataset
from distill.denoisers import DiffusersDenoiser
from distill.errors import ConfigError, DistillError
from distill.eval.sweep import denoiser_draw, generate, sigma_grid
from distill.samplers import SAMPLERS, SCHEDULER_SAMPLERS, scheduler_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SCHED = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
         "prediction_type": "epsilon", "clip_sample": False}
VIDEO, AUDIO = (3, 3, 4, 4), (2, 24)  # (C, F, H, W) and (C, L)


class ElementwiseNet(nn.Module):
    """A network of any rank that acts on each value alone (per-channel weights): its estimate of a video
    [B, C, F, H, W] equals its estimate of the same values laid out as an image [B, C, F * H, W]."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.config = FrozenDict(in_channels=shape[0], sample_size=list(shape[1:]))
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, shape[0]))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        w = self.w.reshape(1, -1, *([1] * (sample.ndim - 2)))
        t = timestep.float().reshape(-1, *([1] * (sample.ndim - 1))) / 1000
        return (torch.tanh(w * sample + t),)


def _denoiser(shape: tuple[int, ...]) -> DiffusersDenoiser:
    return DiffusersDenoiser(ElementwiseNet(shape), SCHED).eval()


def _sigmas(D: DiffusersDenoiser, sampler: str, steps: int) -> torch.Tensor:
    if sampler in SCHEDULER_SAMPLERS:
        return scheduler_sigmas(D, sampler, steps)
    return sigma_grid(D, steps, "karras" if sampler == "heun" else "trailing")


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("shape", [VIDEO, AUDIO], ids=["video", "audio"])
def test_every_sampler_takes_video_and_audio_ranks(sampler, shape):
    """The same noise and values give the same samples whatever the rank: nothing in a sampler assumes 4-D."""
    D = _denoiser(shape)
    as_image = (shape[0], int(np.prod(shape[1:-1])) if len(shape) > 2 else 1, shape[-1])
    D_image = _denoiser(as_image)
    sigmas = _sigmas(D, sampler, 3)
    with torch.no_grad():
        ours = generate(denoiser_draw(D, sampler, sigmas), 3, shape, seed=5, batch_size=2)
        flat = generate(denoiser_draw(D_image, sampler, sigmas), 3, as_image, seed=5, batch_size=3)
    assert ours.shape == (3, *shape) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours.reshape(flat.shape), flat, rtol=1e-5, atol=1e-6)
    assert D.shape() == shape


# ---------------------------------------------------------------------------------------------- data


def _save(tmp_path: Path, name: str, samples: np.ndarray) -> Path:
    import datasets

    folder = tmp_path / name
    datasets.Dataset.from_dict({"image": samples}).save_to_disk(str(folder))
    return folder


def test_video_and_audio_data_load_in_their_layouts(tmp_path):
    g = np.random.default_rng(0)
    # video frames channels-last, 8-bit: (F, H, W, C) -> (C, F, H, W) in [-1, 1]; frames resized to 2x2
    video = _save(tmp_path, "video", g.integers(0, 256, (6, 5, 4, 4, 3), dtype=np.uint8))
    cfg = DataConfig(name=str(video), layout="video", resolution=2, label_column=None)
    batches = ImageBatches(load_dataset(cfg), cfg, seed=0)
    assert batches.sample_shape == (3, 5, 2, 2)
    batch, *_ = batches.batch(0, 0, 4)
    assert batch["image"].shape == (4, 3, 5, 2, 2) and batch["image"].abs().max() <= 1
    # audio clips without a channel axis: (L,) -> (1, L)
    audio = _save(tmp_path, "audio", g.uniform(-1, 1, (5, 24)).astype(np.float32))
    cfg = DataConfig(name=str(audio), layout="audio", label_column=None)
    assert ImageBatches(load_dataset(cfg), cfg, seed=0).sample_shape == (1, 24)
    # video samples read as audio clips have too many axes: refused, naming the setting to fix
    with pytest.raises(DistillError, match="set data.layout"):
        bad = DataConfig(name=str(video), layout="audio", label_column=None)
        ImageBatches(load_dataset(bad), bad, seed=0).sample_shape


def test_a_layout_that_cannot_hold_is_refused_in_the_recipe():
    from distill.recipe import load_recipe

    with pytest.raises(ConfigError) as err:
        load_recipe(ROOT / "recipes" / "digits" / "consistency.yaml",
                    ["data.layout=audio", "data.resolution=16", "data.hflip=true"])
    text = str(err.value)
    assert "resolution resizes images and video frames" in text and "play backwards" in text
    with pytest.raises(ConfigError, match="layout must be one of image, video, audio"):
        load_recipe(ROOT / "recipes" / "digits" / "consistency.yaml", ["data.layout=spectrogram"])
    # an image recipe dumps as it always did: no layout key
    assert "layout" not in load_recipe(ROOT / "recipes" / "digits" / "consistency.yaml").to_dict()["data"]


# ---------------------------------------------------------------------------------------------- evaluation


def _toy_features() -> nn.Module:
    """Per-channel mean and spread of a sample of any rank: a toy feature network."""

    class Stats(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.flatten(2)
            return torch.cat([flat.mean(-1), flat.std(-1), flat.abs().amax(-1)], dim=1)

    return Stats()


@pytest.mark.parametrize("kind", ["video", "audio"])
def test_evaluation_scores_video_and_audio_and_writes_their_media(tmp_path, kind, monkeypatch):
    import sys

    from distill.eval.harness import evaluate
    from distill.eval.protocol import load_protocol

    shape = VIDEO if kind == "video" else AUDIO
    g = np.random.default_rng(1)
    data = _save(tmp_path, kind, np.tanh(g.normal(size=(40, *shape))).astype(np.float32))
    (tmp_path / "toy_features.py").write_text(
        "import sys\nsys.path.insert(0, " + repr(str(Path(__file__).parent)) + ")\n"
        "from test_ranks import _toy_features as net\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "p.yaml").write_text(f"name: toy-{kind}\ndataset: {data}\nlayout: {kind}\nn: 20\n"
                                     f"extractor: toy_features:net\nextractor_args: {{dim: 6}}\nbatch_size: 8\n")
    proto = load_protocol(tmp_path / "p.yaml")
    rows = evaluate(_denoiser(shape), proto, [1, 2], ["euler"], name="toy", grids=tmp_path / "grids", progress=False)
    assert [r["steps"] for r in rows[1:]] == [1, 2] and all(np.isfinite(r["value"]) for r in rows)
    suffix = {"video": ".gif", "audio": ".wav"}[kind]
    media = Path(rows[1]["grid_png"])
    assert media.suffix == suffix and media.is_file()
    companion = media.with_name(media.stem + ("-frames.png" if kind == "video" else "-spectrogram.png"))
    assert companion.is_file()
    sys.modules.pop("toy_features", None)


# ---------------------------------------------------------------------------------------------- an audio-rank teacher


def _unet1d(channels: int = 2, length: int = 24) -> nn.Module:
    from diffusers import UNet1DModel

    torch.manual_seed(0)
    return UNet1DModel(sample_size=length, in_channels=channels, out_channels=channels, extra_in_channels=0,
                       time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
                       use_timestep_embedding=True, act_fn="mish", norm_num_groups=8, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownResnetBlock1D", "DownResnetBlock1D"),
                       up_block_types=("UpResnetBlock1D",), mid_block_type="MidResTemporalBlock1D",
                       out_block_type="OutConv1DBlock")


@pytest.fixture(scope="module")
def audio_teacher(tmp_path_factory):
    from distill.export import save_pipeline

    folder = tmp_path_factory.mktemp("audio") / "teacher"
    sched = {k: v for k, v in SCHED.items() if k != "_class_name"}
    return save_pipeline(DiffusersDenoiser(_unet1d(), sched), folder)


def test_a_1d_network_is_an_audio_rank_teacher_and_distill_sample_writes_wav(audio_teacher, tmp_path):
    from distill.cli import main
    from distill.pipelines import load_pipeline

    p = load_pipeline(audio_teacher)
    assert p.sample_shape == (2, 24) and p.sample_dims == 1
    assert p.load_denoiser().shape() == (2, 24)
    out = tmp_path / "clip.wav"
    assert main(["sample", str(audio_teacher), "--steps", "2", "--n", "3", "--out", str(out)]) == 0
    with wave.open(str(out)) as w:
        assert w.getnchannels() == 2 and w.getnframes() >= 3 * 24
    assert out.with_name("clip-spectrogram.png").is_file()
    with pytest.raises(DistillError, match="parity check compares DDPMPipeline's images"):
        from distill.export import parity

        parity(audio_teacher, [1])


@pytest.fixture(scope="module")
def audio_data(tmp_path_factory):
    g = np.random.default_rng(2)
    t = np.linspace(0, 1, 24, dtype=np.float32)
    clips = np.stack([np.stack([np.sin(2 * np.pi * f * t), np.cos(2 * np.pi * f * t)]) * 0.8
                      for f in g.uniform(1, 4, 64)]).astype(np.float32)
    return _save(tmp_path_factory.mktemp("audio-data"), "clips", clips)


RECIPES = {"progressive": ["method.start_steps=4", "method.iters_per_phase=[1, 1]"],
           "consistency": ["method.iters=1"],
           "adversarial": ["method.iters=2", "method.r1_every=1"],
           "distribution_matching": ["method.iters=2"]}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_one_training_step_of_every_method_on_an_audio_rank_teacher(method, audio_teacher, audio_data, tmp_path):
    from distill.recipe import load_recipe
    from distill.trainer import Trainer

    over = [f"teacher={audio_teacher}", f"data.name={audio_data}", "data.layout=audio", "data.label_column=null",
            "trainer.batch_size=8", "trainer.checkpoint_every=0", "trainer.progress=false", "eval.protocol=null",
            *RECIPES[method]]
    from distill.pipelines import load_pipeline

    result = Trainer(load_recipe(ROOT / "recipes" / "digits" / f"{method}.yaml", over), tmp_path / method).fit()
    assert result["step"] >= 1
    model = tmp_path / method / "model"
    assert json.loads((model / "distill.json").read_text())["method"] == method
    student = load_pipeline(model)
    assert student.sample_shape == (2, 24)
    teacher_w = load_pipeline(audio_teacher).load_network().state_dict()
    moved = [k for k, v in student.load_network().state_dict().items() if not torch.equal(v, teacher_w[k])]
    assert moved, f"{method}: the student is still the teacher"


def test_teacher_training_from_scratch_names_what_to_give_for_audio(audio_data, tmp_path):
    from distill.recipe import load_recipe
    from distill.trainer import Trainer

    over = [f"data.name={audio_data}", "data.layout=audio", "data.label_column=null", "eval.protocol=null"]
    with pytest.raises(DistillError, match="builds a UNet2DModel for images .* 2x24. Start from a network"):
        Trainer(load_recipe(ROOT / "recipes" / "digits" / "teacher.yaml", over), tmp_path / "t")


@pytest.mark.parametrize("shape, maps, want", [((2, 8, 3, 4, 4), None, "spatial-3d"), ((2, 8, 16), True, "spatial-1d"),
                                               ((2, 16, 8), None, "tokens"), ((2, 8, 4, 4), None, "spatial")])
def test_discriminator_heads_read_features_of_every_rank(shape, maps, want):
    """A video UNet's (B, C, F, H, W) maps get a 3-D convolution, a 1-D UNet's (B, C, L) maps a 1-D one: a 3-D
    feature is read as tokens (B, N, C) only where the backbone does not say it is a map."""
    from distill.methods.common import Head, head_kind, maps_of

    f = torch.randn(*shape)
    ch, kind = head_kind(f, maps)
    assert kind == want and ch == (shape[2] if want == "tokens" else shape[1])
    logits = Head(ch, 4, kind)(f)
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    assert maps_of(_unet1d()) is True


# ---------------------------------------------------------------------------------------------- a video-rank teacher

FRAMES = 2  # the training clips' length; the tiny text-to-video UNet takes clips of any length
CAPTIONS = ["a red seven", "a blue two", "the digit one in green", "a white nine"]


@pytest.fixture(scope="module")
def video_teacher(tmp_path_factory):
    from tiny_pipelines import save_tiny_t2v

    return save_tiny_t2v(tmp_path_factory.mktemp("video") / "teacher")


@pytest.fixture(scope="module")
def video_data(tmp_path_factory):
    """16 clips (C, F, H, W) = (3, 2, 8, 8) in [-1, 1], channels first, each with a caption of the tiny tokenizer's
    words: a text-to-video data set."""
    import datasets

    g = np.random.default_rng(3)
    clips = np.tanh(g.normal(size=(16, 3, FRAMES, 8, 8))).astype(np.float32)
    folder = tmp_path_factory.mktemp("video-data") / "clips"
    datasets.Dataset.from_dict({"image": clips, "caption": [CAPTIONS[i % 4] for i in range(16)]}).save_to_disk(
        str(folder))
    return folder


def test_a_3d_network_is_a_video_rank_teacher_its_vae_codes_each_frame(video_teacher, tmp_path, one_thread):
    """UNet3DConditionModel denoises (B, C, F, H, W) latents natively; the pipeline's 2-D VAE codes clips frame by
    frame; distill's DDIM matches the stock TextToVideoSDPipeline on the same latents; ``distill sample`` writes
    a GIF of the clips."""
    from distill.cli import main
    from distill.denoisers import DEFAULT_FRAMES, NETWORKS, network_sizes, sample_dims
    from distill.export import parity
    from distill.pipelines import load_pipeline

    assert NETWORKS["UNet3DConditionModel"].dims == 3 and sample_dims("UNet3DConditionModel", {}) == 3
    assert network_sizes("UNet3DConditionModel", {"sample_size": 4}, frames=5) == (5, 4, 4)
    p = load_pipeline(video_teacher)
    assert p.sample_dims == 3 and p.any_frames and p.num_frames == DEFAULT_FRAMES
    assert p.sample_shape == (4, DEFAULT_FRAMES, 4, 4) and p.image_shape == (3, DEFAULT_FRAMES, 8, 8)
    assert p.expected_shape((3, FRAMES, 8, 8), decoded=True) == (3, FRAMES, 8, 8)  # clips of any length fit
    D = p.load_denoiser()
    assert D.shape() == (4, DEFAULT_FRAMES, 4, 4)
    cond = p.encode_prompts(CAPTIONS[:2])
    with torch.no_grad():
        x0 = D(torch.randn(2, 4, FRAMES, 4, 4), torch.tensor([0.5, 3.0]), **cond)
    assert x0.shape == (2, 4, FRAMES, 4, 4) and torch.isfinite(x0).all()

    clips = torch.rand(3, 3, FRAMES, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = p.encode_images(clips)
    assert z.shape == (3, 4, FRAMES, 4, 4)
    for f in range(FRAMES):  # each frame is coded alone, whatever the clip around it
        torch.testing.assert_close(z[:, :, f], p.encode_images(clips[:, :, f]))
    decoded = p.decode(z)
    assert decoded.shape == clips.shape
    torch.testing.assert_close(decoded[:, :, 1], p.decode(z[:, :, 1]))

    gaps = parity(video_teacher, [1, 2], n=2)  # 16 frames, the stock pipeline's default
    assert max(gaps.values()) < 1e-4, gaps
    out = tmp_path / "clips.gif"
    assert main(["sample", str(video_teacher), "--prompt", "a red seven", "--steps", "2", "--n", "2",
                 "--out", str(out)]) == 0
    assert out.is_file() and out.with_name("clips-frames.png").is_file()


def test_a_video_unets_features_are_clip_maps(video_teacher, one_thread):
    """Its blocks see the frames folded into the batch; the discriminator's features are the clips' maps
    (B, C, F, H, W), read by a 3-D head, one logit per clip."""
    from distill.methods.adversarial import TeacherFeatures
    from distill.methods.common import Head, head_kind, maps_of
    from distill.pipelines import load_pipeline

    p = load_pipeline(video_teacher)
    D = p.load_denoiser()
    cond = p.encode_prompts(CAPTIONS[:3])
    with torch.no_grad():
        feats = TeacherFeatures(D)(torch.randn(3, 4, FRAMES, 4, 4), torch.ones(3), **cond)
    assert [tuple(f.shape) for f in feats] == [(3, 8, FRAMES, 4, 4), (3, 8, FRAMES, 2, 2), (3, 16, FRAMES, 2, 2),
                                               (3, 16, FRAMES, 2, 2)]
    ch, kind = head_kind(feats[-1], maps_of(D.net))
    assert (ch, kind) == (16, "spatial-3d") and Head(ch, 4, kind)(feats[-1]).shape == (3,)


def test_a_video_teacher_refuses_image_data_naming_the_layout(video_teacher, caption_data, tmp_path, monkeypatch):
    from distill.denoisers import network_sizes
    from distill.recipe import load_recipe
    from distill.trainer import Trainer

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    over = [f"teacher={video_teacher}", f"data.name={caption_data}", "data.caption_column=caption",
            "eval.protocol=null", "method.iters=1"]
    with pytest.raises(DistillError, match=r"makes 3x16x8x8 samples .* the data's are 3x16x16. Set data.layout to "
                                           "video"):
        Trainer(load_recipe(ROOT / "recipes" / "digits" / "consistency.yaml", over), tmp_path / "run")
    with pytest.raises(DistillError, match=r"sample_size is the frames' \(H, W\).* Set sample_size"):
        network_sizes("UNet3DConditionModel", {"sample_size": [2, 4, 4]})


VIDEO_RECIPES = {**RECIPES, "consistency": [*RECIPES["consistency"], "guidance.scale=2"],  # CFG targets on clips
                 "distribution_matching": [*RECIPES["distribution_matching"], "method.gan_weight=0"],
                 "teacher": ["trainer.max_steps=1", "method.ema_decay=0"]}  # teacher training: fine-tuning it


def test_every_method_has_a_video_recipe():
    from distill.methods import METHODS

    assert sorted(VIDEO_RECIPES) == sorted(METHODS)


@pytest.mark.parametrize("method", sorted(VIDEO_RECIPES))
def test_one_training_step_of_every_method_on_a_video_rank_teacher(method, video_teacher, video_data, tmp_path,
                                                                   monkeypatch):
    """Clips (B, 3, F, 8, 8) with captions -> per-frame VAE latents (B, 4, F, 4, 4) and CLIP embeddings -> one step
    of each method (the GAN term of distribution matching reads an unconditional head, so it is off for this
    text-conditional teacher; adversarial distillation's discriminator reads the teacher's clip maps, with R1):
    finite losses, a student that moved, exported as a stock TextToVideoSDPipeline of the clips' length."""
    from diffusers import DiffusionPipeline

    from distill.denoisers import DEFAULT_FRAMES
    from distill.pipelines import load_pipeline
    from distill.recipe import load_recipe
    from distill.trainer import Trainer

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    over = [f"teacher={video_teacher}", f"data.name={video_data}", "data.layout=video", "data.caption_column=caption",
            "data.label_column=null", "trainer.batch_size=4", "trainer.checkpoint_every=0", "trainer.progress=false",
            "trainer.log_every=1", "trainer.threads=1", "eval.protocol=null", *VIDEO_RECIPES[method]]
    t = Trainer(load_recipe(ROOT / "recipes" / "digits" / f"{method}.yaml", over), tmp_path / method)
    assert t.data.sample_shape == (4, FRAMES, 4, 4)  # the clips' latents
    result = t.fit()
    assert result["step"] >= 1
    rows = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    losses = [v for r in rows for k, v in r.items() if k.endswith("/loss")]
    assert losses and all(np.isfinite(losses)), rows
    model = tmp_path / method / "model"
    student = load_pipeline(model)
    if method == "teacher":  # a teacher is a stock pipeline folder, without distill.json: clips of the default length
        assert not (model / "distill.json").exists() and student.num_frames == DEFAULT_FRAMES
    else:  # a student makes clips as long as those it was trained on
        meta = json.loads((model / "distill.json").read_text())
        assert meta["method"] == method and meta["num_frames"] == FRAMES and student.num_frames == FRAMES
        card = (model / "README.md").read_text()  # the stock call makes clips of that length
        assert f"num_frames={FRAMES}," in card and ").frames" in card
    assert student.class_name == "TextToVideoSDPipeline" and student.sample_shape == (4, student.num_frames, 4, 4)
    teacher_w = load_pipeline(video_teacher).load_network().state_dict()
    moved = [k for k, v in student.load_network().state_dict().items() if not torch.equal(v, teacher_w[k])]
    assert moved, f"{method}: the student is still the teacher"
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    clip = pipe("a red seven", num_frames=FRAMES, num_inference_steps=1, guidance_scale=1.0, output_type="latent",
                generator=torch.Generator().manual_seed(0)).frames
    assert clip.shape == (1, 4, FRAMES, 4, 4) and torch.isfinite(clip).all()
