"""Model cards: every exported student carries ``README.md`` with the hub's metadata header and the exact stock call.

The card's code is run as written (its folder and the prompt swapped for the test's, plus ``latents=`` and a
generator so both sides start from the same noise) on stock ``DiffusionPipeline.from_pretrained``, and its output
is compared with distill's own sampling of the in-memory student (to 1e-4 of the output's scale, as
``distill.export.parity``): a card that left ``guidance_scale`` or ``num_inference_steps`` to diffusers' defaults,
or forgot ``sigmas=``, fails here.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from distill.export import save_student
from distill.model_card import CARD_NAME, write_model_card

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red seven", "the digit two in blue"]


# ---------------------------------------------------------------------------------------------- helpers


def front_matter(text: str) -> dict[str, Any]:
    assert text.startswith("---\n"), text[:80]
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _stock_call(tree: ast.Module) -> tuple[int, ast.Call]:
    """The statement ``images = pipe(...).images`` and its call."""
    for i, node in enumerate(tree.body):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute) and \
                isinstance(node.value.value, ast.Call) and getattr(node.value.value.func, "id", None) == "pipe":
            return i, node.value.value
    raise AssertionError("the card's code has no `images = pipe(...).images`")


def card_kwargs(code: str) -> dict[str, Any]:
    """The literal keyword arguments of the card's call (all but the generator)."""
    _, call = _stock_call(ast.parse(code))
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg != "generator"}


def run_card(code: str, assign: dict[str, Any], override: dict[str, Any]) -> tuple[Any, Any]:
    """Run the card's code up to its call: the variables in ``assign`` (the folder) rebound, the call's keywords
    in ``override`` replaced or added (everything else the card passes stays as written). Returns (images, pipe)."""
    tree = ast.parse(code)
    i, call = _stock_call(tree)
    tree.body = tree.body[: i + 1]
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in assign:
            node.value = ast.Name(id=f"_test_{node.targets[0].id}", ctx=ast.Load())
    call.keywords = [k for k in call.keywords if k.arg not in override]
    call.keywords += [ast.keyword(arg=k, value=ast.Name(id=f"_override_{k}", ctx=ast.Load())) for k in override]
    ast.fix_missing_locations(tree)
    ns: dict[str, Any] = {f"_test_{k}": v for k, v in assign.items()}
    ns.update({f"_override_{k}": v for k, v in override.items()})
    with torch.random.fork_rng(devices=[]):
        exec(compile(tree, "<model card>", "exec"), ns)
    ns["pipe"].set_progress_bar_config(disable=True)
    return ns["images"], ns["pipe"]


def distill_sample(D: Any, folder: Path, steps: int, w: float | None, n: int = 2,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial noise, distill's sample) of the student ``D`` at ``steps`` with the guidance it was made for
    (``w``: fed to a guidance input, else classifier-free guidance above 1, None: none), on its grid from
    distill.json (default: trailing), as parity samples it."""
    from distill.eval.sweep import sigma_grid
    from distill.guidance import CFGDenoiser
    from distill.pipelines import load_pipeline
    from distill.samplers import get_sampler
    from distill.schedules import scale_noise

    p = load_pipeline(folder)
    info = json.loads((folder / "distill.json").read_text())
    cond: dict[str, torch.Tensor] = p.encode_prompts(PROMPTS[:n]) if p.conditioning == "text" else {}
    model = D
    if cond and D.takes_guidance:
        cond["guidance"] = torch.full((n,), float(w))
    elif cond and w is not None and w > 1:
        model = CFGDenoiser(D, p.unconditional(), float(w))
    sigmas = (info.get("sigmas") or {}).get(str(steps))
    grid = torch.tensor(sigmas, dtype=torch.float64) if sigmas is not None else sigma_grid(D, steps, "trailing")
    z = torch.randn((n, *p.sample_shape), generator=torch.Generator().manual_seed(seed))
    x = scale_noise(z, grid[0]) if torch.isinf(grid[0]) else z / float(D.schedule.c_in(grid[:1]))
    with torch.no_grad():
        out = get_sampler(info["sampler"])(model, x, grid, generator=torch.Generator().manual_seed(seed), cond=cond)
    return z, out


def rel_diff(ours: torch.Tensor, theirs: Any) -> float:
    theirs = torch.as_tensor(theirs)
    return float((ours.to(theirs.dtype) - theirs).abs().max()) / max(1.0, float(theirs.abs().max()))


def stock_vs_distill(card: str, folder: Path, D: Any, w: float | None, block: int = 0,
                     assign: dict[str, Any] | None = None) -> float:
    """Run code block ``block`` of the card on the same noise as distill's sampler; the relative max difference."""
    code = code_blocks(card)[block]
    kw = card_kwargs(code)
    z, ours = distill_sample(D, folder, kw["num_inference_steps"], w)
    theirs, _ = run_card(code, assign or {"folder": str(folder)},
                         {"prompt": PROMPTS, "latents": z, "output_type": "latent",
                          "generator": torch.Generator().manual_seed(0)})
    return rel_diff(ours, theirs)


def perturb(module: torch.nn.Module, names: str, seed: int = 1) -> None:
    """Give the zero-initialised layers whose names contain ``names`` weights, so they change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if names in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------- teachers


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory):
    from tiny_pipelines import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("card-teachers") / "tiny-sd")


def load_teacher_denoiser(folder: Path) -> Any:
    from distill.pipelines import load_pipeline

    return load_pipeline(folder).load_denoiser().eval()


# ---------------------------------------------------------------------------------------------- tests


def test_card_header_and_its_call_reproduce_a_fixed_guidance_student(sd_teacher, tmp_path, one_thread):
    """The issue's case: a student distilled at a fixed w, called with only a prompt and a step count, got
    diffusers' default guidance (7.5) on top. The card passes guidance_scale=1.0 and the student's steps."""
    D = load_teacher_denoiser(sd_teacher)  # stands for a student: the export does not care how it was trained
    info = {"name": "fixed-w", "method": "progressive", "recipe": "recipes/text-digits/progressive-sd.yaml",
            "sampler": "ddim", "steps": [2], "guidance": 1.0}
    folder = save_student(D, tmp_path / "student", info, teacher=sd_teacher)
    card = (folder / CARD_NAME).read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "diffusers"
    assert meta["base_model"] == "tiny-sd" and "local teacher folder" in card
    assert meta["pipeline_tag"] == "text-to-image"
    assert meta["tags"] == ["distill", "progressive", "few-step"]
    assert "recipes/text-digits/progressive-sd.yaml" in card and "`DDIMScheduler`" in card
    assert "Not evaluated" in card
    blocks = code_blocks(card)
    assert len(blocks) == 1 and "DiffusionPipeline.from_pretrained(folder)" in blocks[0]
    kw = card_kwargs(blocks[0])
    assert set(kw) == {"prompt", "num_inference_steps", "guidance_scale"}
    assert kw["num_inference_steps"] == 2 and kw["guidance_scale"] == 1.0
    assert stock_vs_distill(card, folder, D, None) <= 1e-4
    # the same call with diffusers' default guidance (what the issue's user ran) is far off: the check can fail
    code = blocks[0].replace("    guidance_scale=1.0,\n", "")
    assert "guidance_scale" not in code
    z, ours = distill_sample(D, folder, 2, None)
    theirs, _ = run_card(code, {"folder": str(folder)}, {"prompt": PROMPTS, "latents": z, "output_type": "latent",
                                                         "generator": torch.Generator().manual_seed(0)})
    assert rel_diff(ours, theirs) > 1e-2


def test_a_guidance_input_student_gets_its_own_w(sd_teacher, tmp_path, one_thread):
    """A w-conditioned UNet (time_cond_proj_dim): the stock pipeline feeds guidance_scale to the network, so the
    card's value must be the recorded w, neither 1 nor diffusers' default."""
    from distill.guidance import add_guidance_input

    D = add_guidance_input(load_teacher_denoiser(sd_teacher), 32)
    perturb(D, "cond_proj")
    info = {"name": "w-student", "method": "progressive", "sampler": "ddim", "steps": [2], "guidance": 3.0}
    folder = save_student(D, tmp_path / "student", info, teacher=sd_teacher)
    card = (folder / CARD_NAME).read_text()
    assert card_kwargs(code_blocks(card)[0])["guidance_scale"] == 3.0
    assert "time_cond_proj_dim" in card
    assert stock_vs_distill(card, folder, D, 3.0) <= 1e-4
    assert stock_vs_distill(card.replace("guidance_scale=3.0", "guidance_scale=1.0"), folder, D, 3.0) > 1e-3


def test_a_lora_student_card_shows_both_folders_and_both_calls_match(sd_teacher, tmp_path, one_thread):
    from distill.config import LoraConfig
    from distill.lora import lora_student

    D = lora_student(load_teacher_denoiser(sd_teacher), LoraConfig(rank=4, alpha=4.0)).eval()
    perturb(D, "lora_B")
    info = {"name": "lora-student", "method": "consistency", "sampler": "ddim", "steps": [2], "guidance": 1.0,
            "teacher": str(sd_teacher)}
    folder = save_student(D, tmp_path / "student", info)
    card = (folder / CARD_NAME).read_text()
    meta = front_matter(card)
    assert meta["tags"] == ["distill", "consistency", "few-step", "lora"] and meta["base_model"] == "tiny-sd"
    assert "## LoRA" in card and "rank 4" in card
    fused, lora = code_blocks(card)
    assert "pipe.load_lora_weights(lora)" in lora and "DDIMScheduler.from_pretrained(lora)" in lora
    assert card_kwargs(lora) == card_kwargs(fused)
    assert stock_vs_distill(card, folder, D, None, block=0) <= 1e-4
    # the LoRA block as written: the teacher it names (this machine's folder), this folder's lora/
    assert stock_vs_distill(card, folder, D, None, block=1, assign={"lora": str(folder / "lora")}) <= 1e-4


def test_a_flow_student_card_passes_its_sigmas(tmp_path, one_thread):
    """SD3 students step at t = 1 - i/k, which the stock call gets as sigmas=; the card writes them."""
    from tiny_pipelines import save_tiny_sd3

    teacher = save_tiny_sd3(tmp_path / "tiny-sd3")
    D = load_teacher_denoiser(teacher)
    sched = D.schedule  # the student's grid: t = 1 - i/k through the teacher's shift (a progressive student's)
    info = {"name": "flow", "method": "progressive", "sampler": "ddim", "steps": [2], "guidance": 1.0,
            "sigmas": {"2": sched.grid_from(sched.uniform(2)).tolist()}, "scheduler_sigmas": {"2": sched.uniform(2)}}
    folder = save_student(D, tmp_path / "student", info, teacher=teacher)
    card = (folder / CARD_NAME).read_text()
    code = code_blocks(card)[0]
    assert "text_encoder_3=None, tokenizer_3=None" in code  # the folder has no T5
    assert card_kwargs(code)["sigmas"] == [1.0, 0.5] and "FlowMatchEulerDiscreteScheduler" in card
    assert stock_vs_distill(card, folder, D, None) <= 1e-4


def test_an_unconditional_student_card(tiny_teacher, tmp_path, one_thread):
    """A DDPMPipeline takes no guidance_scale; its default of 1,000 steps is what the card's steps replace."""
    D = load_teacher_denoiser(tiny_teacher)
    info = {"name": "digits", "method": "progressive", "sampler": "ddim", "steps": [2]}
    folder = save_student(D, tmp_path / "student", info, teacher=tiny_teacher)
    card = (folder / CARD_NAME).read_text()
    assert front_matter(card)["pipeline_tag"] == "unconditional-image-generation"
    code = code_blocks(card)[0]
    assert card_kwargs(code) == {"batch_size": 4, "num_inference_steps": 2}
    z, ours = distill_sample(D, folder, 2, None, n=4)
    images, _ = run_card(code, {"folder": str(folder)}, {"output_type": "np",
                                                          "generator": torch.Generator().manual_seed(0)})
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert rel_diff(ours, images) <= 1e-4


def _row(model: str, steps: int | None, value: float, accuracy: float | None, **extra: Any) -> dict[str, Any]:
    return {"model": model, "method": extra.pop("method", "consistency"), "sampler": "consistency", "steps": steps,
            "nfe": steps, "guidance": 1.0, "value": value, "value_ci": [value - 1, value + 1], "accuracy": accuracy,
            "accuracy_ci": [accuracy - 0.01, accuracy] if accuracy is not None else None,
            "protocol": {"name": "text-digits", "key": "abc123"}, "extractor": {"name": "text-digits-net"},
            "metric": "FD-text-digits", "n": 700, "seed": 0, "floor": 30.51,
            "versions": {"distill": "0.1.0", "diffusers": "9.9"},
            **extra}


def test_results_table_from_the_rows_of_this_student(sd_teacher, tmp_path, one_thread):
    D = load_teacher_denoiser(sd_teacher)
    info = {"name": "cm", "method": "consistency", "sampler": "consistency", "steps": [1, 2], "guidance": 1.0}
    folder = tmp_path / "student"
    save_student(D, folder, {**info, "sampler": "ddim"}, teacher=sd_teacher)  # a folder to describe
    rows = [_row("real data (half B vs A)", None, 30.51, 0.997, method="data-floor", sampler=None),
            _row("cm", 1, 105.93, 0.9957), _row("cm", 2, 38.31, 0.99),
            _row("cm", 4, 27.38, 0.98),  # a step count this student does not have (another milestone's)
            _row("other", 1, 77.77, 0.5)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for results in (rows, path):
        card = write_model_card(folder, info, results, teacher=sd_teacher).read_text()
        assert "Not evaluated" not in card
        table = [line for line in card.splitlines() if line.startswith("| ")]
        assert table[0] == "| steps | NFE | sampler | guidance | FD-text-digits | prompt accuracy |"
        assert table[1:] == ["| 1 | 1 | consistency | 1 | 105.93 [104.93, 106.93] | 99.6% [98.6, 99.6] |",
                             "| 2 | 2 | consistency | 1 | 38.31 [37.31, 39.31] | 99.0% [98.0, 99.0] |",
                             "| data floor | - | - | - | 30.51 [29.51, 31.51] | 99.7% [98.7, 99.7] |"]
        assert "`text-digits`" in card and "n = 700" in card and "diffusers 9.9" in card
        assert "27.38" not in card and "77.77" not in card


def test_a_run_writes_the_card_and_rewrites_it_with_its_evaluation(tmp_path, tiny_teacher, one_thread, monkeypatch):
    """DIR/model gets a card at export; once the trainer has scored the folder, the card carries those rows."""
    try:
        from distill.recipe import load_recipe
    except ImportError:  # pragma: no cover
        from distill.config import load_recipe
    from distill.eval import harness
    from distill.trainer import Trainer

    seen: list[Path] = []

    def scored(folder, *args, **kwargs):
        seen.append(Path(folder))
        card = (Path(folder) / CARD_NAME).read_text()
        assert "Not evaluated" in card  # written by the export, before any evaluation
        return [_row("real data (half B vs A)", None, 1.5, None, method="data-floor", sampler=None),
                _row("run", 1, 12.34, None, method="progressive", sampler="ddim")]

    monkeypatch.setattr(harness, "evaluate", scored)
    over = [f"teacher={tiny_teacher}", "trainer.progress=false", "trainer.batch_size=16", "trainer.checkpoint_every=0",
            "method.start_steps=2", "method.iters_per_phase=1"]
    Trainer(load_recipe(ROOT / "recipes" / "digits" / "progressive.yaml", over), tmp_path / "run").fit()
    assert tmp_path / "run" / "model" in seen
    card = (tmp_path / "run" / "model" / CARD_NAME).read_text()
    meta = front_matter(card)
    assert meta["base_model"] == Path(tiny_teacher).name and "progressive" in meta["tags"]
    assert "| 1 | 1 | ddim | 1 | 12.34 [11.34, 13.34] |" in card and "Not evaluated" not in card
    assert card_kwargs(code_blocks(card)[0])["num_inference_steps"] == 1

