"""The offline CLIP tokenizer (distill.text) and the tiny random pipelines of tests/tiny_pipelines.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tiny_pipelines as tp  # tests/ is on sys.path (pytest's prepend import mode), as for `from conftest import`

from distill.errors import DistillError
from distill.text import build_clip_tokenizer, clip_text_config_kwargs


@pytest.fixture(autouse=True)
def _one_thread():
    """These networks are tiny; one thread is faster than two on the shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------------- tokenizer


def test_clip_tokenizer_whole_words_fallback_and_padding(tmp_path):
    from transformers import CLIPTokenizerFast

    tok = build_clip_tokenizer(["a", "Red", "seven", "redo", "re"], tmp_path / "tok", model_max_length=12)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "tok" / name).is_file()
    vocab = tok.get_vocab()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (bos, eos, eos)
    assert eos == len(tok) - 1  # EOS has the largest id, as in CLIP

    ids = tok("a red seven").input_ids
    assert ids == [bos, vocab["a</w>"], vocab["red</w>"], vocab["seven</w>"], eos]
    assert tok("A  RED Seven").input_ids == ids  # lowercased, whitespace collapsed
    assert tok("redo re").input_ids == [bos, vocab["redo</w>"], vocab["re</w>"], eos]  # prefixes stay whole

    unknown = tok("zebra").input_ids
    assert unknown[0] == bos and unknown[-1] == eos and len(unknown) == 2 + 5  # one token per character
    assert eos not in unknown[1:-1]  # no unknown token: every byte has one
    assert len(tok("naïve 42 t-shirt!").input_ids) > 2

    padded = tok(["a red seven", "zebra"], padding="max_length", max_length=tok.model_max_length, truncation=True,
                 return_tensors="pt")
    assert padded.input_ids.shape == (2, 12) and tok.model_max_length == 12
    assert padded.input_ids[0].tolist() == ids + [eos] * 7
    assert padded.attention_mask[0].tolist() == [1] * 5 + [0] * 7

    fast = CLIPTokenizerFast.from_pretrained(tmp_path / "tok")  # transformers 5: the same class
    assert fast("a red seven").input_ids == ids


def test_clip_tokenizer_deterministic_and_rejects_split_words(tmp_path):
    words = ["seven", "a", "red", "aaaa", "aaa", "abc", "bc", "ab", "bcd", "abcd", "Über", "..."]
    build_clip_tokenizer(words, tmp_path / "one")
    tok = build_clip_tokenizer(reversed(words + ["RED"]), tmp_path / "two")  # order and case do not matter
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    for w in words:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    with pytest.raises(DistillError, match="t-shirt"):
        build_clip_tokenizer(["t-shirt", "ok"], tmp_path / "bad")


def test_clip_text_config_pools_at_eos(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = build_clip_tokenizer(["a", "red", "seven"], tmp_path, model_max_length=8)
    kwargs = clip_text_config_kwargs(tok)
    assert kwargs["eos_token_id"] == tok.eos_token_id and kwargs["vocab_size"] == len(tok)
    assert kwargs["max_position_embeddings"] == 8
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**kwargs)).eval()
    ids = tok(["a red seven", "red"], padding="max_length", max_length=8, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids)
    eos_pos = torch.tensor([4, 2])  # the first EOS; padding is EOS too
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), eos_pos])


# ---------------------------------------------------------------------------------------------------- pipelines


def _load(folder: Path, name: str):
    from diffusers import DiffusionPipeline

    kwargs = tp.SD3_LOAD_KWARGS if name == "sd3" else {}
    pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _networks(pipe) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sd3": "StableDiffusion3Pipeline", "dit": "DiTPipeline", "ddpm": "DDPMPipeline"}


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_text_to_image_pipeline(tmp_path, name):
    folder = tp.BUILDERS[name](tmp_path / name)
    pipe = _load(folder, name)
    assert type(pipe).__name__ == PIPELINE_CLASSES[name]
    extra = {"max_sequence_length": 8} if name == "sd3" else {}
    for tok, enc in [(pipe.tokenizer, pipe.text_encoder), (getattr(pipe, "tokenizer_2", None), pipe.text_encoder_2
                                                           if name != "sd" else None)]:
        if tok is not None:
            assert len(tok("a red seven").input_ids) == 5 and tok.model_max_length == tp.MODEL_MAX_LENGTH
            assert enc.config.eos_token_id == tok.eos_token_id  # CLIP pools at this token

    def run(prompt: str, output_type: str = "latent", seed: int = 0):
        return pipe(prompt, num_inference_steps=2, generator=_gen(seed), output_type=output_type, **extra).images

    a = run("a red seven")
    assert a.shape == (1, 4, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(run("a red seven"), a, rtol=0, atol=0)  # reproducible with the same generator
    b = run("a blue cat")
    assert (a - b).abs().max() > 1e-3, "the prompt does not reach the denoiser"
    assert (run("a red seven", seed=1) - a).abs().max() > 1e-3

    image = run("a red seven", output_type="np")  # decodes (SD3: latents / scaling_factor + shift_factor)
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 1e-3


def test_sd3_loads_only_without_t5_kwargs(tmp_path):
    import json

    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    folder = tp.save_tiny_sd3(tmp_path / "sd3")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert pytest.approx(0.0609) == json.loads((folder / "vae" / "config.json").read_text())["shift_factor"]
    for cls in (DiffusionPipeline, StableDiffusion3Pipeline):
        with pytest.raises(ValueError, match="text_encoder_3"):
            cls.from_pretrained(folder)
        pipe = cls.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
        assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None


def test_dit_pipeline(tmp_path):
    folder = tp.save_tiny_dit(tmp_path / "dit")
    pipe = _load(folder, "dit")
    assert type(pipe).__name__ == "DiTPipeline"
    assert type(pipe.transformer).__name__ == "DiTTransformer2DModel"  # remapped from Transformer2DModel on load
    assert pipe.get_label_ids(["three"]) == [3]

    def run(label: int, output_type: str = "pt", seed: int = 0):
        return pipe(class_labels=[label], num_inference_steps=2, generator=_gen(seed), output_type=output_type).images

    a = run(3)  # DiTPipeline always decodes; "pt" is images in [0, 1]
    assert a.shape == (1, 3, 16, 16) and torch.isfinite(a).all()
    assert (run(5) - a).abs().max() > 1e-3, "the class label does not reach the denoiser"
    image = run(3, output_type="np")
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_ddpm_pipeline(tmp_path):
    folder = tp.save_tiny_ddpm(tmp_path / "ddpm")
    pipe = _load(folder, "ddpm")
    assert type(pipe).__name__ == "DDPMPipeline"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    a = pipe(batch_size=2, num_inference_steps=2, generator=_gen(0), output_type="pt").images
    assert a.shape == (2, 1, 8, 8) and torch.isfinite(a).all()
    b = pipe(batch_size=2, num_inference_steps=2, generator=_gen(1), output_type="pt").images
    assert (b - a).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(tp.BUILDERS))
def test_builders_are_deterministic_small_and_perturbed(tmp_path, name):
    from safetensors.torch import load_file

    rng = torch.get_rng_state()
    one = tp.BUILDERS[name](tmp_path / "one", seed=0)
    assert torch.equal(torch.get_rng_state(), rng)  # builders leave the global RNG alone
    two = tp.BUILDERS[name](tmp_path / "two", seed=0)
    other = tp.BUILDERS[name](tmp_path / "other", seed=1)
    files = sorted(p.relative_to(one) for p in one.rglob("*.safetensors"))
    assert files
    for rel in files:
        a, b, c = load_file(one / rel), load_file(two / rel), load_file(other / rel)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), rel  # bit-identical for the same seed
        assert not all(torch.equal(a[k], c[k]) for k in a), rel
    assert (one / "model_index.json").read_bytes() == (two / "model_index.json").read_bytes()

    pipe = _load(one, name)
    nets = _networks(pipe)
    assert nets
    for key, net in nets.items():
        assert tp.n_params(net) < 300_000, key
        # No all-zero tensor is left: zero-init layers would make outputs ignore their inputs.
        zero = [n for n, p in net.named_parameters() if not p.detach().abs().amax() > 0]
        assert not zero, (key, zero)


def test_sd_prediction_type(tmp_path):
    from diffusers import DDPMScheduler

    folder = tp.save_tiny_sd(tmp_path / "sd", prediction_type="v_prediction")
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert sched.config.prediction_type == "v_prediction" and sched.config.beta_schedule == "scaled_linear"
