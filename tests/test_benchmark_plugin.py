"""A benchmark is a plug-in: one defined in a test's own temporary package, found by dotted path, runs the quickstart,
the protocol lookup, the dataset lookup and the extractor lookup exactly as the shipped ones do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distill import registry
from distill.errors import DistillError

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "distill" / "assets" / "digits-teacher"

# A benchmark of 8x8 blobs: its own data, feature network (4x4 average-pooled pixels), protocol and quickstart table.
# The quickstart distils the shipped digits teacher (also 1x8x8) with the consistency recipe on the blobs.
PACKAGE = '''
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill.eval.features import FeatureExtractor
from distill.quickstart import Quickstart
from distill.registry import Benchmark

HERE = Path(__file__).resolve().parent


def dataset(split):
    import datasets

    g = np.random.default_rng(0)
    yy, xx = np.mgrid[:8, :8]
    cy, cx = g.uniform(2, 6, (2, 200))
    images = np.exp(-((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / 4) * 2 - 1
    return datasets.Dataset.from_dict({{"image": images[:, None].astype(np.float32)}}).with_format("torch")


class PixelNet(FeatureExtractor):
    name = "pixels-4x4"
    metric = "FD-pixels"

    def __init__(self, device="cpu", batch_size=256):
        self.device, self.batch_size = torch.device(device), batch_size

    @property
    def dim(self):
        return 16

    def weights_hash(self):
        return "avgpool4x4"

    def _extract(self, images):
        return F.adaptive_avg_pool2d(images, 4).flatten(1)


BENCHMARK = Benchmark(
    name="blobs",
    datasets={{"blobs": "blobbench:dataset"}},
    extractors={{"pixels": "blobbench:PixelNet"}},
    protocols="protocols",
    quickstart=Quickstart(
        name="blobs", teacher=Path({teacher!r}), protocol="blobs",
        recipes={{"consistency": ({recipe!r}, ["data.name=blobs"])}},
        steps=[1], teacher_steps=[1], teacher_samplers=["ddim"],
        fast={{"consistency": ["method.iters=3", "method.optimizer.warmup_steps=1", "trainer.checkpoint_every=0"]}},
        fast_n=64,
    ),
)
'''
PROTOCOL = """name: blobs
dataset: blobs
split: train
n: 64
extractor: pixels
"""


@pytest.fixture
def blobbench(tmp_path, monkeypatch):
    pkg = tmp_path / "pkgs" / "blobbench"
    (pkg / "protocols").mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(PACKAGE.format(
        teacher=str(TEACHER), recipe=str(ROOT / "recipes" / "digits" / "consistency.yaml"))))
    (pkg / "protocols" / "blobs.yaml").write_text(PROTOCOL)
    monkeypatch.syspath_prepend(str(pkg.parent))
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    yield pkg
    registry._REGISTERED.pop("blobs", None)
    sys.modules.pop("blobbench", None)


def test_a_dotted_path_registers_the_benchmark_and_its_parts(blobbench):
    from distill.data import load_dataset
    from distill.eval.extractors import get_extractor
    from distill.eval.protocol import load_protocol
    from distill.quickstart import benchmark

    assert "blobs" not in registry.names()
    with pytest.raises(DistillError, match="protocol 'blobs' not found"):
        load_protocol("blobs")
    b = registry.benchmark("blobbench:BENCHMARK")
    assert b.name == "blobs" and b.folder == blobbench and "blobs" in registry.names()
    assert registry.benchmark("blobs") is b  # by name from now on
    proto = load_protocol("blobs")
    assert proto.dataset == "blobs" and proto.n == 64
    assert len(load_dataset(proto.data_config())) == 200
    assert get_extractor("pixels").name == "pixels-4x4"
    assert benchmark("blobbench:BENCHMARK").protocol == "blobs"


def test_a_bad_benchmark_name_or_object_is_refused(blobbench):
    with pytest.raises(DistillError, match=r"unknown benchmark 'nope'; choose one of digits, text-digits"):
        registry.benchmark("nope")
    with pytest.raises(DistillError, match="is a PosixPath, not a distill.registry.Benchmark"):
        registry.benchmark("blobbench:HERE")


@pytest.mark.slow
def test_quickstart_runs_a_benchmark_from_a_dotted_path_end_to_end(blobbench, tmp_path):
    """`distill quickstart --fast --benchmark blobbench:BENCHMARK`, in two lanes (fresh processes that must find the
    benchmark again): baselines, a student, the leaderboard, all scored in the benchmark's own feature space."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(blobbench.parent), str(ROOT)]),
           "DISTILL_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "qs"
    r = subprocess.run([sys.executable, "-c", "from distill.cli import entry; raise SystemExit(entry())", "quickstart",
                        "--fast", "--benchmark", "blobbench:BENCHMARK", "--out", str(out), "--jobs", "2"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = [json.loads(line) for f in (out / "results" / "teacher.jsonl", out / "runs" / "consistency" / "results.jsonl")
            for line in f.read_text().splitlines()]
    assert {row["extractor"]["name"] for row in rows} == {"pixels-4x4"}
    assert {row["protocol"]["name"] for row in rows} == {"blobs"}
    assert any(row["model"] == "consistency" and row["steps"] == 1 for row in rows)
    assert "FD-pixels" in (out / "LEADERBOARD.md").read_text()


def test_every_benchmarks_judge_is_refused_as_a_discriminator_backbone():
    """The guard covers every registered benchmark's judges, the text-digits classifier included: by class, by
    copied weights, and by name; a network of its own passes."""
    import torch

    from distill.benchmarks.text_digits.judge import load_text_digits_net
    from distill.methods.adversarial import refers_to_eval_net

    judge = load_text_digits_net()
    with pytest.raises(DistillError, match="benchmark text-digits's evaluation network TextDigitsNet"):
        registry.refuse_judges(judge, "mine")
    copied = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1))
    copied[0].load_state_dict({"weight": judge.conv1.weight, "bias": judge.conv1.bias})
    with pytest.raises(DistillError, match="holds benchmark text-digits's evaluation network weights"):
        registry.refuse_judges(copied, "copied")
    torch.manual_seed(0)
    registry.refuse_judges(torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1)), "fresh")  # no error
    assert refers_to_eval_net("my_pkg:text_digits_net") and refers_to_eval_net("x:load_digits_net")
    assert not refers_to_eval_net("my_pkg:my_backbone")
