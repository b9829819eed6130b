"""The shipped text-to-image teachers, through stock diffusers alone: they draw what their prompts ask for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parents[1] / "distill" / "assets"


@pytest.mark.slow  # a quality floor of the shipped teachers (10-28 s each): CI's make test-all runs it
@pytest.mark.parametrize("name", ["text-digits-sd", "text-digits-sd3"])
def test_stock_pipeline_draws_the_asked_digit_and_color(name):
    """DiffusionPipeline.from_pretrained(folder) alone (no distill code), 25 steps of its own scheduler at guidance
    3, 32x32 by default: the shipped classifier reads the asked digit and color at least 90% of the time (70 prompts,
    every digit x color, in the held-out phrasings)."""
    from diffusers import DiffusionPipeline

    from distill.benchmarks.text_digits.judge import load_text_digits_net
    from distill.benchmarks.text_digits.data import prompt_set

    folder = ASSETS / name
    if not (folder / "model_index.json").is_file():
        # the teachers are trained by a committed command (recipes/text-digits/teacher-*.yaml); until an asset is
        # shipped there is nothing to load, and saying so beats a from_pretrained traceback
        pytest.skip(f"{name} is not shipped yet: distill teacher recipes/text-digits/teacher-{name[12:]}.yaml")
    kwargs = {"text_encoder_3": None, "tokenizer_3": None} if name.endswith("sd3") else {}
    pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    prompts = prompt_set()[:70]
    with torch.no_grad():
        images = pipe([p.text for p in prompts], num_inference_steps=25, guidance_scale=3.0, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (70, 3, 32, 32)  # the pipeline's defaults are the benchmark's size
    digit, color = load_text_digits_net()(images * 2 - 1)
    right = (digit.argmax(1) == torch.tensor([p.digit for p in prompts])) & (
        color.argmax(1) == torch.tensor([p.color for p in prompts]))
    assert right.float().mean() >= 0.9, right.float().mean()
