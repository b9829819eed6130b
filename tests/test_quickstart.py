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
    assert set(table) == {"teacher", "progressive", "consistency", "adversarial"}
    for name, cells in table.items():
        nums = [float(c.split()[0]) for c in cells[:3]]  # 1, 2 and 4 steps: every model has all three
        assert all(v > 0 for v in nums), (name, cells)
    assert "## Against the teacher's DDIM" in md
    verdicts = [line for line in md.splitlines() if "the teacher's DDIM at 1, 2 and 4 steps" in line]
    assert [v.split()[1] for v in verdicts] == ["progressive", "consistency", "adversarial"]
    teacher_rows = (out / "results" / "teacher.jsonl").read_text()

    plots = list((out / "plots").glob("*.png"))
    grids = list(out.rglob("grids/**/*.png"))
    assert plots and len(grids) >= 4 + 4 + 3 + 3  # teacher 1-32 DDIM; each student at its step counts
    for png in [*plots, *grids]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            assert min(im.size) > 8
    for link in re.findall(r"\]\(([^)]+\.png)\)", md):  # the markdown's links resolve from DIR
        assert (out / link).is_file(), link

    for name in ("progressive", "consistency", "adversarial"):
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
    assert r2.stdout.count("finished earlier") == 3
    assert (out / "results" / "teacher.jsonl").read_text() == teacher_rows  # the baseline was kept too
    assert (out / "LEADERBOARD.md").read_text().count(" · ") == md.count(" · ")


def test_recipes_lists_methods_and_every_shipped_recipe(capsys):
    assert cli.main(["recipes"]) == 0
    text = capsys.readouterr().out
    for name in ("teacher", "progressive", "consistency", "adversarial"):
        assert f"recipes/digits/{name}.yaml" in text
        assert name in text
    assert "examples/custom_method.yaml" in text and "invalid" not in text
