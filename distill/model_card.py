"""Model cards for exported students: ``README.md`` with the hub's metadata header and the exact stock call.

Every student folder :func:`distill.export.save_student` writes gets a card (:func:`write_model_card`): a YAML
front matter (``library_name: diffusers``, ``base_model``, ``pipeline_tag``, ``tags``) and, generated from the
folder's own files and ``distill.json``, what the student is (method, recipe, teacher), the stock diffusers code
that samples it (``DiffusionPipeline.from_pretrained``, the call with ``num_inference_steps`` and
``guidance_scale`` always explicit, any ``sigmas=``, the scheduler class its folder holds), the LoRA variant when
``lora/`` exists, and its evaluation rows when there are any (the trainer rewrites the card with them once it has
scored the folder).

Why the call spells out ``num_inference_steps`` and ``guidance_scale``: both are keyword defaults of the stock
pipeline's ``__call__`` (50 steps and guidance 7.5 for ``StableDiffusionPipeline`` in diffusers 0.42), and no file
in a pipeline folder (``model_index.json``, ``scheduler_config.json``, a network config) sets them. A student
distilled at a fixed guidance scale called with the default guidance gets classifier-free guidance on top of what
it learnt. The one config switch that turns stock guidance off, ``unet.config.time_cond_proj_dim`` (SD and SDXL
then skip classifier-free guidance for every ``guidance_scale``), is not used: it makes the folder a
guidance-embedded network to diffusers and to distill alike (see ``docs/export.md``).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

CARD_NAME = "README.md"
PIPELINE_TAGS = {"text": "text-to-image", None: "unconditional-image-generation"}  # by distill's conditioning
FLOOR_METHOD = "data-floor"


# ---------------------------------------------------------------------------------------------- facts


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def teacher_reference(teacher: str | Path | None) -> tuple[str | None, bool]:
    """``(name, is_local)`` for a teacher given as a hub id or a folder: a hub id stays as it is (so does a folder
    in the hub cache, ``.../models--org--name/snapshots/<rev>``, which becomes ``org/name``); a local folder is
    named by its folder name."""
    if teacher is None:
        return None, False
    from distill.hub import looks_like_hub_id

    text = str(teacher)
    path = Path(text).expanduser()
    if path.is_dir():
        parts = path.resolve().parts
        for i, part in enumerate(parts[:-1]):
            if part.startswith("models--") and parts[i + 1] == "snapshots":
                return part[len("models--"):].replace("--", "/"), False
        return path.resolve().name, True
    if looks_like_hub_id(text):
        return text, False
    return path.name or text, True


def _class_name(folder: Path) -> str:
    return str(_read_json(folder / "model_index.json").get("_class_name", "DDPMPipeline"))


def _conditioning(folder: Path, class_name: str) -> str | None:
    try:
        from distill.pipelines import load_pipeline

        return load_pipeline(folder).conditioning
    except Exception:  # a folder distill cannot read: fall back to the pipeline's call signature
        params = _call_params(class_name)
        return "text" if "prompt" in params else "class" if "class_labels" in params else None


def _call_params(class_name: str) -> Mapping[str, inspect.Parameter]:
    import diffusers

    cls = getattr(diffusers, class_name, None)
    return inspect.signature(cls.__call__).parameters if cls is not None else {}


def _default(params: Mapping[str, inspect.Parameter], name: str) -> Any:
    p = params.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def call_guidance(class_name: str, info: Mapping[str, Any]) -> float | None:
    """The ``guidance_scale`` a stock call passes: what ``distill.json`` records, 1.0 (no classifier-free
    guidance) for a student that needs none; None for a pipeline without the argument (``DDPMPipeline``). The
    same value :func:`distill.export.parity` checks."""
    if "guidance_scale" not in _call_params(class_name):
        return None
    g = info.get("guidance")
    return 1.0 if g is None else float(g)


def stock_call(folder: str | Path, info: Mapping[str, Any], steps: int | None = None) -> dict[str, Any]:
    """The keyword arguments (besides the prompt or labels and a generator) the card's call passes at ``steps``
    (default: the fewest the student supports): ``num_inference_steps``, ``guidance_scale`` where the pipeline
    takes one, ``sigmas`` where ``distill.json`` records the stock scheduler's (flow students), and ``num_frames``
    where it records the clips' length (video students)."""
    folder = Path(folder)
    supported = [int(k) for k in info.get("steps") or []]
    k = int(steps) if steps is not None else (min(supported) if supported else None)
    kw: dict[str, Any] = {}
    if k is not None:
        kw["num_inference_steps"] = k
    g = call_guidance(_class_name(folder), info)
    if g is not None:
        kw["guidance_scale"] = g
    sigmas = (info.get("scheduler_sigmas") or {}).get(str(k))
    if sigmas is not None:
        kw["sigmas"] = [float(s) for s in sigmas]
    if info.get("num_frames") and "num_frames" in _call_params(_class_name(folder)):
        kw["num_frames"] = int(info["num_frames"])
    return kw


def _example_input(conditioning: str | None, rows: Sequence[Mapping[str, Any]]) -> tuple[str, Any]:
    """The call's input: a prompt (the first of the protocol the student was scored on, when it can be read),
    class labels, or a batch size."""
    if conditioning == "class":
        return "class_labels", [0]
    if conditioning != "text":
        return "batch_size", 4
    for r in rows:
        name = (r.get("protocol") or {}).get("name")
        if name:
            try:
                from distill.eval.protocol import load_protocol

                prompts = load_protocol(name).prompt_list()
                if prompts:
                    return "prompt", prompts[0]
            except Exception:
                pass
    return "prompt", "a photo of a cat"


# ---------------------------------------------------------------------------------------------- results


def _load_rows(results: str | Path | Iterable[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    if results is None:
        return []
    if isinstance(results, (str, Path)):
        path = Path(results)
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows
    return [dict(r) for r in results]


def student_rows(rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    """``(floor rows, student rows)`` of ``rows`` that belong to the student ``info`` describes: its name, method
    and sampler, at step counts it supports (a run's ``results.jsonl`` also holds its milestone students' rows);
    the last row for each (protocol, metric, sampler, steps, guidance) wins."""
    floors: dict[tuple, dict] = {}
    mine: dict[tuple, dict] = {}
    steps = {int(k) for k in info.get("steps") or []}
    for r in rows:
        proto = r.get("protocol") or {}
        group = (proto.get("name"), proto.get("key"), r.get("metric"))
        if r.get("method") == FLOOR_METHOD:
            floors[group] = dict(r)
            continue
        if info.get("name") is not None and r.get("model") != info.get("name"):
            continue
        if info.get("method") is not None and r.get("method") != info.get("method"):
            continue
        if info.get("sampler") is not None and r.get("sampler") != info.get("sampler"):
            continue
        if steps and r.get("steps") not in steps:
            continue
        mine[(*group, r.get("sampler"), r.get("steps"), r.get("guidance"))] = dict(r)
    used = {k[:3] for k in mine}
    return [f for g, f in floors.items() if g in used], sorted(mine.values(), key=lambda r: (
        str((r.get("protocol") or {}).get("name")), str(r.get("metric")), r.get("steps") or 0))


def _ci(ci: Any, fmt: str, scale: float = 1.0) -> str:
    if not ci or len(ci) != 2 or any(v is None for v in ci):
        return ""
    return f" [{ci[0] * scale:{fmt}}, {ci[1] * scale:{fmt}}]"


def _results_section(floors: list[dict], rows: list[dict]) -> list[str]:
    out = ["## Results", ""]
    if not rows:
        return out + ["Not evaluated: no evaluation rows were recorded for this folder (a run scores its students "
                      "when `eval.protocol` is set; `distill eval FOLDER` scores one).", ""]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        proto = r.get("protocol") or {}
        groups.setdefault((proto.get("name"), proto.get("key"), r.get("metric")), []).append(r)
    for (name, key, metric), rs in groups.items():
        first = rs[0]
        extractor = (first.get("extractor") or {}).get("name")
        n = first.get("n")
        line = (f"Scored by distill's evaluation harness with distill's own sampler on this folder: protocol "
                f"`{name}` (key `{key}`), metric `{metric}` (Fréchet distance"
                + (f" in the features of `{extractor}`" if extractor else "") + ", lower is better)"
                + (f" over n = {n} samples" if n is not None else "")
                + (f" (seed {first['seed']})" if first.get("seed") is not None else "") + ".")
        has_acc = any(r.get("accuracy") is not None for r in rs)
        if has_acc:
            line += " Prompt accuracy: the share of samples the protocol's classifier reads as their prompt."
        if any(r.get("value_ci") for r in rs):
            line += " Brackets: 95% bootstrap intervals."
        out += [line, ""]
        header = ["steps", "NFE", "sampler", "guidance", metric or "value"] + (["prompt accuracy"] if has_acc else [])
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        floor = next((f for f in floors if ((f.get("protocol") or {}).get("name"), (f.get("protocol") or {}).get("key"),
                                            f.get("metric")) == (name, key, metric)), None)
        for r in rs:
            g = r.get("guidance")
            cells = [str(r.get("steps")), str(r.get("nfe")), str(r.get("sampler")), "-" if g is None else f"{g:g}",
                     f"{r['value']:.2f}{_ci(r.get('value_ci'), '.2f')}" if r.get("value") is not None else "-"]
            if has_acc:
                a = r.get("accuracy")
                cells.append("-" if a is None else f"{a * 100:.1f}%{_ci(r.get('accuracy_ci'), '.1f', 100.0)}")
            out.append("| " + " | ".join(cells) + " |")
        if floor is not None:
            cells = ["data floor", "-", "-", "-", f"{floor['value']:.2f}{_ci(floor.get('value_ci'), '.2f')}"]
            if has_acc:
                a = floor.get("accuracy")
                cells.append("-" if a is None else f"{a * 100:.1f}%{_ci(floor.get('accuracy_ci'), '.1f', 100.0)}")
            out.append("| " + " | ".join(cells) + " |")
            out += ["", "The data floor is real data scored against real data (two halves of the protocol's data "
                        "set): what the metric reads for a perfect model at this sample count."]
        versions = first.get("versions") or {}
        made = ", ".join(f"{k} {versions[k]}" for k in ("distill", "diffusers", "torch") if k in versions)
        if made or first.get("git"):
            out += ["", "Measured with " + made + (f" (git {first['git']})" if first.get("git") else "") + "."]
        out.append("")
    return out


# ---------------------------------------------------------------------------------------------- the card


def _code(lines: list[str]) -> list[str]:
    return ["```python", *lines, "```", ""]


def _lit(value: Any) -> str:
    """``value`` as a Python literal, strings in double quotes."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_lit(v) for v in value) + "]"
    return repr(value)


def _call_lines(input_name: str, input_value: Any, kw: Mapping[str, Any], global_seed: bool) -> list[str]:
    lines = ["torch.manual_seed(0)  # FlowMatchLCMScheduler draws its re-noising from torch's global stream"] \
        if global_seed else []
    out = "frames" if "num_frames" in kw else "images"  # a video pipeline's output holds clips
    lines += [f"{out} = pipe(", f"    {input_name}={_lit(input_value)},"]
    lines += [f"    {k}={_lit(v)}," for k, v in kw.items()]
    lines += ["    generator=torch.Generator().manual_seed(0),", f").{out}"]
    return lines


def _load_args(folder: Path) -> str:
    from distill.pipelines import load_kwargs

    return "".join(f", {k}={_lit(v)}" for k, v in load_kwargs(folder).items())


def _guidance_note(class_name: str, info: Mapping[str, Any], network_cfg: Mapping[str, Any],
                   params: Mapping[str, inspect.Parameter]) -> str:
    g = call_guidance(class_name, info)
    default = _default(params, "guidance_scale")
    if g is None:
        return f"`{class_name}` takes no guidance scale: the student is unconditional."
    dflt = f"; diffusers' default, {default}, " if default is not None else "; a default "
    if network_cfg.get("time_cond_proj_dim") is not None:
        return (f"The student takes the guidance scale as a network input (`time_cond_proj_dim`): the stock pipeline "
                f"feeds it `guidance_scale` and runs no classifier-free guidance. `distill.json` records "
                f"`guidance` {info.get('guidance')!r}, the scale it was exported and scored at{dflt}would feed it "
                "another.")
    if info.get("guidance") is None:
        return (f"The student was distilled without classifier-free guidance: `guidance_scale={g!r}` keeps the stock "
                f"pipeline from applying it{dflt}would.")
    if g <= 1:
        return (f"The student was distilled at a fixed classifier-free guidance scale, which its network has learnt: "
                f"it needs none at sampling time, and `guidance_scale={g!r}` (what `distill.json` records) keeps the "
                f"stock pipeline from applying guidance on top{dflt}would.")
    return (f"`distill.json` records `guidance` {g!r}: the stock pipeline applies classifier-free guidance at that "
            f"scale, as distill scored it{dflt}would apply another.")


def render_model_card(folder: str | Path, info: Mapping[str, Any],
                      results: str | Path | Iterable[Mapping[str, Any]] | None = None, *,
                      teacher: str | Path | None = None) -> str:
    """The text of ``folder``'s model card (see :func:`write_model_card`)."""
    folder = Path(folder)
    class_name = _class_name(folder)
    params = _call_params(class_name)
    conditioning = _conditioning(folder, class_name)
    index = _read_json(folder / "model_index.json")
    net_name = next((k for k in ("unet", "transformer") if isinstance(index.get(k), list)), "unet")
    network_cfg = _read_json(folder / net_name / "config.json")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json").get("_class_name", "its scheduler")
    lora_dir = folder / "lora"
    lora_info = _read_json(lora_dir / "distill.json") if lora_dir.is_dir() else {}
    base, local = teacher_reference(teacher or info.get("teacher") or lora_info.get("teacher"))
    method = info.get("method") or "student"
    steps = sorted(int(k) for k in info.get("steps") or [])
    floors, rows = student_rows(_load_rows(results), info)

    meta: dict[str, Any] = {"library_name": "diffusers"}
    if base:
        meta["base_model"] = base
    tag = PIPELINE_TAGS.get(conditioning)  # none for class-conditional pipelines (DiT)
    if tag:
        meta["pipeline_tag"] = tag
    tags = ["distill", str(method), "few-step"] + (["lora"] if lora_dir.is_dir() else [])
    meta["tags"] = list(dict.fromkeys(tags))
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]

    name = info.get("name") or folder.name
    lines += [f"# {name}", ""]
    teacher_text = f"`{base}`" + (" (a local teacher folder, not a hub model)" if local else "") if base else \
        "its teacher"
    what = (f"A student of {teacher_text}, distilled with distill's `{method}` method"
            + (f" (recipe `{info['recipe']}`)" if info.get("recipe") else "") + ", "
            + (f"for {', '.join(map(str, steps))} sampling step{'s' if steps != [1] else ''}. " if steps else ". "))
    what += (f"The folder is a stock diffusers `{class_name}`: the student's `{net_name}/`, the scheduler that "
             f"samples it (`{scheduler}`), and the teacher's other components unchanged; `distill.json` records how "
             "it was made.")
    lines += [what, ""]

    lines += ["## How to use", ""]
    input_name, input_value = _example_input(conditioning, rows)
    kw = stock_call(folder, info)
    flow_lcm = scheduler == "FlowMatchLCMScheduler"
    lines += _code(["import torch", "from diffusers import DiffusionPipeline", "",
                    f"folder = {_lit(folder.name)}  # this folder: its local path, or its hub id once uploaded",
                    f"pipe = DiffusionPipeline.from_pretrained(folder{_load_args(folder)})",
                    *_call_lines(input_name, input_value, kw, flow_lcm)])
    notes = []
    d_steps = _default(params, "num_inference_steps")
    if steps:
        counts = ", ".join(map(str, steps))
        notes.append(f"`num_inference_steps={kw['num_inference_steps']}`: the student was distilled for {counts} "
                     f"step{'s' if steps != [1] else ''}, and `num_inference_steps` must be one of those"
                     + (f" (diffusers' default, {d_steps}, is meant for an undistilled model)" if d_steps is not None
                        else "") + ".")
    notes.append(_guidance_note(class_name, info, network_cfg, params))
    notes.append(f"The scheduler is `{scheduler}` (`scheduler/scheduler_config.json`), which `from_pretrained` "
                 "loads with the folder; keep it: the student's step grid is set there.")
    sig = info.get("scheduler_sigmas") or {}
    if sig:
        per_k = "; ".join(f"{k} steps: `sigmas={[float(s) for s in v]!r}`" for k, v in sorted(
            sig.items(), key=lambda kv: int(kv[0])))
        notes.append(f"Pass `sigmas=` with each step count (the points the student steps at): {per_k}.")
    if _load_args(folder):
        notes.append(f"The folder has no T5 text encoder: diffusers loads it only with `{_load_args(folder)[2:]}`.")
    explicit = "Both `num_inference_steps` and `guidance_scale` are" if "guidance_scale" in kw else \
        "`num_inference_steps` is"
    notes.append(f"{explicit} passed explicitly because a pipeline folder cannot change the defaults: they are "
                 "keyword defaults of the pipeline's `__call__`, and no file in the folder sets them.")
    lines += [f"- {n}" for n in notes] + [""]

    if lora_dir.is_dir():
        lines += ["## LoRA", ""]
        lora = lora_info.get("lora") or {}
        lt = lora_info.get("teacher")
        lt_ref, lt_local = teacher_reference(lt)
        if lora and not lora.get("stock_loader", True):
            lines += [f"`lora/` holds the student's adapters ({lora.get('weights')}), but diffusers has no LoRA loader "
                      f"for `{class_name}`: use the fused folder above.", ""]
        else:
            sched_lora = _read_json(lora_dir / "scheduler_config.json").get("_class_name", scheduler)
            shape = f"rank {lora['rank']}, alpha {lora['alpha']:g}, on {', '.join(lora['target_modules'])}" if \
                lora else "low-rank adapters"
            lines += [f"The folder above is the student with its adapters merged. `lora/` holds the adapters alone "
                      f"({shape}): load them onto the teacher with `load_lora_weights` and swap in the student's "
                      f"`{sched_lora}` from `lora/scheduler_config.json`.", ""]
            teacher_line = f"teacher = {_lit(str(lt) if lt else base)}" + (
                "  # the teacher's folder (local, not on the hub)" if lt_local else "  # the teacher's hub id")
            lines += _code(["import torch", f"from diffusers import DiffusionPipeline, {sched_lora}", "",
                            teacher_line,
                            f"lora = {_lit(folder.name + '/lora')}  # this folder's lora/",
                            f"pipe = DiffusionPipeline.from_pretrained(teacher{_load_args(Path(lt)) if lt else ''})",
                            "pipe.load_lora_weights(lora)",
                            f"pipe.scheduler = {sched_lora}.from_pretrained(lora)",
                            *_call_lines(input_name, input_value, kw, sched_lora == "FlowMatchLCMScheduler")])
            if lt_ref != base and lt_ref:
                lines += [f"(`{lt_ref}` is the teacher the adapters were trained on.)", ""]

    lines += _results_section(floors, rows)
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(folder: str | Path, info: Mapping[str, Any],
                     results: str | Path | Iterable[Mapping[str, Any]] | None = None, *,
                     teacher: str | Path | None = None) -> Path:
    """Write ``folder/README.md``, the student's model card, and return its path.

    ``info``: the student's ``distill.json`` (method, recipe, sampler, steps, ``guidance``, ``scheduler_sigmas``);
    ``results``: evaluation rows (a list, or a ``results.jsonl`` path), of which those of this student are shown
    (without any, the card says it was not evaluated); ``teacher``: the teacher's hub id or folder, for
    ``base_model`` (default ``info["teacher"]``, which a LoRA student's carries). Calling it again rewrites the
    card, as the trainer does once it has scored the folder."""
    path = Path(folder) / CARD_NAME
    path.write_text(render_model_card(folder, info, results, teacher=teacher))
    return path
