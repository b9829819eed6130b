"""Can a frozen, randomly initialised small CLIP text encoder serve held-out phrasings of the colored-digits prompts?

A text-to-image teacher reads a caption through cross-attention over the text encoder's token states. Trained only
on :data:`distill.benchmarks.text_digits.data.TRAIN_TEMPLATES`, it must still read the digit and the color out of the held-out
phrasings (:data:`~distill.benchmarks.text_digits.data.HELDOUT_TEMPLATES`) of the evaluation prompts. This script measures that
cheaply with a probe in place of the denoiser:

* every caption (70 digit x color pairs per template) is tokenized with ``build_clip_tokenizer`` (the templates'
  words), padded to 77 tokens as the Stable Diffusion pipelines do, and encoded once by a frozen, randomly
  initialised ``CLIPTextModelWithProjection`` (a CLIPTextModel plus SD3's pooled projection; 16-wide heads,
  MLP 4x hidden, ``transformers``' own initialisation under ``torch.manual_seed(seed)``);
* a probe (one learned query, 4-head attention over the 77 token states with learned key / value maps, then a
  linear digit head and a linear color head; full-batch AdamW, 400 steps) is trained on the training templates'
  captions and scored on the held-out templates' captions (joint: digit and color both right);
* token states: ``last`` = ``last_hidden_state`` (after the final layer norm: what SD 1.x feeds its UNet),
  ``penultimate`` = ``hidden_states[-2]`` (the layer before the last, no final norm: what SD3 and SDXL read),
  ``embeddings`` = ``hidden_states[0]`` (token + position embeddings: a no-layer reference) and ``pooled`` =
  ``text_embeds`` (SD3's pooled vector; linear heads, no attention);
* ``trained`` rows: option B's stand-in, the same encoder trained jointly with the probe on the training captions.

    .venv/bin/python evals/text_encoder_probe.py                 # the table in the report
    .venv/bin/python evals/text_encoder_probe.py --extra          # also with EXTRA_TRAIN_TEMPLATES added to training
"""

from __future__ import annotations

import argparse
import itertools
import re
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from distill.text import build_clip_tokenizer, tiny_clip_text_config
from distill.benchmarks.text_digits.data import COLORS, DIGIT_WORDS, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, caption

# More training phrasings, to test whether template diversity lets a frozen encoder's reader generalise: none is
# a held-out template, and none uses the held-out templates' new words ("image", "written").
EXTRA_TRAIN_TEMPLATES: list[str] = [
    "a drawing of a {color} {digit}",
    "{digit} in {color}",
    "the {color} digit {digit}",
    "a photo of the number {digit} in {color}",
    "this is a {color} {digit}",
    "{art} {digit} colored {color}",
    "the {color} number {digit} on black",
    "a small {color} {digit}",
]


class Probe(nn.Module):
    """One learned query attending over token states (B, L, D) -> digit logits (B, 10), color logits (B, 7)."""

    def __init__(self, dim: int, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.width = heads, width
        self.query = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.key = nn.Linear(dim, width)
        self.value = nn.Linear(dim, width)
        self.digit = nn.Linear(width, 10)
        self.color = nn.Linear(width, len(COLORS))

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, length, _ = states.shape
        h, d = self.heads, self.width // self.heads
        k = self.key(states).view(b, length, h, d)
        v = self.value(states).view(b, length, h, d)
        attn = torch.einsum("hd,blhd->bhl", self.query.view(h, d), k).mul(d ** -0.5).softmax(-1)
        out = torch.einsum("bhl,blhd->bhd", attn, v).reshape(b, self.width)
        return self.digit(out), self.color(out)


class Linear(nn.Module):
    """Linear heads on a pooled vector (B, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.digit = nn.Linear(dim, 10)
        self.color = nn.Linear(dim, len(COLORS))

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.digit(pooled), self.color(pooled)


def captions_for(templates: list[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    rows = [(caption(t, d, c), d, c) for t in templates for d in range(10) for c in range(len(COLORS))]
    return [r[0] for r in rows], torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows])


def words_of(templates: list[str]) -> list[str]:
    words = set(COLORS) | set(DIGIT_WORDS) | {"a", "an"}
    for t in templates:
        words |= set(re.sub(r"\{\w+\}", " ", t).split())
    return sorted(words)


def encoder(tokenizer, hidden: int, layers: int, seed: int):
    from transformers import CLIPTextModelWithProjection

    config = tiny_clip_text_config(tokenizer, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=max(1, hidden // 16), intermediate_size=4 * hidden,
                                   projection_dim=hidden)
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config)


def states(model, ids: torch.Tensor, which: str) -> torch.Tensor:
    out = model(input_ids=ids, output_hidden_states=True)
    return {"last": lambda: out.last_hidden_state, "penultimate": lambda: out.hidden_states[-2],
            "embeddings": lambda: out.hidden_states[0], "pooled": lambda: out.text_embeds}[which]()


@torch.no_grad()
def score(probe: nn.Module, x: torch.Tensor, yd: torch.Tensor, yc: torch.Tensor) -> tuple[float, float, float]:
    d, c = probe(x)
    dk, ck = d.argmax(-1) == yd, c.argmax(-1) == yc
    return float(dk.float().mean()), float(ck.float().mean()), float((dk & ck).float().mean())


def run(tokenizer, hidden: int, layers: int, seed: int, which: str, train_t: list[str], test_t: list[str],
        steps: int = 400, trained: bool = False) -> dict[str, tuple[float, float, float]]:
    """Scores (digit, color, joint) on the training captions ("train") and on each test template's captions."""
    def tok(caps: list[str]) -> torch.Tensor:
        return tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    tr_caps, tr_d, tr_c = captions_for(train_t)
    tr_ids = tok(tr_caps)
    model = encoder(tokenizer, hidden, layers, seed)
    model.train(trained).requires_grad_(trained)
    with torch.set_grad_enabled(trained):
        sample = states(model, tr_ids[:1], which)
    torch.manual_seed(1000 + seed)
    probe = Probe(sample.shape[-1]) if sample.ndim == 3 else Linear(sample.shape[-1])
    params = list(probe.parameters()) + (list(model.parameters()) if trained else [])
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4)
    fixed = None if trained else states(model, tr_ids, which).detach()
    for _ in range(steps):
        d, c = probe(states(model, tr_ids, which) if trained else fixed)
        loss = F.cross_entropy(d, tr_d) + F.cross_entropy(c, tr_c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    out = {}
    with torch.no_grad():
        out["train"] = score(probe, states(model, tr_ids, which), tr_d, tr_c)
        for t in test_t:
            caps, yd, yc = captions_for([t])
            out[t] = score(probe, states(model, tok(caps), which), yd, yc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="probe training steps (full batch)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sizes", default="64x2,64x4,128x2", help="hidden x layers")
    parser.add_argument("--states", default="last,penultimate,embeddings,pooled")
    parser.add_argument("--trained", default="64x2", help="sizes to also train with the probe (option B); '' none")
    parser.add_argument("--extra", action="store_true", help="add EXTRA_TRAIN_TEMPLATES to the training templates")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    parse = lambda s: [tuple(int(v) for v in x.split("x")) for x in s.split(",") if x]
    sizes, trained_sizes = parse(args.sizes), parse(args.trained)
    train_t = TRAIN_TEMPLATES + (EXTRA_TRAIN_TEMPLATES if args.extra else [])
    test_t = HELDOUT_TEMPLATES
    tokenizer = build_clip_tokenizer(words_of(train_t + test_t), tempfile.mkdtemp())
    print(f"{len(train_t)} training templates, held out: {test_t}; {args.steps} probe steps; seeds {seeds}\n")
    print("| encoder | states | train joint | held-out digit | held-out color | held-out joint (min seed) | "
          + " | ".join(f"`{t}` joint" for t in test_t) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(test_t))
    t0 = time.perf_counter()
    jobs = [(s, w, False) for s, w in itertools.product(sizes, args.states.split(","))]
    jobs += [(s, w, True) for s, w in itertools.product(trained_sizes, ["last", "penultimate"])]
    for (hidden, layers), which, trained in jobs:
        rs = [run(tokenizer, hidden, layers, s, which, train_t, test_t, args.steps, trained) for s in seeds]
        def mean(key: str, i: int, rs: list = rs) -> float:
            return sum(r[key][i] for r in rs) / len(rs)

        held = [sum(r[t][2] for t in test_t) / len(test_t) for r in rs]
        cells = [f"{mean('train', 2):.2f}",
                 f"{sum(sum(r[t][0] for t in test_t) for r in rs) / (len(rs) * len(test_t)):.2f}",
                 f"{sum(sum(r[t][1] for t in test_t) for r in rs) / (len(rs) * len(test_t)):.2f}",
                 f"{sum(held) / len(held):.2f} ({min(held):.2f})"] + [f"{mean(t, 2):.2f}" for t in test_t]
        kind = "trained" if trained else "frozen"
        print(f"| {kind} h{hidden} x{layers} | {which} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
