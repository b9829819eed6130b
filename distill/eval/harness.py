"""The evaluation harness: quality (FD/FID) against the number of sampling steps.

``evaluate(model, protocol, steps)`` samples ``protocol.n`` images per (sampler, step count), sample i from
its own seed ``protocol.seed + i`` (so images do not depend on the batch size, and the same seeds serve every
step count and every model), scores them against the protocol's reference, and returns one row per point
plus the protocol's data-vs-data floor row. ``write_rows`` appends rows to a JSONL file.

A protocol with ``draws: K`` samples K * n per point (seeds ``seed .. seed + K n - 1``) and its row's headline
(``value``, ``value_ci``) is the FD of all of them with its sample-size bias removed
(:func:`~distill.eval.frechet.pooled_fd`); ``kid`` and ``kid_se`` are KID over the same samples; ``single`` and
``single_ci`` are the first draw's plain FD, the number a one-draw protocol gives.

A model is a diffusers pipeline folder (or hub id), a denoiser ``D(x, sigma)``, or a sampler function
``fn(noise, steps, generators) -> images`` taking standard-normal noise (B, C, H, W). A pipeline folder
with a ``distill.json`` is a student: it is evaluated with its own sampler at the step counts it supports.

Conditional models (text or class teachers and their students) are sampled for the protocol's prompt or label
set (sample i for ``prompts[i % len]``) at each of its guidance scales (classifier-free guidance through
:class:`~distill.guidance.CFGDenoiser`; a guidance-embedded student takes ``w`` as an input instead), and latent
models' samples are decoded by the pipeline's VAE before they are scored. Rows carry the guidance scale.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from distill.errors import DistillError
from distill.eval.frechet import bootstrap_fd, bootstrap_mean, kid, pooled_fd
from distill.eval.protocol import Protocol, judge, load_protocol, reference
from distill.eval.sweep import Draw, denoiser_draw, generate, sigma_grid
from distill.models import Model, open_model
from distill.samplers import SAMPLERS, SCHEDULER_SAMPLERS, nfe, scheduler_sigmas

ROOT = Path(__file__).resolve().parents[2]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("distill", "torch", "diffusers", "accelerate", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_rev() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> str:
    import os

    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPU cores ({cpu}), {torch.get_num_threads()} torch threads{gpu}"


def point_draw(model: Model, sampler: str, steps: int, protocol: Protocol, w: float | None = None) -> Draw:
    """The draw function ``fn(noise, generators, **cond) -> samples`` that scores one point of ``model``: its own
    sampler function, a student's sigmas, a stock solver on its scheduler's grid, or ``sampler`` on the protocol's
    grid; with classifier-free guidance at ``w`` where the model does not take ``w`` as an input; latent samples
    decoded by the pipeline's VAE."""
    if model.sampler_fn is not None:
        return lambda noise, gens, **cond: model.sampler_fn(noise, steps, gens)
    if steps in model.sigmas:
        sigmas = torch.tensor(model.sigmas[steps], dtype=torch.float64)
    elif sampler in SCHEDULER_SAMPLERS:  # a stock solver samples on its own scheduler's grid
        sigmas = scheduler_sigmas(model.denoiser, sampler, steps)
    else:
        sigmas = sigma_grid(model.denoiser, steps, protocol.grid_for(sampler), protocol.karras_sigma_max)
    D = model.denoiser
    if w is not None and w != 1 and not getattr(D, "takes_guidance", False):
        from distill.guidance import CFGDenoiser

        D = CFGDenoiser(D, {k: v.to(next(D.parameters()).device) for k, v in model.pipeline.unconditional().items()},
                        w)
    p = model.pipeline
    decode = p.to_images if p is not None and p.spec.latent else None
    return denoiser_draw(D, sampler, sigmas, decode)


def check_conditioning(model: Model, protocol: Protocol) -> None:
    """Refuse a protocol whose prompt or label set does not fit the model's conditioning."""
    p = model.pipeline
    kind = p.conditioning if p is not None else None
    prompts, labels = protocol.prompt_list(), protocol.labels
    if kind is None and (prompts or labels):
        raise DistillError(f"{model.name} is unconditional but protocol {protocol.name!r} has "
                           f"{'prompts' if prompts else 'labels'}; use a protocol without them.")
    if kind == "text" and not prompts:
        raise DistillError(f"{model.name} is text-conditional; protocol {protocol.name!r} needs a prompt set "
                           "(prompts: a list, or a file with one prompt a line).")
    if kind == "class" and not labels:
        raise DistillError(f"{model.name} is class-conditional; protocol {protocol.name!r} needs labels (a list of "
                           "class indices).")


def conditioning(model: Model, protocol: Protocol, n: int) -> dict[str, torch.Tensor]:
    """The ``cond`` rows (n of each) for sampling a conditional model under ``protocol``; {} for others."""
    check_conditioning(model, protocol)
    p = model.pipeline
    kind = p.conditioning if p is not None else None
    prompts, labels = protocol.prompt_list(), protocol.labels
    if kind is None:
        return {}
    if kind == "text":
        distinct = sorted(set(prompts))
        table = p.encode_prompts(distinct)
        where = {c: i for i, c in enumerate(distinct)}
        idx = torch.tensor([where[prompts[i % len(prompts)]] for i in range(n)])
        return {k: v[idx] for k, v in table.items()}
    return p.labels([labels[i % len(labels)] for i in range(n)])


def guidance_scales(model: Model, protocol: Protocol, guidance: Sequence[float] | None) -> list[float | None]:
    """The guidance scales a model is scored at: given ones, else a student's own, else the protocol's; [None]
    for an unconditional model."""
    if model.pipeline is None or model.pipeline.conditioning is None:
        if guidance and any(w != 1 for w in guidance):
            raise DistillError(f"{model.name} is unconditional; classifier-free guidance needs a conditional model. "
                               "Drop the guidance scale(s).")
        return [None]
    if guidance:
        return [float(w) for w in guidance]
    if model.method not in ("teacher", "custom"):
        return [float(model.guidance) if model.guidance is not None else 1.0]
    return [float(w) for w in protocol.guidance]


def evaluate(
    model: Any,
    protocol: str | Path | Protocol,
    steps: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    samplers: Sequence[str] | None = None,
    *,
    name: str | None = None,
    grids: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    extractor: Any = None,
    guidance: Sequence[float] | None = None,
    processes: Any = None,
) -> list[dict[str, Any]]:
    """Score ``model`` at every (sampler, step count); returns the rows (floor row first). Writes nothing
    except sample grids when ``grids`` is a folder (written after every point has been scored).

    Several processes (``processes``: an ``accelerate.PartialState``; by default the one ``torchrun`` /
    ``accelerate launch`` started, if any) share the work: each samples a contiguous share of the ``n`` samples
    (each sample from its own seed, so the images are those of one process) and computes their features; the
    features are gathered in order and every process computes the same FD. Only the first process writes grids.
    Every process must call this (it holds collectives)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from distill.media import MEDIA_SUFFIX, kind_of, save_grid, save_media, save_prompt_grid

    proto = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
    m = open_model(model, name)
    if isinstance(m.denoiser, torch.nn.Module):
        m.denoiser.to(device)
    chosen = tuple(samplers) if samplers else m.samplers
    if m.sampler_fn is None:
        unknown = [s for s in chosen if s not in SAMPLERS]
        if unknown:
            raise DistillError(f"unknown sampler(s) {', '.join(unknown)}; choose from {', '.join(sorted(SAMPLERS))}.")
        if m.method != "teacher" and samplers and tuple(samplers) != m.samplers:
            raise DistillError(f"{m.name} is a {m.method} student that samples with {m.samplers[0]!r}; drop --sampler.")
    steps = sorted({int(k) for k in steps})
    if not steps or steps[0] < 1:
        raise DistillError(f"step counts must be positive integers, got {list(steps)}.")
    if m.steps is not None:
        unsupported = [k for k in steps if k not in m.steps]
        steps = [k for k in steps if k in m.steps]
        if not steps:
            raise DistillError(f"{m.name} supports {list(m.steps)} steps, none of {unsupported}.")
    check_conditioning(m, proto)
    scales = guidance_scales(m, proto, guidance)
    state = processes if processes is not None else _launched_processes()
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    if world > 1:
        with state.main_process_first():  # the first process fills the reference cache, the others read it
            ref = reference(proto, extractor, device=device)
    else:
        ref = reference(proto, extractor, device=device)
    if m.pipeline is not None:
        makes, noise_shape = m.pipeline.image_shape, m.pipeline.sample_shape
    elif hasattr(m.denoiser, "shape"):
        makes = noise_shape = m.denoiser.shape()
    else:
        makes = noise_shape = tuple(ref.shape)
    if tuple(makes) != tuple(ref.shape):
        raise DistillError(
            f"{m.name} makes {'x'.join(map(str, makes))} samples, but protocol {proto.name!r} scores "
            f"{'x'.join(map(str, ref.shape))} images of {proto.dataset!r}; evaluate it with a protocol of its own data "
            "(eval.protocol in a recipe, --protocol here), or none (eval.protocol: null).")
    draws = proto.draws
    total = draws * ref.n  # samples per point: the first n are the single draw
    cond = conditioning(m, proto, total)
    targets = proto.prompt_targets() if proto.judge else None
    prompt_list = proto.prompt_list() if cond else None
    n_prompts = len(prompt_list) if prompt_list else (len(proto.labels) if cond and proto.labels else 0)
    common = {
        "protocol": {"name": proto.name, "key": proto.key()},
        "extractor": {"name": ref.extractor.name, "weights_hash": ref.extractor.weights_hash()},
        "metric": ref.extractor.metric, "n": ref.n, "seed": proto.seed, "floor": ref.floor,
        "versions": versions(), "git": git_rev(), "machine": machine(),
    }
    if draws > 1:
        common["draws"] = draws
    floor_accuracy_ci = list(ref.floor_accuracy_ci) if ref.floor_accuracy_ci else None
    floor_row = {"model": "real data (half B vs A)", "method": "data-floor", "recipe": None, "sampler": None,
                 "steps": None, "nfe": None, "value": ref.floor, "value_ci": list(ref.floor_ci) if ref.floor_ci else None,
                 "accuracy": ref.floor_accuracy, "accuracy_ci": floor_accuracy_ci, "kid": ref.pooled_floor["kid"],
                 "kid_se": ref.pooled_floor["kid_se"], **common, "wall_s": None, "samples_per_s": None}
    if "aspects" in ref.pooled_floor:
        floor_row["aspects"] = ref.pooled_floor["aspects" if draws > 1 else "aspects_single"]
    if draws > 1:  # every real image of half B, on the pooled rows' bias-corrected scale
        pf = ref.pooled_floor
        floor_row.update({"single": ref.floor, "single_ci": floor_row["value_ci"], "value": pf["value"],
                          "value_ci": pf["ci"], "fd_plain": pf["plain"], "fd_bias": pf["bias"], "pooled_n": pf["n"],
                          "accuracy": pf.get("accuracy", ref.floor_accuracy),
                          "accuracy_ci": pf.get("accuracy_ci", floor_accuracy_ci)})
    rows: list[dict[str, Any]] = [floor_row]
    pending_grids = []
    points = [(s, k, w) for s in chosen for k in steps for w in scales]
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress)
    with bar:
        task = bar.add_task(f"eval {m.name}", total=len(points) * total)
        for sampler, k, w in points:
            label = f"{sampler} {k} step{'s' if k > 1 else ''}" + (f" w={w:g}" if w is not None else "")
            bar.update(task, description=f"eval {m.name}: {label}")
            t0 = time.perf_counter()
            embedded = w is not None and getattr(m.denoiser, "takes_guidance", False)
            point_cond = {**cond, "guidance": float(w)} if embedded else cond
            share = _share(total, rank, world)
            imgs = generate(point_draw(m, sampler, k, proto, w), total, noise_shape, seed=proto.seed,
                            batch_size=proto.batch_size, device=device, progress=lambda b: bar.advance(task, b * world),
                            cond=point_cond, rows=share)
            gen_s = time.perf_counter() - t0
            feats = _gathered_features(ref, imgs, total, world)
            value = ref.fd_of_features(feats[: ref.n])
            value_ci = bootstrap_fd(feats[: ref.n], ref.stats)
            kid_value, kid_se = kid(feats, ref.features)
            local = ref.aspects(imgs)
            aspects = ({name: float(_gathered(v, total, world).mean()) for name, v in local.items()}
                       if local is not None else None)
            accuracy = accuracy_ci = None
            if targets is not None:
                mine = {f: torch.tensor([v[i % len(v)] for i in share]) for f, v in targets.items()}
                correct = _gathered(judge(ref.extractor, imgs, mine).to(torch.uint8), total, world).bool()
                accuracy, accuracy_ci = float(correct.float().mean()), bootstrap_mean(correct)
            calls = k if m.sampler_fn is not None else nfe(sampler, k)  # a sampler function: one call per step
            if w is not None and w != 1 and not embedded:
                calls *= 2  # classifier-free guidance: two network evaluations per step (one batched forward)
            rows.append({
                "model": m.name, "method": m.method, "recipe": m.recipe, "sampler": sampler, "steps": k,
                "nfe": calls, "guidance": w,
                "grid": "student" if k in m.sigmas else ("scheduler" if sampler in SCHEDULER_SAMPLERS else
                                                         proto.grid_for(sampler) if m.sampler_fn is None else None),
                "value": value, "value_ci": list(value_ci), "accuracy": accuracy,
                "accuracy_ci": list(accuracy_ci) if accuracy_ci else None, "kid": kid_value, "kid_se": kid_se,
                **({"aspects": aspects} if aspects is not None else {}),
                **common, "wall_s": None, "samples_per_s": round(total / gen_s, 1), "processes": world,
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            })
            if draws > 1:
                pooled = pooled_fd(feats, ref.stats)
                rows[-1].update({"single": value, "single_ci": list(value_ci), "value": pooled.value,
                                 "value_ci": list(pooled.ci), "fd_plain": pooled.plain, "fd_bias": pooled.bias,
                                 "pooled_n": pooled.n})
            rows[-1]["wall_s"] = round(time.perf_counter() - t0, 3)
            if grids is not None and rank == 0:
                tag = f"-w{w:g}" if w is not None else ""
                suffix = MEDIA_SUFFIX[kind_of(imgs)]  # a PNG grid, a GIF of the clips, a WAV of the clips
                path = Path(grids) / slug(m.name) / f"{sampler}-{k}{tag}{suffix}"
                # conditional models: one prompt (or label) per grid row, 8 samples each
                pending_grids.append((imgs[: 8 * n_prompts] if n_prompts else imgs[:64], path))
                rows[-1]["grid_png"] = str(path)
    for imgs, path in pending_grids:
        if imgs.ndim != 4:
            save_media(imgs[:16], path)  # video or audio: a few clips, with their frames or spectrogram PNG
        elif n_prompts:
            save_prompt_grid(imgs, n_prompts, path)
        else:
            save_grid(imgs, path)
    return rows


def _launched_processes() -> Any:
    """The process group torchrun / accelerate launch started (WORLD_SIZE > 1), as an accelerate PartialState."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _share(n: int, rank: int, world: int) -> range:
    """Process ``rank``'s contiguous share of ``n`` samples (the last ones may be short or empty)."""
    per = -(-n // world)
    return range(min(rank * per, n), min((rank + 1) * per, n))


def _gathered(local: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """Rows of all ``n`` samples, in order, from each process's share (``local``, (share, ...))."""
    if world == 1:
        return local
    from accelerate.utils import gather

    per = -(-n // world)
    padded = torch.zeros(per, *local.shape[1:], dtype=local.dtype)
    padded[: len(local)] = local
    device = "cuda" if torch.cuda.is_available() else "cpu"  # gloo gathers CPU tensors, NCCL CUDA ones
    every = gather(padded.to(device)).cpu().reshape(world, per, *local.shape[1:])
    return torch.cat([every[r, : len(_share(n, r, world))] for r in range(world)])


def _gathered_features(ref: Any, images: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """The features of all ``n`` samples, in order: this process's, gathered from every process."""
    feats = ref.extractor.features(images) if len(images) else torch.empty(0, ref.extractor.dim)
    return _gathered(feats, n, world)


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Append rows to a JSONL file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
