"""A whole recipe: the sections of :mod:`distill.config` under one method, read from YAML and validated at once.

A recipe file has these sections::

    method:   {name: teacher | progressive | ... | package.module:Class, <that method's fields>}
    teacher:  path or hub id of the teacher's pipeline (methods that distill one)
    data:     DataConfig
    trainer:  TrainerConfig
    eval:     EvalConfig
    guidance: GuidanceConfig (conditional teachers; optional)
    student:  StudentConfig (optional: a LoRA student, docs/lora.md)

The method's own section is the method class's ``Config`` dataclass, so validating a recipe resolves the method
(:func:`distill.methods.resolve_method`): this module sits above the methods, and :mod:`distill.config` (the
sections every method shares) below them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from distill.config import (DataConfig, EvalConfig, GuidanceConfig, StudentConfig, TrainerConfig, apply_overrides)
from distill.errors import ConfigError, DistillError
from distill.methods import resolve_method
from distill.typed import INVALID, build, to_plain, unknown_key_message

__all__ = ["RecipeConfig", "RECIPE_KEYS", "load_recipe", "load_yaml", "recipe_from_dict"]


@dataclass
class RecipeConfig:
    """A whole recipe: which method, on what data, with which loop settings, and how students are evaluated."""

    method: Any  # the method's own config dataclass (its ``name`` chooses the class)
    method_name: str = "teacher"
    teacher: str | None = None  # teacher folder or hub id, for methods that distill one
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    student: StudentConfig = field(default_factory=StudentConfig)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "method": {"name": self.method_name, **to_plain(self.method)},
            "teacher": self.teacher,
            # the layout is written only when it is not the default, so image recipes dump as they always did
            "data": {k: v for k, v in to_plain(self.data).items() if k != "layout" or v != "image"},
            "trainer": to_plain(self.trainer),
            "eval": to_plain(self.eval),
        }
        if self.guidance.active:  # unguided recipes keep the layout (and the resolved config.yaml) they had
            out["guidance"] = to_plain(self.guidance)
        if self.student.lora is not None or self.student.init is not None:  # likewise students copied from the teacher
            out["student"] = {k: v for k, v in to_plain(self.student).items() if v is not None}
        return out


# ----------------------------------------------------------------------------------------------- recipes

DEFAULT_MAX_STEPS = 1000  # for a method whose config does not say how long it runs (total_steps)
RECIPE_KEYS = ("method", "teacher", "data", "trainer", "eval", "guidance", "student")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"recipe {path} does not exist; list the shipped ones with `distill recipes`.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DistillError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise DistillError(f"{path} must hold a mapping with keys {', '.join(RECIPE_KEYS)}.")
    return data


def recipe_from_dict(data: Mapping[str, Any], source: str = "recipe") -> RecipeConfig:
    """Validate a recipe mapping: resolve the method by name, then check every section; all errors at once."""
    errors: list[str] = []
    for key in data:
        if key not in RECIPE_KEYS:
            errors.append(unknown_key_message(str(key), "", list(RECIPE_KEYS)))
    sections = {}
    for key in ("method", "data", "trainer", "eval", "guidance", "student"):
        value = data.get(key) or {}
        if not isinstance(value, Mapping):
            errors.append(f"{key}: expected a mapping of fields (key: value lines), got {value!r}")
            value = {}
        sections[key] = value
    method_data = dict(sections["method"])
    name = method_data.pop("name", None)
    method_cfg = method_cls = None
    if name is None:
        errors.append("method.name: required key is missing (for example `name: teacher`)")
    else:
        try:
            method_cls = resolve_method(str(name))
        except DistillError as exc:
            errors.append(f"method.name: {exc}")
        else:
            method_cfg = build(method_cls.Config, method_data, "method", errors)
    data_cfg = build(DataConfig, sections["data"], "data", errors)
    trainer_cfg = build(TrainerConfig, sections["trainer"], "trainer", errors)
    eval_cfg = build(EvalConfig, sections["eval"], "eval", errors)
    guidance_cfg = build(GuidanceConfig, sections["guidance"], "guidance", errors)
    student_cfg = build(StudentConfig, sections["student"], "student", errors)
    lora = student_cfg.lora if student_cfg is not INVALID else None
    if method_cls is not None and not method_cls.has_student and lora is not None:
        errors.append(f"student.lora: method {name!r} trains its network in full and has no student; LoRA adapts a "
                      "distillation student (progressive, consistency, adversarial, distribution_matching). Remove "
                      "the student section")
    if method_cls is not None and not method_cls.has_student and student_cfg is not INVALID and student_cfg.init:
        errors.append(f"student.init: method {name!r} has no student; teacher training starts from `method.init`")
    total = None
    if all(c is not None and c is not INVALID for c in (method_cfg, trainer_cfg)):
        total = getattr(method_cfg, "total_steps", lambda: None)()
        if total is not None and trainer_cfg.max_steps is not None and trainer_cfg.max_steps != total:
            errors.append(f"trainer.max_steps: method {name!r} runs {total} steps (its phases x iterations); "
                          "set max_steps to null or to that number")
    teacher = data.get("teacher")
    if teacher is not None and not isinstance(teacher, str):
        errors.append(f"teacher: expected a folder path or hub id (str), got {teacher!r}")
    if errors:
        raise ConfigError(errors, source)
    if trainer_cfg.max_steps is None:
        trainer_cfg.max_steps = total if total is not None else DEFAULT_MAX_STEPS
    return RecipeConfig(method=method_cfg, method_name=str(name), teacher=teacher, data=data_cfg, trainer=trainer_cfg,
                        eval=eval_cfg, guidance=guidance_cfg, student=student_cfg)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Read, override and validate a recipe YAML file."""
    data = apply_overrides(load_yaml(path), overrides)
    return recipe_from_dict(data, source=str(path))
