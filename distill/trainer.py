"""The one training loop. Every method (teacher training and the distillation recipes) runs here.

What decides correctness for all methods lives here once: accelerate (devices, processes, mixed precision),
one AdamW per role with warm-up, gradient accumulation, clipping, a non-finite guard, EMA updates, atomic
safetensors checkpoints with resume, a rich progress bar and a JSONL metrics log. :class:`Trainer` builds the run
and runs the loop (:meth:`Trainer.fit`); each part with a job of its own is in :mod:`distill.training`: accelerate's
setup (``devices``), the speed options (``speed``), sharding (``fsdp``), the optimizers, schedules and EMAs
(``optim``), the non-finite guard (``guard``), checkpoint state and resume (``state``).

Output layout of a run in ``DIR``: ``config.yaml`` (the resolved recipe), ``checkpoints/``, ``metrics.jsonl``,
``model/`` (the exported network as a diffusers pipeline folder).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from distill.recipe import RecipeConfig
from distill.data import ImageBatches, load_dataset
from distill.errors import DistillError
from distill.export import save_pipeline, save_student
from distill.methods import Context, Method, Milestone, StepEvents, resolve_method
from distill.precision import short_attention_fp32
from distill.training.devices import make_accelerator
from distill.training.fsdp import reshard_networks, shard_networks
from distill.training.guard import NonfiniteGuard, guard_on_device
from distill.training.optim import bare_optimizer, ema_update, make_optimizer, prepare_optimizers, role_lr
from distill.training.speed import CPU_BF16_NOTE, NATIVE_FLAGS, apply_speed_options, cpu_has_native
from distill.training.state import Position, RunState

# the trainer, and the names that moved to distill.training, re-exported for code that imports them from here
__all__ = ["CPU_BF16_NOTE", "NATIVE_FLAGS", "RUN_OUTPUTS", "Trainer", "cpu_has_native", "ema_update", "make_optimizer",
           "role_lr", "train"]

RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "results.jsonl", "students", "grids", "model")


class Trainer:
    """Runs a :class:`~distill.methods.Method` for ``config.trainer.max_steps`` optimizer steps in ``out_dir``."""

    def __init__(self, config: RecipeConfig, out_dir: str | Path, *, recipe_name: str | None = None):
        self.config = config
        self.tc = config.trainer
        self.out = Path(out_dir)
        self.recipe_name = recipe_name  # recorded in students' distill.json and result rows
        if self.tc.threads:
            torch.set_num_threads(self.tc.threads)
        self.accelerator = make_accelerator(self.tc, self.out)
        self.device = self.accelerator.device
        # the learning-rate schedules' length: the run as configured (fixed here, so stopping early, as a preempted
        # run or a test does by lowering max_steps, does not reshape the schedule a resume continues)
        self.schedule_steps = int(self.tc.max_steps)
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes

        # One random stream shared by every rank: each draws the global micro-batch's numbers and keeps its own
        # rows (Method.randn_like), so 1 process and N processes at the same global batch train alike.
        torch.manual_seed(self.tc.seed)
        random.seed(self.tc.seed)
        self.pipeline = self._teacher_pipeline()
        self.data = ImageBatches(load_dataset(config.data), config.data, seed=self.tc.seed, pipeline=self.pipeline)
        ctx = Context(config.teacher, self.data.sample_shape, self.tc.seed, self.device, self.pipeline,
                      config.guidance, config.student)
        method_cls = resolve_method(config.method_name)
        self.method: Method = method_cls(config.method, ctx).to(self.device)
        if config.student.lora is not None and not self.method.shared_base:
            raise DistillError(f"student.lora is set but {method_cls.__name__} does not build its student with "
                               "Method.new_student, so no adapters were added; remove the student section, or build "
                               "the student with self.new_student(teacher).")
        self.method.unwrap = self.accelerator.unwrap_model  # methods copy weights between roles through this
        self.method.shard = (self.rank, self.world)
        self.roles = self.method.roles()
        for role in self.roles:
            if not isinstance(getattr(self.method, role, None), nn.Module):
                raise DistillError(f"{method_cls.__name__}.roles() names {role!r}, which is not a module attribute.")
        apply_speed_options(self.method, self.roles, self.tc, self.device)
        # bf16 on a CPU: short attention in fp32, where torch's bf16 kernel is slow (distill.precision)
        self.attention_mode = short_attention_fp32(self.device, self.tc.mixed_precision)
        self.sharded = self._shard()
        self.device_guard = guard_on_device(self.tc, self.device, self.sharded)
        self.guard = NonfiniteGuard(self.device_guard, self.tc.max_nonfinite_streak, self.device)
        self.optimizers = prepare_optimizers(self.accelerator, self.method, self.roles, sharded=self.sharded,
                                             fused=self.device_guard,
                                             embedding_lr_scale=self.config.guidance.embedding_lr_scale)
        self.run_state = RunState(self.out / "checkpoints", self.accelerator, self.method, list(self.roles),
                                  self.optimizers, self.tc, sharded=self.sharded, fused=self.device_guard)
        self._live = None  # the rich progress display while the loop runs
        self._stream: Any = None  # the data's batch stream, and the position it stands at
        self._stream_at: tuple[int, int] | None = None
        self.step = 0
        self.epoch = 0
        self.offset = 0

    @property
    def skipped(self) -> int:
        """Updates skipped as non-finite so far in the run (the guard's count; read on the device's schedule)."""
        return self.guard.skipped

    def _shard(self) -> bool:
        """trainer.fsdp: shard every network of the method across the processes (:mod:`distill.training.fsdp`).
        Returns whether it did (not on one process, where there is nothing to shard across)."""
        if not self.tc.fsdp:
            return False
        return shard_networks(self.method, self.world, compile=self.tc.compile,
                              announce=self.accelerator.is_main_process)

    def _teacher_pipeline(self) -> Any:
        """The recipe's teacher pipeline (read, not loaded), checked against the guidance settings; None without
        a teacher."""
        if self.config.teacher is None:
            if self.config.guidance.active:
                raise DistillError("guidance: is set but the recipe has no teacher; guidance applies to a "
                                   "conditional teacher's targets. Remove the guidance section or set teacher:.")
            return None
        from distill.pipelines import load_pipeline

        pipeline = load_pipeline(self.config.teacher)
        if self.config.guidance.active and pipeline.conditioning is None:
            raise DistillError(f"guidance: is set but the teacher {self.config.teacher} ({pipeline.class_name}) is "
                               "unconditional: classifier-free guidance needs a text- or class-conditional teacher. "
                               "Remove the guidance section.")
        return pipeline

    # ------------------------------------------------------------------------------------------ state

    def _unwrapped(self, name: str) -> nn.Module:
        return self.accelerator.unwrap_model(getattr(self.method, name))

    def save(self) -> Path | None:
        """Checkpoint the run (:mod:`distill.training.state`); every process calls it, the first gets the path."""
        self.guard.read(self.step)  # the skipped count a resume continues from
        return self.run_state.save(Position(self.step, self.epoch, self.offset, self.guard.skipped))

    def resume(self, check_layout: bool = True) -> bool:
        """Load the newest complete checkpoint in ``out/checkpoints``; False if there is none.

        ``check_layout=False`` skips the global-batch check (to export a checkpoint made on other processes)."""
        at = self.run_state.resume(check_layout)
        if at is None:
            return False
        self.step, self.epoch, self.offset, self.guard.skipped = at.step, at.epoch, at.offset, at.skipped
        return True

    # ------------------------------------------------------------------------------------------ loop

    def _next_batch(self) -> list[dict[str, torch.Tensor]]:
        """This process's share of the next global batch, as ``grad_accum`` micro-batches.

        The global batch is cut into ``grad_accum`` global micro-batches first, and each of those into one slice
        per rank, so micro-batch ``i`` covers the same samples on 1 process or N.
        """
        global_size = self.tc.batch_size * self.world
        if self._stream is None or self._stream_at != (self.epoch, self.offset):  # first batch, or after a resume
            self._stream = self.data.stream(self.epoch, self.offset, global_size)
        batch, self.epoch, self.offset = next(self._stream)
        self._stream_at = (self.epoch, self.offset)
        m = self.tc.batch_size // self.tc.grad_accum  # this rank's micro-batch
        starts = [i * m * self.world + self.rank * m for i in range(self.tc.grad_accum)]
        return [{k: self._to_device(v[a : a + m]) for k, v in batch.items()} for a in starts]

    def _to_device(self, v: torch.Tensor) -> torch.Tensor:
        """A batch tensor onto the training device. On CUDA a copy from pageable host memory waits for the device
        to finish its queued work (a sync per step); from pinned memory it is queued behind it instead."""
        if self.device.type == "cuda" and v.device.type == "cpu":
            return v.pin_memory().to(self.device, non_blocking=True)
        return v.to(self.device)

    def roles_due(self) -> list[str]:
        return [r for r, spec in self.roles.items() if self.step % spec.every == 0]

    def _update(self, role: str, micro: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        module = getattr(self.method, role)
        opt = self.optimizers[role]
        cfg = self.roles[role].optimizer
        # logged values stay tensors (no device sync) until a metrics row is written; the one sync per update is
        # the non-finite guard's decision (on the host; none on the device)
        logs: dict[str, Any] = {}
        total: torch.Tensor | float = 0.0
        for i, mb in enumerate(micro):
            sync = i == len(micro) - 1
            self.method.micro = i
            with (nullcontext() if sync else self.accelerator.no_sync(module)), self.accelerator.autocast(), \
                    self.attention_mode:
                loss, extra = self.method.loss(role, mb, self.step)
            self.accelerator.backward(loss / len(micro))
            total = total + loss.detach().float() / len(micro)
            for k, v in extra.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else v
                logs[f"{role}/{k}"] = logs.get(f"{role}/{k}", 0.0) + v / len(micro)
        params = [p for p in module.parameters() if p.requires_grad]
        if cfg.grad_clip is not None:
            gnorm = self.accelerator.clip_grad_norm_(params, cfg.grad_clip)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        if self.sharded and hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()  # the norm over every process's shards
        total = torch.as_tensor(total)
        logs[f"{role}/loss"] = total
        logs[f"{role}/grad_norm"] = gnorm
        lr = role_lr(self.roles[role], self.step, self.schedule_steps)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        logs[f"{role}/lr"] = lr
        mark = self.guard.step(role, opt, total, gnorm, scaler=self.accelerator.scaler is not None)
        # A role's loss may run through another role's network (a generator's loss through its discriminator):
        # clear every role's gradients, so none of this role's gradient waits for the other's step.
        for other in self.optimizers.values():
            other.zero_grad(set_to_none=True)
        if mark is not None:  # a skip (or the device's flag): its key comes last, as the row has always had it
            logs[f"{role}/skipped"] = mark
        return logs

    def _train_step(self) -> dict[str, Any]:
        """One step of the loop: every due role's update on the next batch, the EMAs that follow them, the method's
        events. Returns the step's logged values (tensors on the device, not read here)."""
        micro = self._next_batch()
        logs: dict[str, Any] = {}
        self.guard.begin_step()
        due = self.roles_due()
        for role in due:
            logs.update(self._update(role, micro))
        self.method.clear_memo()  # values shared between this step's roles (Method.memo)
        if self.sharded:
            reshard_networks(self.method)
        for ema_name, (src, decay) in self.method.ema.items():
            if src in self.guard.flags:  # masked on the device by the update's flag
                ema_update(getattr(self.method, ema_name), self._unwrapped(src), decay, when=~self.guard.flags[src])
            elif src in self.guard.stepped:  # an EMA follows only real updates of its source
                ema_update(getattr(self.method, ema_name), self._unwrapped(src), decay)
        self.guard.end_step(due, self.step)
        self.step += 1
        events = self.method.end_of_step(self.step)
        if events is not None:
            self._handle(events)
        return logs

    def _start(self, resume: bool) -> bool:
        """Make the run folder (cleared of an earlier run's outputs unless resuming) with its config.yaml, and
        resume when asked; returns whether a checkpoint was resumed."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            if not resume:
                # a fresh start must not mix with an earlier run's checkpoints, logs or students
                for name in RUN_OUTPUTS:
                    p = self.out / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        self.accelerator.wait_for_everyone()
        return resume and self.resume()

    def fit(self, resume: bool = True, progress: Any = None, on_step: Any = None) -> dict[str, Any]:
        """Train to ``max_steps`` (resuming from ``out/checkpoints`` when asked), export ``out/model``.

        ``progress``: a running ``rich.progress.Progress`` to add this run's bar to (one display for several
        runs; its columns may show the ``info`` field); ``on_step(step)`` is called after every step.
        """
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        resumed = self._start(resume)
        metrics = open(self.out / "metrics.jsonl", "a") if self.accelerator.is_main_process else None
        if self.tc.log_with:
            self.accelerator.init_trackers(self.out.name, config=_flat(self.config.to_dict()))
        own = progress is None
        if own:
            progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TimeRemainingColumn(),
                disable=not (self.tc.progress and self.accelerator.is_main_process),
            )
        desc = f"{self.config.method_name}" + (f" (resumed at {self.step})" if resumed else "")
        t0, s0 = time.perf_counter(), self.step
        last: dict[str, float] = {}
        self._live = None if progress.disable else progress
        with progress if own else nullcontext():
            task = progress.add_task(desc, total=self.tc.max_steps, completed=self.step, info="")
            while self.step < self.tc.max_steps:
                logs = self._train_step()
                sps = (self.step - s0) / max(time.perf_counter() - t0, 1e-9)
                if on_step is not None:
                    on_step(self.step)
                last = logs
                if self.step % self.tc.log_every == 0 or self.step == self.tc.max_steps:
                    self.guard.read(self.step)
                    floats = {k: float(v) for k, v in logs.items()}  # the sync, once per log_every steps
                    loss = next((v for k, v in floats.items() if k.endswith("/loss")), float("nan"))
                    progress.update(task, completed=self.step, info=f"loss {loss:.4g}  {sps:.1f} steps/s")
                    row = {"step": self.step, **floats, "steps_per_s": sps, "skipped": self.skipped, "time": time.time()}
                    if metrics is not None:
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                    if self.tc.log_with:
                        self.accelerator.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=self.step)
                else:
                    progress.update(task, completed=self.step)
                if self.tc.checkpoint_every and self.step % self.tc.checkpoint_every == 0 and self.step < self.tc.max_steps:
                    self.save()
        if own:
            self._live = None
        if metrics is not None:
            metrics.close()
        if self.tc.log_with:
            self.accelerator.end_training()
        self.save()
        self.accelerator.wait_for_everyone()
        self.export(self.out / "model")
        self._live = None
        last = {k: float(v) for k, v in last.items()}
        return {"step": self.step, "skipped": self.skipped, "last": last, "wall_s": time.perf_counter() - t0}

    def export(self, folder: str | Path, evaluate: bool = True) -> Path:
        """Write the method's export network (a student, or a teacher) to ``folder`` as a diffusers pipeline
        folder; a student also gets ``distill.json`` and, with ``evaluate``, is scored into ``results.jsonl``."""
        final = self.accelerator.unwrap_model(self.method.export_denoiser())
        if self.sharded:
            from distill.sharding import gathered

            final = gathered(final)
        info = self.method.export_info()
        if info is None:
            if self.accelerator.is_main_process:
                save_pipeline(final, folder)
            return Path(folder)
        self._export_student(Milestone("model", final, info, evaluate=evaluate), Path(folder), self.config.eval.steps)
        return Path(folder)

    # ------------------------------------------------------------------------------------------ events

    def _handle(self, events: StepEvents) -> None:
        if events.reset_optimizers:
            for opt in self.optimizers.values():
                bare_optimizer(opt).state.clear()
        for m in events.milestones:  # every process: the evaluation is shared between them
            self._export_student(m, self.out / "students" / m.name)
        if events.reset_optimizers or events.milestones:
            # a phase boundary: a resume must not redo the milestone's work
            if self.step < self.tc.max_steps:
                self.save()

    def _export_student(self, m: Milestone, folder: Path, steps: list[int] | None = None) -> None:
        """Write ``m`` as a pipeline folder with distill.json (the first process), and evaluate it into
        ``DIR/results.jsonl``: every process samples its share and the features are gathered, so no process
        waits in a collective of the training loop while another evaluates."""
        from distill.eval.harness import evaluate, write_rows
        from distill.model_card import write_model_card

        info = {"name": self.out.name, "method": self.config.method_name, "recipe": self.recipe_name, **m.info}
        if self.config.guidance.active and "guidance" not in info:
            # what a stock pipeline gets as guidance_scale: a w-student's w, else None (it needs no guidance)
            info["guidance"] = self.method.student_guidance()
        if self.pipeline is not None and self.pipeline.any_frames and "num_frames" not in info:
            # a video network takes clips of any length: the student makes clips as long as those it learnt from
            info["num_frames"] = int(self.data.sample_shape[1])
        if self.method.shared_base:  # a LoRA student: the teacher its adapters apply to
            teacher = self.config.teacher
            info["teacher"] = str(Path(teacher).resolve()) if Path(teacher).is_dir() else teacher
        main = self.accelerator.is_main_process
        if main:
            save_student(m.denoiser, folder, info, teacher=self.config.teacher)
        proto = self.config.eval.protocol
        if proto is None or not m.evaluate:
            return
        from distill.eval.protocol import load_protocol

        self.accelerator.wait_for_everyone()  # the folder is written
        was_training = m.denoiser.training
        m.denoiser.eval()
        # evaluation must not move the training stream the ranks share
        rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        live = self._live is not None  # rich allows one live display: no second bar inside the training bar
        say = self._live.console.print if live else print
        from accelerate import PartialState

        try:
            with rng:
                protocol = load_protocol(proto, n=self.config.eval.n, draws=self.config.eval.draws)
                rows = evaluate(folder, protocol, steps or info["steps"],
                                name=self.out.name, grids=self.out / "grids",
                                progress=self.tc.progress and not live and main, device=self.device,
                                processes=PartialState() if self.world > 1 else None)
        except DistillError as exc:  # the student is saved; a bad evaluation setting must not stop training
            if main:
                say(f"warning: {folder} was saved but not evaluated: {exc}")
            return
        finally:
            m.denoiser.train(was_training)
        if not main:
            return
        write_rows(rows, self.out / "results.jsonl")
        write_model_card(folder, info, rows, teacher=self.config.teacher)  # the card, now with these rows
        for r in rows[1:]:
            say(f"{self.out.name} {m.name}: {r['metric']} {r['value']:.2f} at {r['steps']} step(s) ({r['sampler']}); "
                f"floor {r['floor']:.2f}")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as flat ``a.b`` keys of numbers, strings and booleans (what trackers store)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif v is not None:
            out[key] = str(v)
    return out


def train(config: RecipeConfig, out_dir: str | Path, resume: bool = True) -> dict[str, Any]:
    """Build the trainer for ``config`` and run it; the library entry point behind ``distill run``."""
    return Trainer(config, out_dir).fit(resume=resume)
