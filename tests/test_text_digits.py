"""Colored digits: the generated data, its captions and tokenizer, the shipped FD-text-digits network and VAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.benchmarks.digits.judge import digits_array, digits_split
from distill.benchmarks.text_digits.data import (
    COLOR_RGB,
    COLORS,
    DIGIT_WORDS,
    HELDOUT_TEMPLATES,
    TEMPLATES,
    TRAIN_TEMPLATES,
    VOCABULARY,
    caption,
    colorize,
    prompt_set,
    row_templates,
    split_indices,
    text_digits_arrays,
    text_digits_dataset,
)

pytestmark = pytest.mark.usefixtures("one_thread")

COLUMNS = ["image", "caption", "digit", "color"]


@pytest.fixture(scope="module")
def test_split():
    return text_digits_dataset("test")


def _spread(n_total: int, n: int) -> np.ndarray:
    return np.linspace(0, n_total - 1, n).round().astype(np.int64)


def test_columns_shapes_and_labels(test_split) -> None:
    ds = test_split
    assert ds.column_names == COLUMNS
    assert len(ds) == 360 * len(COLORS)
    row = ds[0]
    assert row["image"].shape == (3, 32, 32) and row["image"].dtype == torch.float32
    rows = ds[:]
    images = rows["image"]
    assert images.shape == (len(ds), 3, 32, 32)
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.min() == -1.0
    assert rows["digit"].dtype == rows["color"].dtype == torch.int64 and isinstance(rows["caption"][0], str)
    pairs = set(zip(rows["digit"].tolist(), rows["color"].tolist()))
    assert pairs == {(d, c) for d in range(10) for c in range(len(COLORS))}


def test_deterministic(test_split) -> None:
    again = text_digits_dataset("test")[:]
    first = test_split[:]
    assert again["caption"] == first["caption"]
    assert torch.equal(again["image"], first["image"]) and torch.equal(again["digit"], first["digit"])
    assert np.array_equal(row_templates("train", 0), row_templates("train", 0))
    assert not np.array_equal(row_templates("train", 0), row_templates("train", 1))


def test_split_is_digits_net_split() -> None:
    _, labels = digits_array()
    train_idx, test_idx = digits_split(labels)
    assert np.array_equal(split_indices("train"), train_idx)
    assert np.array_equal(split_indices("test"), test_idx)
    assert len(split_indices("all")) == 1797
    arrays = text_digits_arrays("train")
    assert len(arrays["digit"]) == 1437 * 7 == 10_059
    assert np.array_equal(arrays["digit"], labels[arrays["source"]])


def test_colors_and_captions_match_labels(test_split) -> None:
    rows = test_split[:]
    images, digits, colors = rows["image"], rows["digit"], rows["color"]
    ink = (images + 1) / 2  # (N, 3, H, W) in [0, 1]
    for c, name in enumerate(COLORS):
        lit = ink[colors == c].amax(dim=(0, 2, 3)) > 0.5  # which RGB channels carry ink
        assert lit.tolist() == [bool(v) for v in COLOR_RGB[c]], name
    for text, d, c in zip(rows["caption"], digits.tolist(), colors.tolist()):
        words = text.split()
        assert DIGIT_WORDS[d] in words and COLORS[c] in words
    assert caption("{art} {digit} in {color}", 8, 0) == "an eight in red"
    assert caption("{art} {digit} in {color}", 1, 6) == "a one in white"
    white = colorize(np.ones((1, 1, 2, 2), np.float32), np.array([6]))
    assert np.all(white == 1.0) and np.all(colorize(np.zeros((1, 1, 2, 2), np.float32), np.array([0])) == -1.0)


def test_heldout_templates_never_caption_training_rows() -> None:
    assert len(TEMPLATES) >= 6 and len(HELDOUT_TEMPLATES) == 2
    assert set(TRAIN_TEMPLATES).isdisjoint(HELDOUT_TEMPLATES)
    heldout_texts = {p.text for p in prompt_set()}
    arrays = text_digits_arrays("all")
    assert row_templates("train").max() < len(TRAIN_TEMPLATES)
    train_texts = {caption(TEMPLATES[t], d, c)
                   for t, d, c in zip(row_templates("train")[arrays["row"]], arrays["digit"], arrays["color"])}
    assert len(train_texts) == len(TRAIN_TEMPLATES) * 70  # every training phrasing of every pair is used
    assert train_texts.isdisjoint(heldout_texts)
    assert set(row_templates("heldout").tolist()) == set(range(len(TRAIN_TEMPLATES), len(TEMPLATES)))


def test_prompt_set() -> None:
    prompts = prompt_set()
    assert len(prompts) == len(HELDOUT_TEMPLATES) * 70
    assert prompts[0].text == "an image of a red zero" and (prompts[0].digit, prompts[0].color) == (0, 0)
    assert prompts == prompt_set()
    for p in prompts:
        assert p.template >= len(TRAIN_TEMPLATES) and p.text == caption(TEMPLATES[p.template], p.digit, p.color)
    for t in range(len(TRAIN_TEMPLATES), len(TEMPLATES)):
        assert {(p.digit, p.color) for p in prompts if p.template == t} == {(d, c) for d in range(10) for c in range(7)}


def test_every_caption_tokenizes_into_whole_words(tmp_path) -> None:
    from distill.text import build_clip_tokenizer

    tok = build_clip_tokenizer(VOCABULARY, tmp_path / "tokenizer")
    vocab = tok.get_vocab()
    texts = sorted({caption(t, d, c) for t in TEMPLATES for d in range(10) for c in range(len(COLORS))})
    assert len(texts) == len(TEMPLATES) * 70
    ids = tok(texts).input_ids
    for text, row in zip(texts, ids):
        assert row == [tok.bos_token_id, *(vocab[w + "</w>"] for w in text.split()), tok.eos_token_id], text
    # nothing outside the templates' words: VOCABULARY is exactly what the captions use
    assert set(VOCABULARY) == {w for t in texts for w in t.split()}


# ------------------------------------------------------------------------------------ shipped assets


def _classifier():
    from distill.benchmarks.text_digits.judge import DEFAULT_FOLDER, load_text_digits_net

    if not (DEFAULT_FOLDER / "model.safetensors").is_file():
        pytest.skip("distill/assets/text-digits-features is not built")
    return load_text_digits_net()


def test_shipped_classifier_reads_heldout_digits_and_colors() -> None:
    from distill.benchmarks.text_digits.judge import accuracy, load_text_digits_config, weights_hash

    net = _classifier()
    config = load_text_digits_config()
    assert config["weights_hash"] == weights_hash(net)
    data = text_digits_arrays("test")
    acc = accuracy(net, data["image"], data["digit"], data["color"])
    assert acc["digit"] >= 0.98 and acc["color"] >= 0.98 and acc["joint"] >= 0.98, acc
    x = torch.from_numpy(data["image"][:5])
    d, c = net.predict(x)
    assert d.shape == c.shape == (5,) and d.dtype == torch.int64
    with torch.no_grad():
        assert net.features(x).shape == (5, net.num_features)


def test_shipped_vae_loads_offline_and_round_trips() -> None:
    from distill.benchmarks.text_digits.vae import DEFAULT_FOLDER

    if not (DEFAULT_FOLDER / "diffusion_pytorch_model.safetensors").is_file():
        pytest.skip("distill/assets/text-digits-vae is not built")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(DEFAULT_FOLDER, local_files_only=True, use_safetensors=True).eval()
    config = json.loads((DEFAULT_FOLDER / "config.json").read_text())
    assert config["shift_factor"] == 0.0 and vae.config.shift_factor == 0.0
    assert config["scaling_factor"] > 0 and config["scaling_factor"] != 1.0
    assert config["latent_channels"] == 4 and len(config["block_out_channels"]) == 3
    net = _classifier()
    data = text_digits_arrays("test")
    pick = _spread(len(data["digit"]), 140)
    x = torch.from_numpy(data["image"][pick])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        assert z.shape == (140, 4, 8, 8)
        rec = vae.decode(z).sample.clamp(-1, 1)
    from distill.benchmarks.text_digits.judge import accuracy

    acc = accuracy(net, rec, data["digit"][pick], data["color"][pick])
    assert acc["joint"] >= 0.95, acc
    assert float(((rec - x) ** 2).mean()) < 0.05


def _probe_heldout_joint(model, tokenizer, which: str, steps: int = 300) -> float:
    """Train a fresh reader on the frozen encoder's states of the training captions; its held-out joint accuracy."""
    import torch.nn.functional as F

    from distill.benchmarks.text_digits.data import HELDOUT_TEMPLATES, TRAIN_TEMPLATES
    from distill.benchmarks.text_digits.text_encoder import MAX_LENGTH, Reader, _accuracy, _captions, _read

    def states(templates):
        caps, d, c = _captions(templates)
        ids = tokenizer(caps, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
        with torch.no_grad():
            return _read(model, ids, which, False)[0], d, c

    (xs, d, c), (xh, dh, ch) = states(TRAIN_TEMPLATES), states(HELDOUT_TEMPLATES)
    torch.manual_seed(0)
    reader = Reader(xs.shape[-1])
    opt = torch.optim.AdamW(reader.parameters(), lr=3e-3)
    for _ in range(steps):
        logits = reader(xs)
        loss = F.cross_entropy(logits[:, :10], d) + F.cross_entropy(logits[:, 10:], c)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return _accuracy(reader(xh), dh, ch)["joint"]


def test_shipped_text_encoders_carry_heldout_phrasings() -> None:
    """A reader trained on the training phrasings' states reads held-out phrasings through the shipped encoders,
    which it does not through the same encoder at its random initialisation (why they are trained)."""
    import transformers

    from distill.benchmarks.text_digits.text_encoder import ENCODERS

    root = Path(__file__).resolve().parents[1] / "distill" / "assets" / "text-digits-clip"
    tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
    report = json.loads((root / "training_report.json").read_text())
    for name, (cls_name, which, _, seed) in ENCODERS.items():
        model = getattr(transformers, cls_name).from_pretrained(root / name).eval()
        shipped = _probe_heldout_joint(model, tokenizer, which)
        assert shipped >= 0.95, (name, shipped)
        assert report["encoders"][name]["heldout_states"]["joint"] >= 0.95
        if name == "sd":
            torch.manual_seed(seed)
            random = getattr(transformers, cls_name)(model.config).eval()
            assert shipped > _probe_heldout_joint(random, tokenizer, which) + 0.1


def test_train_text_encoders_writes_a_loadable_folder_and_refuses_a_full_one(tmp_path) -> None:
    import transformers

    from distill.errors import DistillError
    from distill.benchmarks.text_digits.text_encoder import ENCODERS, train_text_encoders

    report = train_text_encoders(tmp_path / "clip", steps=2)
    assert set(report["encoders"]) == set(ENCODERS)
    for name, (cls_name, *_) in ENCODERS.items():
        model = getattr(transformers, cls_name).from_pretrained(tmp_path / "clip" / name)
        assert model.config.vocab_size == len(transformers.CLIPTokenizer.from_pretrained(tmp_path / "clip" / "tokenizer"))
    with pytest.raises(DistillError, match="not empty"):
        train_text_encoders(tmp_path / "clip", steps=2)


# ------------------------------------------------------------------------------------ the second feature network

PROTOCOLS = Path(__file__).resolve().parents[1] / "distill" / "benchmarks" / "text_digits" / "protocols"


def _second_classifier():
    from distill.benchmarks.text_digits.judge import DEFAULT_FOLDER, SECOND_FOLDER, load_text_digits_net

    if not (DEFAULT_FOLDER.parent / SECOND_FOLDER / "model.safetensors").is_file():
        pytest.skip("distill/assets/text-digits-features-b is not built")
    return load_text_digits_net(SECOND_FOLDER)


def test_second_classifier_is_independent_and_reads_heldout_digits() -> None:
    """text-digits-features-b: another seed, other widths and feature size; as accurate as the first."""
    from distill.benchmarks.text_digits.judge import (
        DEFAULT_FOLDER,
        SECOND_FOLDER,
        accuracy,
        judges,
        load_text_digits_config,
        weights_hash,
    )

    net_b = _second_classifier()
    first, second = load_text_digits_config(), load_text_digits_config(SECOND_FOLDER)
    assert second["weights_hash"] == weights_hash(net_b) != first["weights_hash"]
    assert second["training"]["seed"] != first["training"]["seed"]
    assert second["architecture"]["channels"] != first["architecture"]["channels"]
    assert net_b.num_features == second["architecture"]["feature_dim"] != first["architecture"]["feature_dim"]
    # the folder's name and its path are the same network
    assert load_text_digits_config(DEFAULT_FOLDER.parent / SECOND_FOLDER) == second
    data = text_digits_arrays("test")
    acc = accuracy(net_b, data["image"], data["digit"], data["color"])
    assert acc["joint"] >= 0.98, acc
    assert [weights_hash(n) for n in judges()] == [first["weights_hash"], second["weights_hash"]]


def test_second_classifier_is_its_own_metric() -> None:
    from distill.benchmarks.text_digits.extractor import TextDigitsExtractor
    from distill.benchmarks.text_digits.judge import DEFAULT_FOLDER, SECOND_FOLDER

    _second_classifier()
    a, b = TextDigitsExtractor(), TextDigitsExtractor(folder=SECOND_FOLDER)
    assert (a.name, a.metric, a.dim) == ("text-digits-net", "FD-text-digits", 64)
    assert (b.name, b.metric, b.dim) == ("text-digits-net-b", "FD-text-digits-b", 48)
    assert TextDigitsExtractor(folder=DEFAULT_FOLDER).name == "text-digits-net"
    x = torch.from_numpy(text_digits_arrays("test")["image"][:8])
    assert b.features(x).shape == (8, 48) and b.predict(x)["digit"].shape == (8,)


def test_second_protocol_differs_only_in_its_feature_network() -> None:
    """text-digits-b is text-digits scored by text-digits-features-b, whose training command its header gives."""
    import re

    from distill.config import to_plain
    from distill.eval.protocol import load_protocol

    a, b = to_plain(load_protocol("text-digits")), to_plain(load_protocol("text-digits-b"))
    assert (a.pop("name"), b.pop("name")) == ("text-digits", "text-digits-b")
    assert (a.pop("extractor_args"), b.pop("extractor_args")) == ({}, {"folder": "text-digits-features-b"})
    assert a == b
    header = (PROTOCOLS / "text-digits-b.yaml").read_text()
    command = re.search(r"python -m distill\.benchmarks\.text_digits\.judge (.*)", header).group(1)
    assert "--out distill/assets/text-digits-features-b" in command
    _second_classifier()
    from distill.benchmarks.text_digits.judge import SECOND_FOLDER, load_text_digits_config

    config = load_text_digits_config(SECOND_FOLDER)
    arch = config["architecture"]
    assert f"--seed {config['training']['seed']}" in command
    assert f"--channels {','.join(map(str, arch['channels']))}" in command
    assert f"--feature-dim {arch['feature_dim']}" in command


# ------------------------------------------------------------------------------------ diagnostics


@pytest.fixture(scope="module")
def real_images() -> torch.Tensor:
    data = text_digits_arrays("test")
    return torch.from_numpy(data["image"][_spread(len(data["digit"]), 700)])


def _blur(x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    k = torch.tensor([1.0, 2.0, 1.0])
    w = ((k[:, None] * k[None]) / 16).expand(3, 1, 3, 3).contiguous()
    return F.conv2d(F.pad(x, (1, 1, 1, 1), value=-1.0), w, groups=3)


def test_aspects_of_real_images_fall_in_their_documented_ranges(real_images) -> None:
    from distill.benchmarks.text_digits.diagnostics import ASPECTS, INK_THRESHOLD, aspect_means, aspects

    out = aspects(real_images)
    assert list(out) == list(ASPECTS)
    for name, values in out.items():
        assert values.shape == (len(real_images),) and values.dtype == torch.float32, name
        assert torch.isfinite(values).all(), name
    assert ((out["stroke_mean"] > INK_THRESHOLD) & (out["stroke_mean"] <= 1)).all()
    for name in ("midtone_share", "ink_share", "color_purity"):
        assert ((out[name] >= 0) & (out[name] <= 1)).all(), name
    assert ((out["edge_sharpness"] >= 0) & (out["edge_sharpness"] <= 2**0.5)).all()
    assert ((out["background_mean"] >= 0) & (out["background_mean"] <= INK_THRESHOLD)).all()
    # the real data's typical values (module docstring): pure palette colors on an almost black background
    assert torch.allclose(out["color_purity"], torch.ones(len(real_images)), atol=1e-5)
    means = aspect_means(real_images, batch_size=256)
    assert 0.5 < means["stroke_mean"] < 0.7 and 0.5 < means["midtone_share"] < 0.75
    assert 0.4 < means["ink_share"] < 0.6 and 0.1 < means["edge_sharpness"] < 0.2 and means["background_mean"] < 0.03
    assert means == pytest.approx({k: float(v.mean()) for k, v in out.items()}, abs=1e-6)


def test_aspects_see_brighter_sharper_and_blurred_strokes(real_images) -> None:
    from distill.benchmarks.text_digits.diagnostics import aspects

    base = aspects(real_images)
    brighter = aspects((((real_images + 1) / 2) * 1.2).clamp(0, 1) * 2 - 1)  # ink scaled up by 1.2, clamped
    assert (brighter["stroke_mean"] > base["stroke_mean"]).float().mean() > 0.95
    assert brighter["midtone_share"].mean() < base["midtone_share"].mean() - 0.05
    blurred = aspects(_blur(real_images))
    assert (blurred["midtone_share"] > base["midtone_share"]).float().mean() > 0.9
    assert blurred["edge_sharpness"].mean() < base["edge_sharpness"].mean()
    assert blurred["stroke_mean"].mean() < base["stroke_mean"].mean()
    # a hue off the palette (red ink with half as much green) loses purity; a uniform haze raises the background
    off = real_images.clone()
    red = (off[:, 0] > -1) & (off[:, 1] == -1) & (off[:, 2] == -1)
    off[:, 1] = torch.where(red, (off[:, 0] + 1) / 2 - 1, off[:, 1])  # orange: halfway from red to yellow
    purity = aspects(off)["color_purity"]
    assert purity.min() < 0.05 and purity.max() == pytest.approx(1.0)
    hazy = aspects((real_images + 0.1).clamp(-1, 1))
    assert (hazy["background_mean"] > base["background_mean"]).all()


def test_aspects_of_blank_images_and_bad_shapes() -> None:
    from distill.errors import DistillError
    from distill.benchmarks.text_digits.diagnostics import aspects

    out = aspects(-torch.ones(2, 3, 32, 32))
    assert all(torch.equal(v, torch.zeros(2)) for v in out.values())
    full = aspects(torch.ones(1, 3, 32, 32))  # all white: full ink, no mid-tones, no edges, a palette color
    assert (full["stroke_mean"].item(), full["midtone_share"].item(), full["ink_share"].item()) == (1.0, 0.0, 1.0)
    assert (full["edge_sharpness"].item(), full["color_purity"].item()) == (0.0, 1.0)
    with pytest.raises(DistillError, match="N, 3, H, W"):
        aspects(torch.zeros(2, 1, 32, 32))
