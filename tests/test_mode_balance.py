"""evals/mode_balance.py: the protocol draw it reports is the harness's number; its class-balanced subsets are."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from distill.eval.harness import evaluate
from distill.eval.protocol import load_protocol

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "distill" / "assets" / "digits-teacher"


@pytest.fixture
def mode_balance(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("mode_balance", ROOT / "evals" / "mode_balance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_balanced_takes_m_of_each_class_or_all_there_are(mode_balance):
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 7 + list(range(3, 10)) * 4)
    images = torch.arange(len(labels)).float()
    picked, fewest = mode_balance.balanced(images, labels, 3)
    counts = torch.bincount(labels[picked.long()], minlength=10)
    assert counts[1] == 2 and fewest == 2  # class 1 has only two
    assert all(counts[c] == 3 for c in range(10) if c != 1)
    assert mode_balance.parse_spec("a/b:4") == ("a/b", 4, None)
    assert mode_balance.parse_spec("a/b:32:dpmpp_2m") == ("a/b", 32, "dpmpp_2m")
    with pytest.raises(SystemExit, match="PATH:STEPS"):
        mode_balance.parse_spec("a/b")


def test_protocol_draw_is_the_harness_number(mode_balance, tmp_path):
    """The 'protocol draw' column is what `distill eval` reports for the same model, sampler and steps; the
    other draws are other numbers; every sample of every draw is classified."""
    assert mode_balance.main([f"{TEACHER}:2:ddim", "--n", "100", "--draws", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "mode_balance.json").read_text())["rows"]
    real, teacher = rows
    harness = evaluate(TEACHER, load_protocol("digits", n=100), [2], ["ddim"], progress=False)
    assert real["protocol_fd"] == pytest.approx(harness[0]["value"], rel=1e-9)  # the floor
    assert teacher["protocol_fd"] == pytest.approx(harness[1]["value"], rel=1e-6)
    assert len(teacher["draws"]) == 2 and teacher["protocol_fd"] not in teacher["draws"]
    assert teacher["pooled_n"] == 300
    assert 0 < teacher["class_min"] < teacher["class_max"] < 1 and 0 < teacher["class_tv"] <= 1
    # the real row balances half B to m of each digit; the model's subset has m of each unless a digit is short
    assert real["balanced_n"] % 10 == 0 and teacher["balanced_n"] <= real["balanced_n"]
    assert (teacher["balanced_n"] == real["balanced_n"]) == (teacher["fewest"] == real["balanced_n"] // 10)
    assert "| digits-teacher | 2 | ddim |" in (tmp_path / "mode_balance.md").read_text()
