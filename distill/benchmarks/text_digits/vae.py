"""Train the colored-digits VAE: a small diffusers ``AutoencoderKL``, 3x32x32 images -> 4x8x8 latents.

    python -m distill.benchmarks.text_digits.vae --out distill/assets/text-digits-vae --steps 3000 --seed 0

The result is the shared VAE of the colored-digits teachers (:mod:`distill.benchmarks.text_digits.data`): an SD-shaped
``StableDiffusionPipeline`` and an SD3-shaped ``StableDiffusion3Pipeline`` both load it as their ``vae/`` folder.

Recipe (Stable Diffusion's autoencoder loss without its LPIPS and GAN terms):

* architecture: ``block_out_channels=(32, 64, 64)`` (two downsamplings, 32 -> 8), ``layers_per_block=1``,
  ``latent_channels=4``, ``norm_num_groups=8`` (divides 32 and 64; 4-8 channels per group), the mid-block
  attention kept, as in SD's VAE;
* loss per image: the sum over pixels of the **L1** reconstruction error of a decoded posterior *sample* plus
  ``kl_weight`` (1e-6, SD's) times the sum over latent elements of KL(q(z|x) || N(0, I)), averaged over the batch
  (the weighting of LDM's ``LPIPSWithDiscriminator`` with its perceptual and adversarial weights at zero);
* data: the train split of the colored digits (1,437 source images x 7 colors), batches drawn at random, each
  image shifted by up to 2 pixels (vacated pixels black); AdamW, linear warm-up then cosine decay;
* ``scaling_factor`` is computed as Stable Diffusion's was, 1 / std of the latents, here the posterior **means**
  (what distill feeds its networks, :meth:`distill.pipelines.TeacherPipeline.encode_images`) of the whole training
  split; the std of posterior samples is reported beside it. ``shift_factor`` is 0.0: SD3's pipeline adds it when
  decoding (and fails on ``None``), SD's ignores it, so a VAE shared by both must not shift.

Training is resumable: every ``--save-every`` steps the model, the AdamW state and the step are written to
``OUT/checkpoint/`` as safetensors + JSON (nothing pickled), and a rerun of the same command continues from there.
Batches, shifts and posterior noise are drawn from generators seeded by (seed, step), so a resumed run makes the
same batches as an uninterrupted one. When training ends the checkpoint is removed and OUT holds the
``save_pretrained`` folder (``config.json``, ``diffusion_pytorch_model.safetensors``) and ``training_report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from distill.errors import DistillError

__all__ = [
    "DEFAULT_FOLDER",
    "build_vae",
    "evaluate_vae",
    "latent_statistics",
    "main",
    "train_vae",
    "vae_config",
    "vae_loss",
]

DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "assets" / "text-digits-vae"
_CHECKPOINT = "checkpoint"
_REPORT = "training_report.json"


def vae_config(block_out_channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1,
               latent_channels: int = 4, norm_num_groups: int = 8, sample_size: int = 32) -> dict[str, Any]:
    """``diffusers.AutoencoderKL`` kwargs: 3-channel images, one downsampling per block after the first."""
    if any(c % norm_num_groups for c in block_out_channels):
        raise DistillError(f"norm_num_groups={norm_num_groups} must divide every block width {block_out_channels}.")
    n = len(block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        "scaling_factor": 1.0,  # set from the trained encoder's latents by train_vae
        "shift_factor": 0.0,
        "force_upcast": False,
    }


def build_vae(seed: int = 0, **kwargs: Any) -> Any:
    """A freshly initialised ``diffusers.AutoencoderKL`` from :func:`vae_config` (``kwargs`` go to it)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderKL(**vae_config(**kwargs))


def vae_loss(vae: Any, x: torch.Tensor, kl_weight: float = 1e-6,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Stable Diffusion's autoencoder loss without LPIPS / GAN terms.

    Args:
        x: (B, 3, 32, 32) images in [-1, 1].

    Returns:
        (loss, logs): loss = mean over the batch of [sum over pixels |x - decode(z)| + kl_weight * sum over latent
        elements KL], z a posterior sample; logs hold the per-pixel ``l1`` and ``mse``, the per-image ``kl``.
    """
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    rec = vae.decode(z).sample
    l1 = (rec - x).abs().flatten(1).sum(1)  # (B,)
    kl = posterior.kl()  # (B,): summed over latent elements
    loss = (l1 + kl_weight * kl).mean()
    with torch.no_grad():
        logs = {"l1": float(l1.mean()) / x[0].numel(), "mse": float(F.mse_loss(rec, x)), "kl": float(kl.mean())}
    return loss, logs


@torch.no_grad()
def latent_statistics(vae: Any, images: torch.Tensor, batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Statistics of the latents of ``images`` (N, 3, 32, 32): mean and std over all elements of the posterior means
    and of posterior samples, per-channel means / stds of the means, and the mean posterior std."""
    gen = torch.Generator().manual_seed(seed)
    means, samples, stds = [], [], []
    for i in range(0, len(images), batch_size):
        post = vae.encode(images[i:i + batch_size]).latent_dist
        means.append(post.mean)
        samples.append(post.sample(generator=gen))
        stds.append(post.std)
    m, s, sd = torch.cat(means), torch.cat(samples), torch.cat(stds)
    return {
        "mean_of_means": float(m.mean()),
        "std_of_means": float(m.std()),
        "mean_of_samples": float(s.mean()),
        "std_of_samples": float(s.std()),
        "mean_posterior_std": float(sd.mean()),
        "channel_means": [round(float(v), 4) for v in m.mean(dim=(0, 2, 3))],
        "channel_stds": [round(float(v), 4) for v in m.std(dim=(0, 2, 3))],
    }


@torch.no_grad()
def evaluate_vae(vae: Any, split: str = "test", classifier: Any = None, limit: int | None = None,
                 batch_size: int = 256) -> dict[str, float]:
    """Reconstruction quality on a split (all colors): decode the posterior mean, clamp to [-1, 1].

    Returns mse and l1 (per pixel, [-1, 1] units), psnr (dB, peak-to-peak 2), n and, with the FD-text-digits
    ``classifier`` (a :class:`~distill.benchmarks.text_digits.judge.TextDigitsNet`), its digit / color / joint accuracy on
    the reconstructions and on the originals.
    """
    from distill.benchmarks.text_digits.data import text_digits_arrays

    data = text_digits_arrays(split)
    x = torch.from_numpy(data["image"])
    digits, colors = data["digit"], data["color"]
    if limit is not None and limit < len(x):
        # an even spread over the split (rows are ordered image-major, colors cycling)
        pick = np.linspace(0, len(x) - 1, limit).round().astype(np.int64)
        x, digits, colors = x[pick], digits[pick], colors[pick]
    vae.eval()
    recs = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        recs.append(vae.decode(vae.encode(xb).latent_dist.mean).sample.clamp(-1, 1))
    rec = torch.cat(recs)
    mse = float(F.mse_loss(rec, x))
    out: dict[str, float] = {"n": len(x), "mse": mse, "l1": float((rec - x).abs().mean()),
                             "psnr": float(10 * math.log10(4.0 / max(mse, 1e-12)))}
    if classifier is not None:
        from distill.benchmarks.text_digits.judge import accuracy

        for k, v in accuracy(classifier, rec, digits, colors).items():
            out[f"recon_{k}_accuracy"] = v
        for k, v in accuracy(classifier, x, digits, colors).items():
            out[f"original_{k}_accuracy"] = v
    return out


def _lr_at(step: int, steps: int, lr: float, warmup: int, final_ratio: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final_ratio * lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _save_checkpoint(out: Path, vae: Any, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Write ``out/checkpoint`` atomically: weights, AdamW tensors (safetensors) and state (JSON)."""
    from safetensors.torch import save_file

    from distill.checkpoint import optimizer_to_files

    tmp = out / f".{_CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, str(tmp / "model.safetensors"))
    tensors, meta = optimizer_to_files(opt)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    final = out / _CHECKPOINT
    old = out / f".{_CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(out: Path, vae: Any, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    from safetensors.torch import load_file

    from distill.checkpoint import optimizer_from_files

    ckpt = out / _CHECKPOINT
    if not (ckpt / "state.json").is_file():
        return None
    vae.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    opt.load_state_dict(optimizer_from_files(load_file(str(ckpt / "optimizer.safetensors")),
                                             json.loads((ckpt / "optimizer.json").read_text())))
    return json.loads((ckpt / "state.json").read_text())


def train_vae(out: str | Path, steps: int = 3000, seed: int = 0, batch_size: int = 32, lr: float = 1e-3,
              weight_decay: float = 1e-4, kl_weight: float = 1e-6, warmup: int = 100, max_shift: int = 2,
              save_every: int = 250, resume: bool = True, classifier_folder: str | Path | None = None,
              progress: bool = True, arch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, set ``scaling_factor`` / ``shift_factor``, ``save_pretrained`` to ``out`` and return the report.

    See the module docstring for the recipe. ``arch`` overrides :func:`vae_config` arguments. The report (also
    written to ``out/training_report.json``) holds the settings, the loss history at each checkpoint, latent
    statistics, held-out metrics (with the FD-text-digits classifier from ``classifier_folder``, default the
    shipped one, when it exists) and the wall time.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from distill.benchmarks.digits.judge import shift_augment
    from distill.benchmarks.text_digits.data import text_digits_arrays

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arch = dict(arch or {})
    settings = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                "kl_weight": kl_weight, "warmup": warmup, "max_shift": max_shift, "arch": arch,
                "loss": "L1 (sum over pixels) + kl_weight * KL (sum over latent elements), per image, batch mean",
                "optimizer": "AdamW, betas (0.9, 0.999), linear warm-up then cosine decay to 5% of lr"}
    vae = build_vae(seed, **arch)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=weight_decay)
    data = torch.from_numpy(text_digits_arrays("train")["image"])  # (10059, 3, 32, 32)
    # a fixed, evenly spread held-out subset for the loss history (the full split is scored at the end)
    test = torch.from_numpy(text_digits_arrays("test")["image"])
    probe_x = test[np.linspace(0, len(test) - 1, 256).round().astype(np.int64)]

    state = _load_checkpoint(out, vae, opt) if resume else None
    if state is not None and state["settings"] != json.loads(json.dumps(settings)):
        raise DistillError(f"{out / _CHECKPOINT} was written with other settings ({state['settings']}); rerun with "
                           "those, or with --no-resume to start over.")
    start = 0 if state is None else int(state["step"])
    history: list[dict[str, Any]] = [] if state is None else list(state["history"])
    seconds_before = 0.0 if state is None else float(state["train_seconds"])

    vae.train()
    t0 = time.perf_counter()
    running: dict[str, float] = {}
    columns = (TextColumn("[bold]vae"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("vae", total=steps, completed=start, info="resumed" if start else "")
        for step in range(start, steps):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            idx = torch.randint(0, len(data), (batch_size,), generator=gen)
            xb = data[idx]
            if max_shift:
                xb = shift_augment(xb, generator=gen, max_shift=max_shift)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, warmup)
            loss, logs = vae_loss(vae, xb, kl_weight, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in logs.items():  # exponential moving averages for the bar
                running[k] = v if k not in running else 0.98 * running[k] + 0.02 * v
            bar.update(task, advance=1, info=f"l1 {running['l1']:.4f} mse {running['mse']:.5f} kl {running['kl']:.0f}")
            done = step + 1
            if done % save_every == 0 or done == steps:
                vae.eval()
                with torch.no_grad():
                    rec = vae.decode(vae.encode(probe_x).latent_dist.mean).sample.clamp(-1, 1)
                vae.train()
                history.append({"step": done, **{k: round(v, 6) for k, v in running.items()},
                                "heldout256_mse": round(float(F.mse_loss(rec, probe_x)), 6)})
                elapsed = seconds_before + time.perf_counter() - t0
                if done < steps:
                    _save_checkpoint(out, vae, opt, {"step": done, "settings": settings, "history": history,
                                                     "train_seconds": elapsed})
                bar.console.log(f"step {done}: {history[-1]}")
    train_seconds = seconds_before + time.perf_counter() - t0

    vae.eval()
    stats = latent_statistics(vae, data, seed=seed)
    scaling = 1.0 / stats["std_of_means"]
    vae.register_to_config(scaling_factor=scaling, shift_factor=0.0)
    vae.save_pretrained(out, safe_serialization=True)

    classifier = None
    folder = Path(classifier_folder) if classifier_folder is not None else None
    from distill.benchmarks.text_digits.judge import DEFAULT_FOLDER as NET_FOLDER, load_text_digits_net

    if (folder or NET_FOLDER).is_dir():
        classifier = load_text_digits_net(folder)
    report = {
        "settings": settings,
        "architecture": vae_config(**arch),
        "scaling_factor": scaling,
        "scaling_from": "1 / std of the posterior means over the 10,059 training images (all colors)",
        "shift_factor": 0.0,
        "latents": stats,
        "heldout": evaluate_vae(vae, "test", classifier),
        "train": evaluate_vae(vae, "train", None, limit=2520),
        "history": history,
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "n_params": int(sum(p.numel() for p in vae.parameters())),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    try:
        import diffusers

        report["versions"]["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    (out / _REPORT).write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(out / _CHECKPOINT, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> None:
    """``python -m distill.benchmarks.text_digits.vae --out DIR --steps N --seed 0``: train, save, report."""
    parser = argparse.ArgumentParser(prog="python -m distill.benchmarks.text_digits.vae", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_FOLDER, help="folder for save_pretrained")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--save-every", type=int, default=250, help="checkpoint every N steps")
    parser.add_argument("--no-resume", action="store_true", help="ignore OUT/checkpoint and start over")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="FD-text-digits network folder for the accuracy report (default: the shipped one)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    report = train_vae(args.out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                       kl_weight=args.kl_weight, save_every=args.save_every, resume=not args.no_resume,
                       classifier_folder=args.classifier, progress=not args.no_progress)
    held = report["heldout"]
    acc = "".join(f", recon {k} acc {held[f'recon_{k}_accuracy']:.4f}" for k in ("digit", "color", "joint")
                  if f"recon_{k}_accuracy" in held)
    print(f"held-out ({held['n']} images): mse {held['mse']:.5f}, psnr {held['psnr']:.2f} dB{acc}; "
          f"scaling_factor {report['scaling_factor']:.5f} (latent mean {report['latents']['mean_of_means']:.3f}); "
          f"train {report['train_seconds']:.0f} s, total {time.perf_counter() - t0:.0f} s; saved to {args.out}")


if __name__ == "__main__":
    main()
