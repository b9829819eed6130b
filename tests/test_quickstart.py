"""`distill quickstart --fast` end to end in a subprocess, as `make demo` runs it, and `distill recipes`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distill import cli
from distill.export import parity

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_fast_end_to_end(tmp_path):
    from diffusers import DiffusionPipeline
    from PIL import Image

    out = tmp_path / "qs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "distill.cli", "quickstart", "--fast", "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not the leaderboard's" in r.stdout  # --fast says its numbers are not the leaderboard's

    md = (out / "LEADERBOARD.md").read_text()
    assert "not the leaderboard's" in md and "distill quickstart --fast" in md
    table = {}
    for line in md.splitlines():
        m = re.match(r"\| (\w+) · (\w+) \|(.*)\|$", line)
        if m and m.group(1) != "model":  # the header row is "model · sampler"
            table[m.group(1)] = [c.strip().strip("*") for c in m.group(3).split("|")]
    assert set(table) == {"teacher", "progressive", "consistency", "adversarial", "distribution_matching"}
    for name, cells in table.items():
        nums = [float(c.split()[0]) for c in cells[:3]]  # 1, 2 and 4 steps: every model has all three
        assert all(v > 0 for v in nums), (name, cells)
    assert "## Against the teacher's training-free samplers" in md
    verdicts = [line for line in md.splitlines() if "best training-free sampler at 1, 2 and 4 steps" in line]
    assert [v.split()[1] for v in verdicts] == ["progressive", "consistency", "adversarial", "distribution_matching"]
    teacher_rows = (out / "results" / "teacher.jsonl").read_text()
    samplers = {json.loads(line)["sampler"] for line in teacher_rows.splitlines()} - {None}
    assert samplers == {"ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras", "unipc"}

    plots = list((out / "plots").glob("*.png"))
    grids = list(out.rglob("grids/**/*.png"))
    assert plots and len(grids) >= 5 * 6 + 4 + 3 + 3 + 3  # teacher samplers at 1-32; each student at its steps
    for png in [*plots, *grids]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            assert min(im.size) > 8
    for link in re.findall(r"\]\(([^)]+\.png)\)", md):  # the markdown's links resolve from DIR
        assert (out / link).is_file(), link

    for name in ("progressive", "consistency", "adversarial", "distribution_matching"):
        folder = out / "runs" / name / "model"
        info = json.loads((folder / "distill.json").read_text())
        pipe = DiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        import torch

        img = pipe(batch_size=2, num_inference_steps=info["steps"][0], generator=torch.Generator().manual_seed(0),
                   output_type="np").images
        assert img.shape == (2, 8, 8, 1) and 0 <= img.min() and img.max() <= 1
        # trained on the real (cosine, sigma_max 2e4) teacher: stock diffusers gives distill's images
        diffs = parity(folder)
        assert sorted(diffs) == info["steps"] and max(diffs.values()) < 1e-4, (name, diffs)

    # started again: finished recipes are kept, not retrained
    r2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("finished earlier") == 4
    assert (out / "results" / "teacher.jsonl").read_text() == teacher_rows  # the baseline was kept too
    assert (out / "LEADERBOARD.md").read_text().count(" · ") == md.count(" · ")


def test_recipes_lists_methods_and_every_shipped_recipe(capsys):
    assert cli.main(["recipes"]) == 0
    text = capsys.readouterr().out
    for name in ("teacher", "progressive", "consistency", "adversarial"):
        assert f"recipes/digits/{name}.yaml" in text
        assert name in text
    assert "examples/custom_method.yaml" in text and "invalid" not in text


def test_verdict_compares_students_with_the_best_training_free_sampler_at_their_nfe():
    """A student that beats DDIM but not DPM-Solver++ at the same NFE does not pass; more NFE never counts."""
    from distill.quickstart import RECIPES, verdict

    def row(model, sampler, steps, value, method=None):
        return {"model": model, "method": method or model, "sampler": sampler, "steps": steps, "nfe": steps,
                "value": value}

    rows = [row("teacher", "ddim", k, v) for k, v in ((1, 280.0), (2, 40.0), (4, 12.0), (8, 3.0))]
    rows += [row("teacher", "dpmpp_2m", k, v) for k, v in ((1, 280.0), (2, 20.0), (4, 5.0), (8, 1.5))]
    rows += [row(name, "consistency", k, v) for name in RECIPES for k, v in ((1, 4.0), (2, 30.0), (4, 2.0))]
    v = verdict(rows)
    for name in RECIPES:
        assert v[name][1][2] and v[name][4][2]  # beats both at 1 step (280) and 4 steps (best 5.0, not 1.5 at 8)
        assert v[name][4][1]["value"] == 5.0 and v[name][4][1]["sampler"] == "dpmpp_2m"
        assert not v[name][2][2] and v[name][2][1]["sampler"] == "dpmpp_2m"  # 30 beats DDIM's 40, not 20
