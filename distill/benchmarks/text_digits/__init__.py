"""The colored-digits text-to-image benchmark: 32x32 colored digits with captions (:mod:`.data`), its shared VAE
(:mod:`.vae`) and small text encoders (:mod:`.text_encoder`), the SD- and SD3-shaped teachers
(``distill/assets/text-digits-sd``, ``text-digits-sd3``), FD-text-digits and prompt accuracy from one shipped
classifier (:mod:`.judge`, :mod:`.extractor`), its protocol and the quickstart ``make demo-text`` runs. A second,
independently trained classifier (``text-digits-features-b``, protocol ``text-digits-b``) cross-checks rankings,
and :func:`.diagnostics.aspects` says in pixel terms (stroke brightness, softness, ...) how samples differ."""

from __future__ import annotations

from pathlib import Path

from distill.quickstart import CKPT0, Quickstart
from distill.registry import Benchmark

ASSETS = Path(__file__).resolve().parents[2] / "assets"

# The SD-shaped teacher: the recipes of recipes/text-digits/ at budgets cut towards the quickstart's 15 minutes
# (the recipes' own budgets are their committed runs'), scored at n = 700 (5 samples per prompt; the protocol's
# 1,400 doubles every evaluation). Guidance 1.5 is the teacher's best FD; unguided (w = 1, one network
# evaluation a step) it sets the bar at 1 and 2 NFE. DDIM stands for Euler too (identical on this teacher).
# Progressive and consistency distil the teacher at the fixed w = 1.5 (guidance.range=null): a fixed-w student
# has one target to fit in a budget of 200 steps (the w-conditioned recipe's committed run takes 1,500), and the
# LoRA student, whose adapters must load onto the teacher without a guidance embedding, is fixed-w anyway, so the
# two consistency students compare like for like.
BENCHMARK = Benchmark(
    name="text-digits",
    datasets={"text-digits": "distill.benchmarks.text_digits.data:dataset"},
    extractors={"text-digits": "distill.benchmarks.text_digits.extractor:TextDigitsExtractor"},
    aliases={"text-digits-net": "text-digits"},
    protocols="protocols",
    judges=("distill.benchmarks.text_digits.judge:judges",),
    judge_names=("benchmarks.text_digits.judge", "text_digits_net", "text-digits-net", "text-digits-features"),
    quickstart=Quickstart(
        name="text-digits",
        teacher=ASSETS / "text-digits-sd",
        protocol="text-digits",
        recipes={
            "progressive": ("recipes/text-digits/progressive-sd.yaml",
                            ["method.start_steps=8", "method.iters_per_phase=[60, 80, 100]", "guidance.range=null"]),
            "consistency": ("recipes/text-digits/consistency-sd.yaml",
                            ["method.iters=200", "method.optimizer.warmup_steps=20", "guidance.range=null"]),
            "consistency-lora": ("recipes/text-digits/consistency-sd.yaml",
                                 ["method.iters=200", "method.optimizer.warmup_steps=20", "guidance.range=null",
                                  "student.lora.rank=16", "method.optimizer.lr=0.001"]),
            "adversarial": ("recipes/text-digits/adversarial-sd.yaml",
                            ["method.iters=150", "method.student_optimizer.warmup_steps=20"]),
            "distribution_matching": ("recipes/text-digits/distribution_matching-sd.yaml", ["method.iters=150"]),
        },
        steps=[1, 2, 4],
        teacher_steps=[1, 2, 4, 8],
        teacher_samplers=["ddim", "dpmpp_2m", "unipc"],
        teacher_guidance=[1.0, 1.5],
        n=700,
        draws=1,  # one draw per point, as its committed leaderboard; the protocol pools more (labelled)
        fast={
            "progressive": ["method.start_steps=4", "method.iters_per_phase=[10, 10]", CKPT0],
            "consistency": ["method.iters=20", "method.optimizer.warmup_steps=5", CKPT0],
            "consistency-lora": ["method.iters=20", "method.optimizer.warmup_steps=5", CKPT0],
            "adversarial": ["method.iters=20", "method.student_optimizer.warmup_steps=5", CKPT0],
            "distribution_matching": ["method.iters=10", CKPT0],
        },
        fast_n=280,
        measured="about 14 minutes on 2 CPU cores",
        minutes={"teacher": 6.0, "progressive": 3.7, "consistency": 3.4, "consistency-lora": 3.4, "adversarial": 3.2,
                 "distribution_matching": 3.5},  # 1 thread each
    ),
)
