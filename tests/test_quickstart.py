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
    from distill.quickstart import benchmark, verdict

    RECIPES = tuple(benchmark("digits").recipes)

    def row(model, sampler, steps, value, method=None):
        return {"model": model, "method": method or model, "sampler": sampler, "steps": steps, "nfe": steps,
                "value": value}

    rows = [row("teacher", "ddim", k, v) for k, v in ((1, 280.0), (2, 40.0), (4, 12.0), (8, 3.0))]
    rows += [row("teacher", "dpmpp_2m", k, v) for k, v in ((1, 280.0), (2, 20.0), (4, 5.0), (8, 1.5))]
    rows += [row(name, "consistency", k, v) for name in RECIPES for k, v in ((1, 4.0), (2, 30.0), (4, 2.0))]
    v = verdict(rows, names=RECIPES)
    for name in RECIPES:
        assert v[name][1][2] and v[name][4][2]  # beats both at 1 step (280) and 4 steps (best 5.0, not 1.5 at 8)
        assert v[name][4][1]["value"] == 5.0 and v[name][4][1]["sampler"] == "dpmpp_2m"
        assert not v[name][2][2] and v[name][2][1]["sampler"] == "dpmpp_2m"  # 30 beats DDIM's 40, not 20


TEXT_STUDENTS = {"progressive", "consistency", "consistency-lora", "adversarial", "distribution_matching"}


def test_text_digits_quickstart_plans_validate_with_one_lora_student():
    """Every plan of `distill quickstart --benchmark text-digits` builds a valid config on the SD-shaped teacher;
    exactly one student is LoRA, at a fixed w so that its adapters load onto the teacher; --fast only shrinks."""
    from distill.recipe import load_recipe
    from distill.quickstart import benchmark, plans

    bench = benchmark("text-digits")
    full = {p.name: load_recipe(p.recipe, p.overrides) for p in plans(False, "text-digits")}
    fast = {p.name: load_recipe(p.recipe, p.overrides) for p in plans(True, "text-digits")}
    assert set(full) == set(fast) == TEXT_STUDENTS
    for cfgs in (full, fast):
        for name, c in cfgs.items():
            assert Path(c.teacher).resolve() == bench.teacher.resolve(), name
            assert c.eval.protocol == "text-digits" and c.eval.steps == [1, 2, 4], name
            assert c.guidance.scale == 1.5, name  # the teacher's best FD; the baselines run it too
        assert [n for n, c in cfgs.items() if c.student.lora is not None] == ["consistency-lora"]
        assert cfgs["consistency-lora"].guidance.range is None
        assert cfgs["consistency"].guidance.range is None  # like for like with the LoRA student
    for name in TEXT_STUDENTS:
        assert fast[name].trainer.max_steps < full[name].trainer.max_steps, name
    assert full["progressive"].method.start_steps == 8  # 4-, 2- and 1-step students, all three scored


def test_quickstart_refuses_an_unknown_benchmark():
    from distill.errors import DistillError
    from distill.quickstart import benchmark, plans

    with pytest.raises(DistillError, match="unknown benchmark 'text'.*digits, text-digits"):
        plans(False, "text")
    assert benchmark("digits").teacher.name == "digits-teacher"


def test_verdict_reads_the_named_students():
    from distill.quickstart import verdict

    rows = [{"model": "teacher", "method": "teacher", "sampler": "ddim", "steps": 1, "nfe": 1, "value": 100.0},
            {"model": "teacher", "method": "teacher", "sampler": "ddim", "steps": 1, "nfe": 2, "value": 50.0,
             "guidance": 1.5},  # a guided step counts two: not a bar at 1 NFE
            {"model": "consistency-lora", "method": "consistency", "sampler": "consistency", "steps": 1, "nfe": 1,
             "value": 80.0}]
    v = verdict(rows, steps=(1,), names=("consistency-lora",))
    value, bar, beats, tied = v["consistency-lora"][1]
    assert value == 80.0 and bar["value"] == 100.0 and beats and not tied  # no intervals: nothing to overlap
    rows[0]["value_ci"], rows[2]["value_ci"] = [90.0, 110.0], [70.0, 92.0]
    assert verdict(rows, steps=(1,), names=("consistency-lora",))["consistency-lora"][1][2:] == (True, True)
    rows[2]["value_ci"] = [70.0, 89.0]
    assert verdict(rows, steps=(1,), names=("consistency-lora",))["consistency-lora"][1][2:] == (True, False)


@pytest.mark.slow
def test_text_digits_quickstart_fast_end_to_end(tmp_path):
    """`distill quickstart --benchmark text-digits --fast`: the teacher's baselines unguided and guided, every
    student with FD and prompt accuracy, a LoRA student whose adapters stock diffusers loads onto the teacher."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "qs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "distill.cli", "quickstart", "--benchmark", "text-digits", "--fast", "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out / "LEADERBOARD.md").read_text()
    assert "not the leaderboard's" in md and "Prompt accuracy" in md
    verdicts = [line for line in md.splitlines() if "best training-free sampler at 1, 2 and 4 steps" in line]
    assert {v.split()[1] for v in verdicts} == TEXT_STUDENTS
    teacher = [json.loads(line) for line in (out / "results" / "teacher.jsonl").read_text().splitlines()]
    assert {(r["sampler"], r.get("guidance")) for r in teacher if r["method"] == "teacher"} == {
        (s, w) for s in ("ddim", "dpmpp_2m", "unipc") for w in (1.0, 1.5)}
    for name in TEXT_STUDENTS:
        rows = [json.loads(line) for line in (out / "runs" / name / "results.jsonl").read_text().splitlines()]
        scored = [r for r in rows if r["method"] != "data-floor" and r["model"] == name]
        assert scored and all(r["value"] > 0 and 0 <= r["accuracy"] <= 1 for r in scored), name
        assert (out / "runs" / name / "model" / "distill.json").is_file(), name

    folder = out / "runs" / "consistency-lora" / "model"  # the LCM-LoRA way: adapters + scheduler onto the teacher
    import diffusers
    import torch

    lora = folder / "lora"
    sched = json.loads((lora / "scheduler_config.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(str(ROOT / "distill" / "assets" / "text-digits-sd"))
    pipe.load_lora_weights(lora)
    pipe.scheduler = getattr(diffusers, sched["_class_name"]).from_pretrained(lora)
    fused = DiffusionPipeline.from_pretrained(folder)
    info = json.loads((lora / "distill.json").read_text())
    outs = []
    for pp in (pipe, fused):
        pp.set_progress_bar_config(disable=True)
        torch.manual_seed(0)
        outs.append(pp(["a red seven"], num_inference_steps=info["steps"][-1], guidance_scale=info["guidance"],
                       output_type="np", generator=torch.Generator().manual_seed(0)).images)
    assert outs[0].shape == (1, 32, 32, 3)
    assert abs(outs[0] - outs[1]).max() < 1e-3  # the adapters on the teacher draw what the fused student draws


def _tiny_bench(students: dict[str, tuple[str, list[str]]]):
    """A digits quickstart of a few training steps per student, scored at 1 step on 100 samples (with --fast)."""
    from distill.quickstart import Quickstart, benchmark

    return Quickstart(name="digits", teacher=benchmark("digits").teacher, protocol="digits", recipes=students,
                     steps=[1], teacher_steps=[1], teacher_samplers=["ddim"],
                     fast={name: ["trainer.checkpoint_every=0"] for name in students}, fast_n=100,
                     minutes={"teacher": 0.1, **{name: 1.0 for name in students}})


CONSISTENCY = ("recipes/digits/consistency.yaml", ["method.iters=3", "method.optimizer.warmup_steps=1"])
KD = ("examples/custom_method.yaml", ["method.iters=3", "method.teacher_steps=1"])


def test_quickstart_lanes_split_the_cores_and_pick_one_lane_on_a_gpu():
    from distill.errors import DistillError
    from distill.quickstart import lanes

    assert lanes(None, 5, cores=2, cuda=False) == (2, 1)  # a process per core, a thread each
    assert lanes(None, 5, cores=16, cuda=False) == (5, 3)  # no more lanes than jobs; the cores shared out
    assert lanes(None, 1, cores=2, cuda=False) == (1, 2)  # one job left: it gets every core
    assert lanes(None, 5, cores=16, cuda=True) == (1, 16)  # jobs would share the GPU
    assert lanes(3, 5, cores=2, cuda=True) == (3, 1)  # asked for: as asked
    with pytest.raises(DistillError, match="--jobs must be at least 1"):
        lanes(0, 5, cores=2, cuda=False)


def test_the_job_order_ends_first_and_a_job_waits_for_what_it_starts_from():
    from distill.jobs import makespan, schedule

    jobs = [{"name": n} for n in "ABCDE"]
    minutes = {"A": 3, "B": 3, "C": 2, "D": 2, "E": 2}
    assert makespan(jobs, minutes, 2) == 7  # the longest first: A | B, then C | D, then E alone
    order = schedule(jobs, minutes, 2)
    assert makespan(order, minutes, 2) == 6  # A then B on one lane, C, D, E on the other
    assert sorted(j["name"] for j in order) == list("ABCDE")
    waiting = [{"name": "X", "after": "Y"}, {"name": "Y"}, {"name": "Z"}]
    assert makespan(waiting, {"X": 1, "Y": 5, "Z": 5}, 2) == 6  # X cannot start before Y ends
    assert makespan(schedule(waiting, {"X": 1, "Y": 5, "Z": 5}, 2), {"X": 1, "Y": 5, "Z": 5}, 2) == 6


def test_quickstart_runs_its_jobs_at_once_in_their_own_processes(tmp_path):
    """With two lanes the teacher's baselines and three students run in two long-lived child processes, two jobs at
    a time, and reach one leaderboard; a student that starts from another's model waits for it; the parent's display
    gets their bars."""
    import io

    import yaml
    from rich.console import Console

    from distill.quickstart import run_quickstart

    bench = _tiny_bench({"consistency": CONSISTENCY, "kd": KD, "refine": CONSISTENCY})
    bench = type(bench)(**{**bench.__dict__, "starts_from": {"refine": "consistency"}})
    console = Console(file=io.StringIO(), width=200)
    out = run_quickstart(tmp_path / "qs", fast=True, console=console, bench=bench, jobs=2)
    jobs = out["jobs"]
    assert out["lanes"] == 2 and set(jobs) == {"teacher", "consistency", "kd", "refine"}
    assert os.getpid() not in {j["pid"] for j in jobs.values()}
    assert len({j["pid"] for j in jobs.values()}) == 2  # one process per lane, not per job
    first, second = sorted(jobs.values(), key=lambda j: j["start"])[:2]
    assert second["start"] < first["end"]  # the first two ran at the same time
    for a in jobs.values():  # a lane runs one job at a time
        assert all(b is a or b["pid"] != a["pid"] or b["start"] >= a["end"] or a["start"] >= b["end"]
                   for b in jobs.values())
    assert jobs["refine"]["start"] >= jobs["consistency"]["end"]  # it starts from consistency's student
    cfg = yaml.safe_load((tmp_path / "qs" / "runs" / "refine" / "config.yaml").read_text())
    assert cfg["student"]["init"] == str(tmp_path / "qs" / "runs" / "consistency" / "model")
    for name in ("consistency", "kd", "refine"):
        assert (tmp_path / "qs" / "runs" / name / ".quickstart-done").is_file()
        assert (tmp_path / "qs" / "runs" / name / "results.jsonl").is_file()
    md = (tmp_path / "qs" / "LEADERBOARD.md").read_text()
    assert re.search(r"2 jobs at once with \d+ torch threads? each", md)  # what trained, not the parent's threads
    assert "kd · ddim" in md and "consistency · consistency" in md and "refine · consistency" in md
    said = console.file.getvalue()
    assert "consistency" in said and "kd" in said  # the children's lines reached the parent's console


def test_failed_quickstart_jobs_name_themselves_and_the_others_finish(tmp_path):
    """A job that raises in its child process, and one that kills its process (as the out-of-memory killer would)
    halfway through a message to the parent: the quickstart says which failed and why, after the other jobs finished
    and kept their output (a garbled message must not stall the other lanes' reports). The lane whose job
    raised goes on with the next job; the dead lane's share goes to a fresh process. A student that would start from
    the dead job's student is not run."""
    import io

    from rich.console import Console

    from distill.errors import DistillError
    from distill.quickstart import run_quickstart

    failing = tmp_path / "failing.py"
    failing.write_text(
        "import importlib.util\nimport os\nimport sys\n"
        f"spec = importlib.util.spec_from_file_location('kd_example', {str(ROOT / 'examples' / 'custom_method.py')!r})\n"
        "kd = importlib.util.module_from_spec(spec)\n"
        "sys.modules['kd_example'] = kd  # its dataclasses look their module up\n"
        "spec.loader.exec_module(kd)\n\n\n"
        "class Broken(kd.OneStepKD):\n"
        "    def loss(self, role, batch, step):\n"
        "        raise RuntimeError('boom in the loss')\n\n\n"
        "class Dying(kd.OneStepKD):\n"
        "    def loss(self, role, batch, step):\n"
        "        import gc, struct\n"
        "        box = next(o for o in gc.get_objects() if type(o).__name__ == '_Outbox')\n"
        "        os.write(box.conn.fileno(), struct.pack('!i', 1 << 20) + b'half a message')  # dies mid-message\n"
        "        os._exit(7)\n")
    bench = _tiny_bench({"broken": (KD[0], [*KD[1], f"method.name={failing}:Broken"]),
                         "dying": (KD[0], [*KD[1], f"method.name={failing}:Dying"]), "kd": KD, "orphan": KD})
    # the two failing jobs start first, one per lane (the longest first); kd and the baselines follow
    bench = type(bench)(**{**bench.__dict__, "fast_minutes": {"dying": 3.0, "broken": 2.5, "kd": 2.0, "teacher": 1},
                           "starts_from": {"orphan": "dying"}})
    console = Console(file=io.StringIO(), width=200)
    with pytest.raises(DistillError, match=r"(?s)quickstart jobs failed: .*boom in the loss") as err:
        run_quickstart(tmp_path / "qs", fast=True, console=console, bench=bench, jobs=2)
    said = str(err.value)
    assert set(said.split(" (")[0].split(": ")[1].split(", ")) == {"broken", "dying", "orphan"}
    assert "dying: its process ended with exit code 7" in said
    assert "orphan: not run: it starts from dying's student, and dying failed" in said
    assert not (tmp_path / "qs" / "runs" / "orphan" / "config.yaml").exists()
    assert not (tmp_path / "qs" / "runs" / "broken" / ".quickstart-done").exists()
    assert (tmp_path / "qs" / "runs" / "kd" / ".quickstart-done").is_file()
    assert (tmp_path / "qs" / "results" / "teacher.jsonl").is_file()


def test_lanes_that_cannot_start_stop_the_quickstart_with_the_fix(tmp_path):
    """Spawned processes re-import the script that started them; a script read from stdin has no file, so each lane
    dies before it starts. The quickstart stops with what to do instead of starting lane after lane."""
    script = ("import io, sys\n"
              f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
              "from rich.console import Console\n"
              "from test_quickstart import _tiny_bench, KD\n"
              "from distill.quickstart import run_quickstart\n"
              f"run_quickstart({str(tmp_path / 'qs')!r}, fast=True, console=Console(file=io.StringIO()), "
              "bench=_tiny_bench({'kd': KD}), jobs=2)\n")
    r = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=180, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0
    assert "ended with exit code 1 before it started" in r.stderr and "--jobs 1" in r.stderr, r.stderr[-2000:]


def test_one_lane_runs_the_jobs_in_this_process(tmp_path):
    """--jobs 1 (the default with a GPU): every job runs in the quickstart's own process, one after another, onto
    the same leaderboard."""
    import io

    from rich.console import Console

    from distill.quickstart import run_quickstart

    out = run_quickstart(tmp_path / "qs", fast=True, console=Console(file=io.StringIO(), width=200),
                         bench=_tiny_bench({"kd": KD}), jobs=1)
    assert out["lanes"] == 1 and {j["pid"] for j in out["jobs"].values()} == {os.getpid()}
    (first, a), (second, b) = sorted(out["jobs"].items(), key=lambda kv: kv[1]["start"])
    assert first == "teacher" and a["end"] <= b["start"]  # the baselines, then the student
    assert (tmp_path / "qs" / "runs" / "kd" / ".quickstart-done").is_file()
    assert "kd · ddim" in (tmp_path / "qs" / "LEADERBOARD.md").read_text()
