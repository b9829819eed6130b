"""The evaluation harness: per-sample seeds, protocols and their cache, rows, leaderboards, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import distill
from distill import cli
from distill.errors import DistillError
from distill.eval.harness import evaluate
from distill.eval.leaderboard import load_rows, markdown, plot, rich_tables
from distill.eval.protocol import Protocol, load_protocol, reference
from distill.eval.sweep import denoiser_draw, generate, sigma_grid
from distill.pipelines import load_denoiser

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "distill" / "assets" / "digits-teacher"
ROW_KEYS = {"model", "method", "recipe", "sampler", "steps", "nfe", "metric", "value", "n", "seed", "extractor",
            "protocol", "versions", "git", "wall_s", "samples_per_s"}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))


def small(**kw) -> Protocol:
    return load_protocol("digits", n=kw.pop("n", 100), **kw)


@pytest.mark.parametrize("sampler", ["ddim", "heun", "consistency"])
def test_images_do_not_depend_on_batch_size(sampler):
    """Batch 7 and batch 64 draw bitwise the same noise (initial and per step) for every sample; the images
    then agree up to float32 rounding, because CPU matmul/conv kernels block a batch of 7 differently from a
    batch of 64 (about 5e-7 per network call; no batching of torch's kernels is bitwise batch-invariant)."""
    D = load_denoiser(TEACHER).eval()
    draw = denoiser_draw(D, sampler, sigma_grid(D, 3, "karras", 80.0))
    seen = {7: [], 64: []}

    def spy(bs):
        def f(noise, gens):
            seen[bs].append(noise)
            return draw(noise, gens)
        return f

    a = generate(spy(7), 64, (1, 8, 8), seed=5, batch_size=7)
    b = generate(spy(64), 64, (1, 8, 8), seed=5, batch_size=64)
    assert torch.equal(torch.cat(seen[7]), torch.cat(seen[64]))
    assert (a - b).abs().max().item() < 1e-3
    if sampler == "consistency":  # re-noising draws from the same per-sample generators
        assert (a - b).abs().max().item() < 1e-5
    c = generate(draw, 64, (1, 8, 8), seed=6, batch_size=64)
    assert (a - c).abs().max().item() > 0.5


def test_fd_does_not_depend_on_batch_size():
    values = [evaluate(TEACHER, small(batch_size=bs), steps=[4], samplers=["ddim"], progress=False)[1]["value"]
              for bs in (7, 64)]
    assert abs(values[0] - values[1]) <= 1e-4 * values[0]


def test_evaluate_teacher_rows_and_floor():
    rows = distill.evaluate(str(TEACHER), small(), steps=[1, 4], samplers=["ddim", "heun"], progress=False)
    floor, points = rows[0], rows[1:]
    assert floor["method"] == "data-floor" and floor["value"] > 0
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in points] == [("ddim", 1, 1), ("ddim", 4, 4), ("heun", 1, 1), ("heun", 4, 7)]
    for r in points:
        assert ROW_KEYS <= set(r) and r["metric"] == "FD-digits" and r["n"] == 100 and r["method"] == "teacher"
        assert r["extractor"]["name"] == "digits-net" and len(r["extractor"]["weights_hash"]) == 16
        json.dumps(r)
    ddim = {r["steps"]: r["value"] for r in points if r["sampler"] == "ddim"}
    assert ddim[4] < ddim[1] / 5
    # same seeds, same images: a second evaluation gives the same numbers
    again = evaluate(TEACHER, small(), steps=[4], samplers=["ddim"], progress=False)
    assert again[1]["value"] == ddim[4]


def test_a_pooled_protocol_scores_every_draw_and_keeps_the_first_as_a_column():
    """draws: 3 samples 3n per point from seeds 0..3n-1: the headline is the bias-corrected FD of all of them with
    its interval, the first draw's plain FD (seeds 0..n-1) is the one-draw protocol's number, KID is over all
    3n; the floor is on the same corrected scale, over every real image of half B; a pooled protocol is another
    protocol (its own key, so its rows never share a table with one-draw rows)."""
    one = evaluate(TEACHER, small(n=120), steps=[2], samplers=["ddim"], progress=False)
    three = evaluate(TEACHER, small(n=120, draws=3), steps=[2], samplers=["ddim"], progress=False)
    point, single = three[1], one[1]
    assert point["draws"] == 3 and point["pooled_n"] == 360 and point["n"] == 120 and "draws" not in single
    assert point["single"] == pytest.approx(single["value"], rel=1e-4)  # the same seeds, another batch split
    assert point["single_ci"] == pytest.approx(single["value_ci"], rel=1e-3)
    assert point["value"] == pytest.approx(point["fd_plain"] - point["fd_bias"]) and point["fd_bias"] > 0
    lo, hi = point["value_ci"]
    assert lo < point["value"] < hi and hi - lo < single["value_ci"][1] - single["value_ci"][0]  # 3x the samples
    assert point["kid_se"] > 0 and single["kid_se"] > point["kid_se"]
    floor = three[0]
    assert floor["pooled_n"] == 898 and floor["single"] == pytest.approx(one[0]["value"])
    assert floor["value"] < floor["single"] and floor["value_ci"][0] <= floor["value"] <= floor["value_ci"][1]
    assert point["protocol"]["key"] != single["protocol"]["key"]
    with pytest.raises(DistillError, match="draws must be >= 1"):
        small(draws=0)


def test_evaluate_a_sampler_function_and_a_student_folder(tmp_path):
    D = load_denoiser(TEACHER).eval()
    sig = sigma_grid(D, 2, "trailing")

    def two_step(noise, steps, gens):
        return denoiser_draw(D, "ddim", sig)(noise, gens)

    rows = evaluate(two_step, small(), steps=[2], progress=False)
    ref = evaluate(TEACHER, small(), steps=[2], samplers=["ddim"], progress=False)
    assert rows[1]["value"] == ref[1]["value"] and rows[1]["method"] == "custom"
    # A student folder carries its sampler, step counts and grids in distill.json.
    import shutil

    student = tmp_path / "student"
    shutil.copytree(TEACHER, student)
    (student / "distill.json").write_text(json.dumps({"method": "progressive", "sampler": "ddim", "steps": [2],
                                                       "sigmas": {"2": sig.tolist()}}))
    rows = evaluate(student, small(), steps=[1, 2, 4], progress=False)
    assert [(r["steps"], r["method"], r["grid"]) for r in rows[1:]] == [(2, "progressive", "student")]
    assert rows[1]["value"] == ref[1]["value"]
    with pytest.raises(DistillError, match="samples with 'ddim'"):
        evaluate(student, small(), steps=[2], samplers=["heun"], progress=False)


def test_reference_cache_is_used_and_a_mismatched_one_is_refused(tmp_path, monkeypatch):
    proto = small()
    first = reference(proto)
    import distill.eval.protocol as P

    calls = {"n": 0}
    orig = P._dataset_images

    def counting(p):
        calls["n"] += 1
        return orig(p)

    monkeypatch.setattr(P, "_dataset_images", counting)
    again = reference(proto)
    assert calls["n"] == 0 and again.floor == first.floor
    meta = next(P.cache_dir().glob("*.json"))
    data = json.loads(meta.read_text())
    data["extractor"]["weights_hash"] = "0" * 16  # as if made by another feature network
    meta.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="another protocol or feature network"):
        third = reference(proto)
    assert calls["n"] == 1 and third.floor == first.floor
    stats = next(P.cache_dir().glob("*.safetensors"))
    blob = bytearray(stats.read_bytes())
    blob[-3] ^= 0xFF
    stats.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match="does not match the recorded hash"):
        fourth = reference(proto)
    assert calls["n"] == 2 and fourth.floor == first.floor
    data = json.loads(meta.read_text())
    assert data["version"] == P.REFERENCE_VERSION
    data["version"] = P.REFERENCE_VERSION - 1  # an entry from before the floor's interval was bias-corrected
    data["floor_ci"] = [123.0, 456.0]
    meta.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="made by an older distill"):
        fifth = reference(proto)
    assert calls["n"] == 3 and fifth.floor_ci == fourth.floor_ci and fifth.floor_ci[0] <= fifth.floor <= fifth.floor_ci[1]


def test_reference_entries_are_renamed_into_place_from_files_of_this_process(monkeypatch):
    """Processes that fill the same cache entry at once (the quickstart's lanes, make test's workers) write under
    names of their own and rename: no shared temporary file, and the JSON is never half-written in place."""
    import os

    import distill.eval.protocol as P

    moves = []
    real = os.replace
    monkeypatch.setattr(P.os, "replace", lambda a, b: (moves.append((Path(a), Path(b))), real(a, b))[1])
    reference(small())
    assert sorted(b.suffix for _, b in moves) == [".json", ".safetensors"]
    assert all(a.name == f"{b.name}.{os.getpid()}.tmp" for a, b in moves)
    assert not list(P.cache_dir().glob("*.tmp"))


def test_leaderboard_outputs(tmp_path):
    rows = evaluate(TEACHER, small(), steps=[1, 2], samplers=["ddim", "euler"], progress=False, grids=tmp_path / "g")
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loaded = load_rows([f])
    md = markdown(loaded)
    assert "data floor" in md and "**" in md and "| 1 | 2 |" in md
    assert "### KID on protocol" in md  # every row carries KID: its own table
    assert len(rich_tables(loaded)) == 2  # the metric and KID
    paths = plot(loaded, tmp_path / "plots")
    assert all(p.stat().st_size > 1000 for p in paths.values())
    assert (tmp_path / "g" / "digits-teacher" / "ddim-2.png").is_file()
    md_path = tmp_path / "LB.md"
    assert cli.main(["leaderboard", str(f), "--md", str(md_path), "--plots", str(tmp_path / "p2")]) == 0
    assert "data floor" in md_path.read_text()


def _no_output(tmp_path: Path, args: list[str], capsys, match: str) -> None:
    out = tmp_path / "rows.jsonl"
    assert cli.main(["eval", *args, "--out", str(out), "--grids", str(tmp_path / "grids")]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "grids").exists()


def test_eval_errors_write_nothing(tmp_path, capsys, monkeypatch):
    _no_output(tmp_path, [str(tmp_path / "nope"), "--n", "100"], capsys, "does not exist")
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)
    (broken / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel", "sample_size": 8}')
    (broken / "scheduler").mkdir()
    (broken / "scheduler" / "scheduler_config.json").write_text("{not json")
    _no_output(tmp_path, [str(broken)], capsys, "cannot read")
    proto = tmp_path / "p.yaml"
    proto.write_text("name: x\ndataset: someone/no-such-dataset\nextractor: digits\n")
    _no_output(tmp_path, [str(TEACHER), "--protocol", str(proto)], capsys, "hub is offline")
    _no_output(tmp_path, [str(TEACHER), "--n", "50"], capsys, "50 samples in 64-dimensional features")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("DISTILL_INCEPTION_WEIGHTS", str(empty))
    import distill.eval.inception as E

    monkeypatch.setattr(E, "_cleanfid_cache_dir", lambda: empty)
    proto.write_text("name: x\ndataset: digits\nextractor: clean-fid\nn: 100\n")
    _no_output(tmp_path, [str(TEACHER), "--protocol", str(proto)], capsys, "inception-2015-12-05.pt")
    _no_output(tmp_path, [str(TEACHER), "--protocol", "nonexistent"], capsys, "protocol 'nonexistent' not found")
    _no_output(tmp_path, [str(TEACHER), "--steps", "0,2"], capsys, "positive integers")


def test_sample_cli_uses_a_students_own_grid(tmp_path, capsys):
    import shutil

    from distill.eval.sweep import sigma_grid

    student = tmp_path / "student"
    shutil.copytree(TEACHER, student)
    D = load_denoiser(TEACHER)
    (student / "distill.json").write_text(json.dumps({"method": "progressive", "sampler": "ddim", "steps": [2],
                                                       "sigmas": {"2": sigma_grid(D, 2).tolist()}}))
    assert cli.main(["sample", str(student), "--steps", "2", "--n", "4", "--out", str(tmp_path / "g.png")]) == 0
    assert "student's own grid" in capsys.readouterr().out and (tmp_path / "g.png").is_file()
    assert cli.main(["sample", str(student), "--steps", "4", "--out", str(tmp_path / "h.png")]) == 2
    assert "for [2] steps" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_scores_the_shipped_teacher(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in rows] == [None, 1, 2, 4, 8, 16, 32] and rows[0]["method"] == "data-floor"
    assert rows[-1]["value"] < rows[1]["value"] / 50  # 32 DDIM steps are far better than 1
    assert (tmp_path / "grids" / "digits-teacher" / "ddim-32.png").is_file()
    assert "data floor" in capsys.readouterr().out


def test_commands_write_only_where_told_or_beside_their_input(tmp_path, monkeypatch, capsys):
    """`distill eval` and `distill leaderboard` never touch the repository's committed evals/ unasked."""
    import hashlib

    root = Path(__file__).resolve().parents[1]

    def snapshot() -> dict[str, str]:
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in (root / "evals").rglob("*") if p.is_file()}

    before = snapshot()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", str(TEACHER), "--steps", "1", "--sampler", "ddim", "--n", "100"]) == 0
    rows = tmp_path / "eval-results" / "digits-digits-teacher.jsonl"
    assert rows.is_file() and (tmp_path / "eval-results" / "digits-digits-teacher-grids").is_dir()
    mine = tmp_path / "mine" / "my-rows.jsonl"
    mine.parent.mkdir()
    mine.write_text(rows.read_text())
    assert cli.main(["leaderboard", str(mine)]) == 0
    assert (mine.parent / "LEADERBOARD.md").is_file() and any((mine.parent / "plots").iterdir())
    assert snapshot() == before
