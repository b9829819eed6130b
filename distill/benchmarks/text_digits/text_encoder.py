"""The text-digits teachers' CLIP text encoders: small CLIP models trained to carry a caption's digit and color.

Why trained and not frozen at a random initialisation: a text-to-image teacher learns to read its captions through
cross-attention over the encoder's token states, and it only ever sees the six training phrasings
(:data:`distill.benchmarks.text_digits.data.TRAIN_TEMPLATES`). The evaluation prompts use two held-out phrasings. A random encoder
maps the same digit word to unrelated states in a new sentence (its states mix every token with every other), and a
reader trained on the training phrasings then reads 42-82% of the held-out captions right
(``evals/text_encoder_probe.md``). Real CLIP encoders were trained, on image-text pairs, to put a caption's content
into states a new sentence shares; here a far smaller objective does the same job: each encoder is trained, jointly
with a probe (one learned query attending over the token states the pipeline reads, then a digit head and a color
head; plus linear heads on SD3's pooled projection), to classify the digit and color of every training caption. The
probe is thrown away; the encoder is frozen and saved. Held-out phrasings are then read right (the report).

What each pipeline reads, and so what each encoder is trained on:

* ``sd``: one ``CLIPTextModel``; ``StableDiffusionPipeline`` reads ``last_hidden_state``.
* ``sd3-1``, ``sd3-2``: two ``CLIPTextModelWithProjection``; ``StableDiffusion3Pipeline`` reads ``hidden_states[-2]``
  (the layer before the last) of each and their pooled projections ``text_embeds``.

All share one offline tokenizer of :data:`distill.benchmarks.text_digits.data.VOCABULARY` (16 tokens long). The folder written::

    distill/assets/text-digits-clip/
      tokenizer/  sd/  sd3-1/  sd3-2/  training_report.json

    python -m distill.benchmarks.text_digits.text_encoder --out distill/assets/text-digits-clip     # about a minute on one CPU core

Scaffold specs name these folders (``tokenizer: {from: ...}``, ``text_encoders: [{from: ...}]``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError
from distill.benchmarks.text_digits.data import COLORS, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, VOCABULARY, caption

MAX_LENGTH = 16
# name -> (transformers class, states the pipeline reads, uses the pooled projection, init seed)
ENCODERS: dict[str, tuple[str, str, bool, int]] = {
    "sd": ("CLIPTextModel", "last", False, 0),
    "sd3-1": ("CLIPTextModelWithProjection", "penultimate", True, 1),
    "sd3-2": ("CLIPTextModelWithProjection", "penultimate", True, 2),
}
ENCODER_SIZE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                "projection_dim": 64}


class Reader(nn.Module):
    """One learned query attending over token states (B, L, D), then digit (10) and color logits."""

    def __init__(self, dim: int, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.width = heads, width
        self.query = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.key = nn.Linear(dim, width)
        self.value = nn.Linear(dim, width)
        self.heads_out = nn.Linear(width, 10 + len(COLORS))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        b, length, _ = states.shape
        h, d = self.heads, self.width // self.heads
        k = self.key(states).view(b, length, h, d)
        v = self.value(states).view(b, length, h, d)
        attn = torch.einsum("hd,blhd->bhl", self.query.view(h, d), k).mul(d ** -0.5).softmax(-1)
        return self.heads_out(torch.einsum("bhl,blhd->bhd", attn, v).reshape(b, self.width))


def _captions(templates: list[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    rows = [(caption(t, d, c), d, c) for t in templates for d in range(10) for c in range(len(COLORS))]
    return [r[0] for r in rows], torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows])


def _read(model: nn.Module, ids: torch.Tensor, which: str, pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = model(input_ids=ids, output_hidden_states=True)
    states = out.last_hidden_state if which == "last" else out.hidden_states[-2]
    return states, (out.text_embeds if pooled else None)


def _accuracy(logits: torch.Tensor, digit: torch.Tensor, color: torch.Tensor) -> dict[str, float]:
    d = logits[:, :10].argmax(-1) == digit
    c = logits[:, 10:].argmax(-1) == color
    return {"digit": float(d.float().mean()), "color": float(c.float().mean()), "joint": float((d & c).float().mean())}


def train_encoder(tokenizer: Any, name: str, steps: int = 400, lr: float = 3e-3) -> tuple[nn.Module, dict]:
    """Train encoder ``name`` of :data:`ENCODERS` with its readers; the frozen encoder and its accuracies."""
    import transformers

    from distill.text import clip_text_config_kwargs

    cls_name, which, pooled, seed = ENCODERS[name]
    config = transformers.CLIPTextConfig(**{**clip_text_config_kwargs(tokenizer), **ENCODER_SIZE})

    def tok(caps: list[str]) -> torch.Tensor:
        return tokenizer(caps, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                         return_tensors="pt").input_ids

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, cls_name)(config)
        reader = Reader(config.hidden_size)
        pooled_head = nn.Linear(config.projection_dim, 10 + len(COLORS)) if pooled else None
    caps, digit, color = _captions(TRAIN_TEMPLATES)
    ids = tok(caps)
    params = [*model.parameters(), *reader.parameters(), *(pooled_head.parameters() if pooled_head else [])]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    model.train()

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :10], digit) + F.cross_entropy(logits[:, 10:], color)

    for _ in range(steps):
        states, vec = _read(model, ids, which, pooled)
        loss = loss_of(reader(states)) + (loss_of(pooled_head(vec)) if pooled_head is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    report: dict[str, Any] = {"class": cls_name, "reads": which, "seed": seed, "steps": steps}
    with torch.no_grad():
        for split, templates in (("train", TRAIN_TEMPLATES), ("heldout", HELDOUT_TEMPLATES)):
            caps, d, c = _captions(templates)
            states, vec = _read(model, tok(caps), which, pooled)
            report[f"{split}_states"] = _accuracy(reader(states), d, c)
            if pooled_head is not None:
                report[f"{split}_pooled"] = _accuracy(pooled_head(vec), d, c)
    return model, report


def train_text_encoders(out: str | Path, steps: int = 400) -> dict[str, Any]:
    """Write the tokenizer and the :data:`ENCODERS` to ``out`` (refused if it exists and is not empty)."""
    from distill.text import build_clip_tokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DistillError(f"{out} exists and is not empty; give a new folder (or delete it first).")
    start = time.perf_counter()
    tokenizer = build_clip_tokenizer(VOCABULARY, out / "tokenizer", model_max_length=MAX_LENGTH)
    report: dict[str, Any] = {"train_templates": TRAIN_TEMPLATES, "heldout_templates": HELDOUT_TEMPLATES,
                              "encoders": {}}
    for name in ENCODERS:
        model, rep = train_encoder(tokenizer, name, steps=steps)
        model.save_pretrained(out / name, safe_serialization=True)
        report["encoders"][name] = rep
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["torch_threads"] = torch.get_num_threads()
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="a new folder")
    parser.add_argument("--steps", type=int, default=400, help="full-batch training steps per encoder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        report = train_text_encoders(args.out, steps=args.steps)
    except DistillError as exc:
        raise SystemExit(f"error: {exc}") from None
    for name, rep in report["encoders"].items():
        held = rep["heldout_states"]
        extra = f", pooled {rep['heldout_pooled']['joint']:.3f}" if "heldout_pooled" in rep else ""
        print(f"{name}: held-out joint accuracy {held['joint']:.3f} from {rep['reads']} states{extra}")
    print(f"wrote {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
