"""Shared fixtures: offline hub, few threads, tiny diffusers models built from config."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def two_threads():
    """The suite runs on the machine's 2 cores (set for the session, not at import, and restored after). `make test`
    runs it in several pytest-xdist workers, which share the cores: one thread each when they are 2 or more."""
    old = torch.get_num_threads()
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, 2 // workers))
    yield
    torch.set_num_threads(old)


def tiny_unet(seed: int = 0, sample_size: int = 8, channels: int = 1):
    """A randomly initialised ~30k-parameter diffusers UNet2DModel."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    # Random init leaves some output weights at zero; perturb every parameter so outputs depend on the input.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


@pytest.fixture
def one_thread():
    """For small tests: the machine's two cores are shared, and these sizes do not need more than one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def unet():
    return tiny_unet()


@pytest.fixture
def scheduler_config():
    return {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
            "prediction_type": "epsilon", "clip_sample": False}


def save_tiny_teacher(folder, prediction_type: str = "v_prediction", seed: int = 0):
    """A tiny random diffusers pipeline folder (UNet2DModel 8x8 + DDPMScheduler config) to distill in tests."""
    from distill.denoisers import DiffusersDenoiser
    from distill.export import save_pipeline

    sched = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": prediction_type,
             "clip_sample": False}
    return save_pipeline(DiffusersDenoiser(tiny_unet(seed), sched), folder)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("tiny-teacher"))


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """Folders of the tiny random pipelines of ``tests/tiny_pipelines.py`` (ddpm, sd, sdxl, sd3, dit), built once."""
    from tiny_pipelines import BUILDERS

    root = tmp_path_factory.mktemp("pipelines")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def caption_data(tmp_path_factory):
    """A saved ``datasets.Dataset`` of 24 random 16x16 RGB images with captions and labels (the tiny pipelines'
    image size; the caption words are in their tokenizer's vocabulary)."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    captions = ["a red seven", "a blue two", "the digit one in green", "a white nine"]
    images = (rng.random((24, 3, 16, 16)) * 2 - 1).astype(np.float32)
    ds = datasets.Dataset.from_dict({"image": images, "caption": [captions[i % 4] for i in range(24)],
                                     "label": [i % 10 for i in range(24)], "digit": [i % 3 for i in range(24)],
                                     "color": [i % 2 for i in range(24)]})
    folder = tmp_path_factory.mktemp("caption-data")
    ds.save_to_disk(str(folder))
    return folder
