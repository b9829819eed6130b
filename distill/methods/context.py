"""What the trainer tells a method when building it (:class:`Context`).

Part of the method contract (:mod:`distill.methods.base` re-exports it). It sits below the builders
(:mod:`distill.methods.builders`), which read it, and the :class:`~distill.methods.base.Method` base class, which
uses the builders: so each of these modules imports only the ones below it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Context:
    """What the trainer tells a method when building it."""

    teacher: str | None  # teacher folder or hub id from the recipe
    sample_shape: tuple[int, ...]  # (C, H, W) of what the networks denoise: a training image, or its latent
    seed: int
    device: torch.device
    pipeline: Any = None  # the teacher's TeacherPipeline (distill.pipelines); None without a teacher
    guidance: Any = None  # the recipe's GuidanceConfig (distill.config)
    student: Any = None  # the recipe's StudentConfig (distill.config); None: a full student
