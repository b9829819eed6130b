"""accelerate for a run: devices, processes, mixed precision and experiment trackers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distill.errors import DistillError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from distill.config import TrainerConfig


def make_accelerator(tc: TrainerConfig, out: Path) -> Accelerator:
    """The ``Accelerator`` for a run in ``out`` with ``tc``'s mixed precision and trackers (``out/logs``)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps one precision per process; several runs in one process (tests, a quickstart of all
    # recipes) may each choose their own. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # Launched on several processes (torchrun, accelerate launch) without a GPU: accelerate only goes
    # multi-process on the CPU (gloo) when told cpu=True; without it every rank would train alone.
    many_cpus = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    trackers: dict[str, Any] = {}
    if tc.log_with:
        from accelerate.utils import ProjectConfiguration

        trackers = {"log_with": list(tc.log_with),
                    "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"))}
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=many_cpus, **trackers)
    if tc.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate would run "fp16" on the CPU as plain fp32, with no grad scaler: say so instead
        raise DistillError("trainer.mixed_precision: fp16 needs a CUDA GPU (on the CPU accelerate silently "
                           "trains in fp32); use bf16 or no on the CPU.")
    return accelerator
