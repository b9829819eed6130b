"""The one training loop. Every method (teacher training and the distillation recipes) runs here.

What decides correctness for all methods lives here once: accelerate (devices, processes, mixed precision),
one AdamW per role with warm-up, gradient accumulation, clipping, a non-finite guard, EMA updates, atomic
safetensors checkpoints with resume, a rich progress bar and a JSONL metrics log.

Output layout of a run in ``DIR``: ``config.yaml`` (the resolved recipe), ``checkpoints/``, ``metrics.jsonl``,
``model/`` (the exported network as a diffusers pipeline folder).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from distill.checkpoint import list_checkpoints, load_checkpoint, load_module_state, save_checkpoint
from distill.config import OptimizerConfig
from distill.recipe import RecipeConfig
from distill.data import ImageBatches, load_dataset
from distill.errors import DistillError
from distill.export import save_pipeline, save_student
from distill.guidance import is_guidance_layer
from distill.methods import Context, Method, Milestone, Role, StepEvents, resolve_method
from distill.precision import short_attention_fp32


RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "results.jsonl", "students", "grids", "model")


@torch.no_grad()
def ema_update(ema: nn.Module, source: nn.Module, decay: float, when: torch.Tensor | None = None) -> None:
    """``ema <- decay * ema + (1 - decay) * source`` for parameters (one fused multi-tensor op); buffers are copied.
    Tensors the two share (a LoRA student's frozen base) are left alone. ``when``: a boolean tensor on the device;
    where it is false the EMA stays as it was, without reading the flag on the host."""
    pe, ps = list(ema.parameters()), list(source.parameters())
    if len(pe) != len(ps):
        raise DistillError(f"an EMA of {len(ps)} parameters cannot follow a network of {len(pe)}.")
    pairs = [(a, b.detach()) for a, b in zip(pe, ps) if a is not b]
    pe, ps = [a for a, _ in pairs], [b for _, b in pairs]
    same = all(a.dtype == b.dtype and a.device == b.device for a, b in zip(pe, ps))
    if when is not None and same and pe:
        step = torch._foreach_sub(ps, pe)
        torch._foreach_mul_(step, (1.0 - decay) * when.to(pe[0].dtype))  # a tensor factor: no host read
        torch._foreach_add_(pe, step)
    elif when is not None:
        w = (1.0 - decay) * when.float()
        for a, b in zip(pe, ps):
            a.add_((b.to(a.dtype) - a) * w.to(a.dtype))
    elif same:
        torch._foreach_lerp_(pe, ps, 1.0 - decay)
    else:
        for a, b in zip(pe, ps):
            a.lerp_(b.to(a.dtype), 1.0 - decay)
    for be, bs in zip(ema.buffers(), source.buffers()):
        if be is not bs:
            be.copy_(bs)


def make_optimizer(module: nn.Module, cfg: OptimizerConfig, fused: bool = False,
                   embedding_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW over ``module``'s trainable parameters; ``fused``: the single-kernel AdamW, which skips an update on the
    device when its ``found_inf`` flag is set (the device-side non-finite guard). With ``embedding_lr_scale`` other
    than 1 a guidance embedding's parameters form a second group whose ``lr_scale`` multiplies the role's rate."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise DistillError(f"{type(module).__name__} has no trainable parameters to optimise.")
    emb = [p for n, p in named if is_guidance_layer(n)] if embedding_lr_scale != 1 else []
    emb_ids = {id(p) for p in emb}
    rest = [p for _, p in named if id(p) not in emb_ids]
    groups = [{"params": ps, "lr_scale": scale} for ps, scale in ((rest, 1.0), (emb, embedding_lr_scale)) if ps]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps,
                             fused=fused or None)


def role_lr(role: Role, step: int, max_steps: int) -> float:
    """The learning rate of ``role`` at ``step``: its optimizer's schedule (warm-up, then constant, linear or cosine
    decay) over the whole run, or restarted in each of its :class:`~distill.methods.Cycle` (the latest that has
    started)."""
    cfg = role.optimizer
    if not role.cycles:
        return cfg.lr_at(step, max_steps)
    cycle = next((c for c in reversed(role.cycles) if c.start <= step), role.cycles[0])
    return cfg.lr_at(step - cycle.start, cycle.length, cycle.lr)


class Trainer:
    """Runs a :class:`~distill.methods.Method` for ``config.trainer.max_steps`` optimizer steps in ``out_dir``."""

    def __init__(self, config: RecipeConfig, out_dir: str | Path, *, recipe_name: str | None = None):
        from accelerate import Accelerator

        self.config = config
        self.tc = config.trainer
        self.out = Path(out_dir)
        self.recipe_name = recipe_name  # recorded in students' distill.json and result rows
        if self.tc.threads:
            torch.set_num_threads(self.tc.threads)
        from accelerate.state import AcceleratorState, GradientState

        # accelerate keeps one precision per process; several runs in one process (tests, a quickstart of all
        # recipes) may each choose their own. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        # Launched on several processes (torchrun, accelerate launch) without a GPU: accelerate only goes
        # multi-process on the CPU (gloo) when told cpu=True; without it every rank would train alone.
        many_cpus = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        trackers = {}
        if self.tc.log_with:
            from accelerate.utils import ProjectConfiguration

            trackers = {"log_with": list(self.tc.log_with),
                        "project_config": ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs"))}
        self.accelerator = Accelerator(mixed_precision=self.tc.mixed_precision, cpu=many_cpus, **trackers)
        self.device = self.accelerator.device
        if self.tc.mixed_precision == "fp16" and self.device.type == "cpu":
            # accelerate would run "fp16" on the CPU as plain fp32, with no grad scaler: say so instead
            raise DistillError("trainer.mixed_precision: fp16 needs a CUDA GPU (on the CPU accelerate silently "
                               "trains in fp32); use bf16 or no on the CPU.")
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
        self._speed_options()
        # bf16 on a CPU: short attention in fp32, where torch's bf16 kernel is slow (distill.precision)
        self.attention_mode = short_attention_fp32(self.device, self.tc.mixed_precision)
        self.sharded = self._shard()
        self.device_guard = self._device_guard()
        self._pending: list[list[torch.Tensor]] = []  # device_guard: each unread step's "skipped" flags, per update
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        emb_scale = self.config.guidance.embedding_lr_scale
        for role, spec in self.roles.items():
            net = getattr(self.method, role)
            if self.sharded:  # FSDP2 reduces the gradients itself: only the optimizer goes through accelerate
                module, opt = net, self.accelerator.prepare(make_optimizer(net, spec.optimizer,
                                                                           embedding_lr_scale=emb_scale))
            else:
                module, opt = self.accelerator.prepare(net, make_optimizer(net, spec.optimizer, self.device_guard,
                                                                           emb_scale))
            setattr(self.method, role, module)
            self.optimizers[role] = opt
        self._live = None  # the rich progress display while the loop runs
        self._stream: Any = None  # the data's batch stream, and the position it stands at
        self._stream_at: tuple[int, int] | None = None
        self._stepped: set[str] = set()  # roles whose optimizer stepped in the current step
        self.streak = 0  # consecutive steps whose every due update was skipped
        self.step = 0
        self.epoch = 0
        self.offset = 0
        self.skipped = 0

    def _speed_options(self) -> None:
        """trainer.teacher_dtype, trainer.compile and trainer.gradient_checkpointing, and the bf16-on-a-CPU warning."""
        tc, cpu = self.tc, self.device.type == "cpu"
        half = "fp16" if tc.teacher_dtype == "fp16" else "bf16"
        if cpu and (tc.mixed_precision == "bf16" or tc.teacher_dtype != "fp32") and not cpu_has_native(half):
            warnings.warn(
                f"{half} on a CPU without native {half} instructions ({'mixed_precision: bf16' if tc.mixed_precision == 'bf16' else 'teacher_dtype: ' + tc.teacher_dtype}): "
                f"its convolutions are emulated, and runs get much slower, not faster ({CPU_BF16_NOTE}). These options "
                f"are meant for GPUs and CPUs with {NATIVE_FLAGS[half][0]}; use fp32 here.", stacklevel=3)
        teacher = getattr(self.method, "teacher", None)
        if tc.teacher_dtype != "fp32" and isinstance(teacher, nn.Module):
            # the frozen teacher only makes targets: half precision halves its memory and time on GPUs; the
            # denoiser casts its inputs to the network's dtype and its estimate back to the caller's
            teacher.to({"bf16": torch.bfloat16, "fp16": torch.float16}[tc.teacher_dtype])
        networks = [getattr(self.method, r) for r in self.roles]
        if isinstance(teacher, nn.Module):
            networks.append(teacher)
        if tc.gradient_checkpointing:
            found = 0
            for net in networks:
                for m in net.modules():
                    if getattr(m, "_supports_gradient_checkpointing", False) and hasattr(m, "enable_gradient_checkpointing"):
                        m.enable_gradient_checkpointing()
                        found += 1
            if not found:
                raise DistillError("trainer.gradient_checkpointing: none of this method's networks supports it (a "
                                   "diffusers model does); set it to false.")
        if tc.compile:
            for net in networks:
                net.compile(backend=tc.compile)  # in place: parameter names (and checkpoints) are unchanged

    def _device_guard(self) -> bool:
        """Whether the non-finite guard runs on the device (trainer.nonfinite_guard). There, an update whose loss or
        gradient norm is NaN/inf is skipped inside fused AdamW (its ``found_inf`` flag) and the EMAs are masked by the
        same flag, so no step waits for the host to read it; the flags are read with each metrics row. The fp16 grad
        scaler skips overflowing steps itself, and sharded runs keep the host-side guard."""
        mode = self.tc.nonfinite_guard
        if mode == "auto":
            cuda = self.device.type == "cuda"
            mode = "device" if cuda and self.tc.mixed_precision != "fp16" and not self.sharded else "sync"
        if mode == "sync":
            return False
        if self.tc.mixed_precision == "fp16" or self.sharded:
            where = "to sharded (fsdp) runs" if self.sharded else "with the fp16 grad scaler"
            warnings.warn(f"trainer.nonfinite_guard: device does not apply {where}; the guard reads its flag on the "
                          "host.", stacklevel=3)
            return False
        return True

    def _read_guard(self) -> None:
        """device_guard: read the flags of the steps since the last read (one sync), and count skipped updates and
        the streak of all-skipped steps as the host-side guard does step by step."""
        if not self._pending:
            return
        steps, self._pending = self._pending, []
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        counts = torch.stack([torch.stack(f).sum() if f else zero for f in steps]).tolist()  # the one host read
        first = self.step - len(steps)  # the index of the first unread step
        for i, (flags, n_skipped) in enumerate(zip(steps, counts)):
            self.skipped += int(n_skipped)
            self._count_streak(bool(flags) and n_skipped == len(flags), first + i)

    def _count_streak(self, all_skipped: bool, step: int) -> None:
        """The run of steps whose every due update was skipped (a step with none due ends it); stops the run at
        ``max_nonfinite_streak``. Skipped updates leave the weights as they were."""
        if not all_skipped:
            self.streak = 0
            return
        self.streak += 1
        if self.streak >= self.tc.max_nonfinite_streak:
            raise DistillError(
                f"{self.streak} steps in a row had a NaN/inf loss or gradient (step {step}); stopped. Each such "
                "update was skipped, and the last good checkpoint is kept. Lower the learning rate, enable grad_clip, "
                "or check the data, then run the same command to resume."
            )

    def _shard(self) -> bool:
        """trainer.fsdp: shard every network of the method across the processes (:mod:`distill.sharding`). Returns
        whether it did (not on one process, where there is nothing to shard across)."""
        if not self.tc.fsdp:
            return False
        if self.world == 1:
            warnings.warn("trainer.fsdp: true on one process: nothing to shard across, so the networks stay whole. "
                          "Launch with torchrun --nproc_per_node N or accelerate launch to shard them.", stacklevel=3)
            return False
        if self.method.shared_base:
            raise DistillError("trainer.fsdp does not shard LoRA students: their adapters share the teacher's frozen "
                               "weights, which would be sharded twice. LoRA adapters are small; set trainer.fsdp: "
                               "false (the processes then replicate them, data parallel).")
        if self.tc.compile:
            raise DistillError("trainer.fsdp with trainer.compile is not supported yet; set one of them off.")
        from distill import sharding

        children = [m for _, m in self.method.named_children() if any(True for _ in m.parameters())]
        # a network inside another (a discriminator built on the teacher's blocks) is sharded first, on its own
        children.sort(key=lambda m: sum(1 for other in children if other is not m and _contains(m, other)))
        for net in children:
            sharding.shard(net)
        params = {id(p): p for net in children for p in net.parameters()}.values()
        whole = sum(p.numel() * p.element_size() for p in params)
        local = sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else 0 for p in params)
        if self.accelerator.is_main_process:
            names = ", ".join(n for n, m in self.method.named_children() if any(m is c for c in children))
            print(f"fsdp: {names} sharded over {self.world} processes: {local / 2**20:.1f} MiB of weights on "
                  f"this process instead of {whole / 2**20:.1f} MiB", flush=True)
        return True

    def _reshard(self) -> None:
        from distill.sharding import reshard

        for _, m in self.method.named_children():
            reshard(m)

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

    def _state_modules(self) -> dict[str, nn.Module]:
        names = list(self.roles) + list(self.method.ema) + list(self.method.checkpointed)
        return {n: self._unwrapped(n) for n in names}

    def save(self) -> Path | None:
        self._read_guard()  # the skipped count a resume continues from
        modules: dict[str, Any] = self._state_modules()
        opts: dict[str, Any] = {r: o.optimizer if hasattr(o, "optimizer") else o for r, o in self.optimizers.items()}
        if self.sharded:  # whole tensors, gathered by every process (collectives), written by the first
            from distill import sharding

            modules = {n: sharding.full_state(m) for n, m in modules.items()}
            opts = {r: sharding.full_optimizer_state(o) for r, o in opts.items()}
        if not self.accelerator.is_main_process:
            return None
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "offset": self.offset,
            "skipped": self.skipped,
            "python_random": _jsonable_random_state(random.getstate()),
            "method": self.method.method_state(),
            "layout": self._layout(),
        }
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return save_checkpoint(self.out / "checkpoints", self.step, modules, opts, state,
                               self.tc.keep_checkpoints, shared=self.method.shared_base)

    def resume(self, check_layout: bool = True) -> bool:
        """Load the newest complete checkpoint in ``out/checkpoints``; False if there is none.

        ``check_layout=False`` skips the global-batch check (to export a checkpoint made on other processes)."""
        ckpts = list_checkpoints(self.out / "checkpoints")
        if not ckpts:
            return False
        ck = None
        for path in reversed(ckpts):
            try:
                ck = load_checkpoint(path)
                break
            except DistillError as exc:
                warnings.warn(f"{exc} Falling back to the previous checkpoint.", stacklevel=2)
        if ck is None:
            raise DistillError(f"no usable checkpoint in {self.out / 'checkpoints'} (all damaged); "
                               "start over with --fresh or another --out.")
        try:
            from distill import sharding

            for name, module in self._state_modules().items():
                if self.sharded:
                    sharding.load_full_state(module, ck["modules"][name])
                else:
                    load_module_state(module, ck["modules"][name], self.method.shared_base)
            for role, opt in self.optimizers.items():
                inner = opt.optimizer if hasattr(opt, "optimizer") else opt
                if self.sharded:
                    sharding.load_full_optimizer_state(inner, ck["optimizers"][role])
                else:
                    inner.load_state_dict(ck["optimizers"][role])
                for g in inner.param_groups:  # the kernel is this run's choice, not the checkpoint's
                    g["fused"], g["foreach"] = (True, None) if self.device_guard else (None, g.get("foreach"))
                if self.device_guard:  # fused AdamW keeps its step counts as float32 beside the weights
                    for p, st in inner.state.items():
                        if torch.is_tensor(st.get("step")):
                            st["step"] = st["step"].to(p.device, torch.float32)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise DistillError(
                f"the checkpoint in {path} does not fit this recipe ({type(exc).__name__}: {str(exc)[:200]}); it was "
                "made with another method or model. Use --fresh to start over, or another --out."
            ) from exc
        torch.set_rng_state(ck["rng"]["torch_cpu"])
        if self.device.type == "cuda" and "torch_cuda" in ck["rng"]:
            torch.cuda.set_rng_state(ck["rng"]["torch_cuda"], self.device)  # rank 0's stream, on this rank's GPU
        st = ck["state"]
        if check_layout:
            self._check_layout(st.get("layout"), path)
        if self.accelerator.scaler is not None and "scaler" in st:
            self.accelerator.scaler.load_state_dict(st["scaler"])
        random.setstate(_random_state_from_json(st["python_random"]))
        self.step, self.epoch, self.offset, self.skipped = st["step"], st["epoch"], st["offset"], st["skipped"]
        self.method.load_method_state(st["method"])
        return True

    def _layout(self) -> dict[str, int]:
        return {"processes": self.world, "global_batch": self.tc.batch_size * self.world,
                "global_micro_batch": self.tc.batch_size * self.world // self.tc.grad_accum}

    def _check_layout(self, saved: dict[str, int] | None, path: Path) -> None:
        """A resume continues exactly when the global batch and micro-batch are the checkpoint's, on any number
        of processes (data order and noise are laid out globally); anything else is refused."""
        now = self._layout()
        if saved is None or all(saved[k] == now[k] for k in ("global_batch", "global_micro_batch")):
            return
        n = now["processes"]
        raise DistillError(
            f"{path} was written by {saved['processes']} process(es) at a global batch of {saved['global_batch']} "
            f"(micro-batches of {saved['global_micro_batch']}); this run has {n} process(es) at "
            f"{now['global_batch']} (micro-batches of {now['global_micro_batch']}). A resume is exact only at the "
            f"same global batch: set trainer.batch_size={saved['global_batch'] // n} and trainer.grad_accum="
            f"{saved['global_batch'] // saved['global_micro_batch']} for {n} process(es) (the global batch must "
            "divide evenly), or start over with --fresh."
        )

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
        # the non-finite guard's decision below
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
        if self.accelerator.scaler is not None:
            # fp16: the grad scaler skips an overflowing step itself and lowers its scale; pre-empting it
            # would leave the scaler unscaled-but-not-updated and break the next step.
            opt.step()
            skipped = bool(getattr(opt, "step_was_skipped", False)) or not bool(torch.isfinite(total))
        elif self.device_guard:
            bad = ~(torch.isfinite(total) & torch.isfinite(torch.as_tensor(gnorm, device=total.device)))
            inner = opt.optimizer if hasattr(opt, "optimizer") else opt
            inner.found_inf = bad.float()  # fused AdamW leaves weights, moments and its step count alone where set
            opt.step()
            self._flags[role] = bad
            logs[f"{role}/skipped"] = bad
            skipped = False  # counted when the flags are read (_read_guard)
        elif bool(torch.isfinite(total) & torch.isfinite(torch.as_tensor(gnorm, device=total.device))):
            opt.step()
            skipped = False
        else:
            skipped = True  # weights, EMA and optimizer state stay as they were
        # A role's loss may run through another role's network (a generator's loss through its discriminator):
        # clear every role's gradients, so none of this role's gradient waits for the other's step.
        for other in self.optimizers.values():
            other.zero_grad(set_to_none=True)
        if skipped:
            self.skipped += 1
            logs[f"{role}/skipped"] = 1.0
        else:
            self._stepped.add(role)
        return logs

    def fit(self, resume: bool = True, progress: Any = None, on_step: Any = None) -> dict[str, Any]:
        """Train to ``max_steps`` (resuming from ``out/checkpoints`` when asked), export ``out/model``.

        ``progress``: a running ``rich.progress.Progress`` to add this run's bar to (one display for several
        runs; its columns may show the ``info`` field); ``on_step(step)`` is called after every step.
        """
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.out.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            if not resume:
                # a fresh start must not mix with an earlier run's checkpoints, logs or students
                for name in RUN_OUTPUTS:
                    p = self.out / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        self.accelerator.wait_for_everyone()
        resumed = resume and self.resume()
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
                micro = self._next_batch()
                logs: dict[str, float] = {}
                self._stepped: set[str] = set()
                self._flags: dict[str, torch.Tensor] = {}  # device_guard: this step's "skipped" flag per role
                due = self.roles_due()
                for role in due:
                    logs.update(self._update(role, micro))
                self.method.clear_memo()  # values shared between this step's roles (Method.memo)
                if self.sharded:
                    self._reshard()
                for ema_name, (src, decay) in self.method.ema.items():
                    if src in self._flags:  # masked on the device by the update's flag
                        ema_update(getattr(self.method, ema_name), self._unwrapped(src), decay, when=~self._flags[src])
                    elif src in self._stepped:  # an EMA follows only real updates of its source
                        ema_update(getattr(self.method, ema_name), self._unwrapped(src), decay)
                if self.device_guard:  # counted when the flags are read (_read_guard)
                    self._pending.append([self._flags[r] for r in due])
                else:
                    self._count_streak(bool(due) and not self._stepped, self.step)
                self.step += 1
                events = self.method.end_of_step(self.step)
                if events is not None:
                    self._handle(events)
                sps = (self.step - s0) / max(time.perf_counter() - t0, 1e-9)
                if on_step is not None:
                    on_step(self.step)
                last = logs
                if self.step % self.tc.log_every == 0 or self.step == self.tc.max_steps:
                    self._read_guard()
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
                (opt.optimizer if hasattr(opt, "optimizer") else opt).state.clear()
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
                rows = evaluate(folder, load_protocol(proto, n=self.config.eval.n), steps or info["steps"],
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


CPU_BF16_NOTE = ("a digits UNet training step under bf16 autocast ran at 0.20 steps/s against 2.83 in fp32 on an AMD "
                 "EPYC held to AVX2, 14x slower; evals/bench_step_avx2/bench_step.md")
# /proc/cpuinfo flags that give a CPU native half-precision arithmetic (x86 AVX-512 / AMX; aarch64 "bf16")
NATIVE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16", "bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def cpu_has_native(dtype: str) -> bool:
    """Whether this CPU computes ``dtype`` ("bf16" or "fp16") natively, from /proc/cpuinfo's flags (False where
    they cannot be read). Without it, torch emulates half precision on the CPU and autocast makes a step slower."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return any(f in have for f in NATIVE_FLAGS[dtype])
    return False


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    """Whether ``inner`` is ``outer`` or one of its submodules."""
    return any(m is inner for m in outer.modules())


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


def _jsonable_random_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _random_state_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def train(config: RecipeConfig, out_dir: str | Path, resume: bool = True) -> dict[str, Any]:
    """Build the trainer for ``config`` and run it; the library entry point behind ``distill run``."""
    return Trainer(config, out_dir).fit(resume=resume)
