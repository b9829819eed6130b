"""Recipe configs: YAML -> typed dataclasses, ``key=value`` overrides, every problem reported at once.

A recipe file has four sections::

    method:   {name: teacher | progressive | ... | package.module:Class, <that method's fields>}
    data:     DataConfig
    trainer:  TrainerConfig
    teacher:  path or hub id of the teacher (methods that distill one)

Each section is a dataclass with commented defaults. Unknown keys, wrong types and impossible values are all
collected into one :class:`~distill.errors.ConfigError` that names each key and its valid choices, before any
model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from distill.errors import ConfigError, DistillError


@dataclass
class OptimizerConfig:
    """AdamW for one trainable role."""

    lr: float = 1e-4  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up from 0 to lr over this many optimizer steps, then constant
    grad_clip: float | None = 1.0  # max global grad norm; null disables clipping

    def check(self) -> list[str]:
        errs = []
        if self.lr < 0:
            errs.append(f"lr must be >= 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            errs.append(f"betas must lie in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0:
            errs.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            errs.append(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        return errs


@dataclass
class DataConfig:
    """Training images. ``name``: ``digits`` (embedded), a local folder (``imagefolder``/saved dataset) or a hub name."""

    name: str = "digits"
    split: str = "train"
    image_column: str = "image"
    label_column: str | None = "label"
    resolution: int | None = None  # resize + center-crop to this size; null keeps the dataset's size
    channels: int | None = None  # 1 (grayscale) or 3 (RGB); null keeps the dataset's channels
    hflip: bool = False  # random horizontal flips (never for digits)

    def check(self) -> list[str]:
        errs = []
        if self.resolution is not None and self.resolution < 1:
            errs.append(f"resolution must be >= 1 or null, got {self.resolution}")
        if self.channels not in (None, 1, 3):
            errs.append(f"channels must be 1, 3 or null, got {self.channels}")
        return errs


@dataclass
class TrainerConfig:
    """The shared loop. Steps count optimizer updates; one update sees batch_size x processes samples (the
    global batch), each process's batch split into grad_accum micro-batches."""

    max_steps: int | None = 1000  # null: the method decides (progressive distillation: phases x iterations)
    batch_size: int = 128  # per optimizer step and per process, before accumulation
    grad_accum: int = 1  # micro-batches per optimizer step (the batch is split into this many)
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = 500  # optimizer steps between checkpoints; 0 = only the final one
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 10  # steps between metrics.jsonl rows
    max_nonfinite_streak: int = 20  # stop after this many consecutive skipped (NaN/inf) steps
    threads: int | None = None  # torch CPU threads; null leaves torch's default
    progress: bool = True  # rich progress bar

    def check(self) -> list[str]:
        errs = []
        if self.max_steps is not None and self.max_steps < 1:
            errs.append(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1:
            errs.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.grad_accum < 1:
            errs.append(f"grad_accum must be >= 1, got {self.grad_accum}")
        elif self.batch_size % self.grad_accum:
            errs.append(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.checkpoint_every < 0:
            errs.append(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.keep_checkpoints < 1:
            errs.append(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.log_every < 1:
            errs.append(f"log_every must be >= 1, got {self.log_every}")
        if self.max_nonfinite_streak < 1:
            errs.append(f"max_nonfinite_streak must be >= 1, got {self.max_nonfinite_streak}")
        if self.threads is not None and self.threads < 1:
            errs.append(f"threads must be >= 1 or null, got {self.threads}")
        return errs


@dataclass
class EvalConfig:
    """Evaluation of the students a run exports (with the harness, rows in ``DIR/results.jsonl``)."""

    protocol: str | None = "digits"  # evals/protocols/<name>.yaml or a path; null = no evaluation
    n: int | None = None  # samples per point; null = the protocol's
    steps: list[int] | None = None  # step counts for the final student; null = all it supports

    def check(self) -> list[str]:
        errs = []
        if self.n is not None and self.n < 2:
            errs.append(f"n must be >= 2 or null, got {self.n}")
        if self.steps is not None and (not self.steps or min(self.steps) < 1):
            errs.append(f"steps must be positive integers, got {self.steps}")
        return errs


@dataclass
class RecipeConfig:
    """A whole recipe: which method, on what data, with which loop settings, and how students are evaluated."""

    method: Any  # the method's own config dataclass (its ``name`` chooses the class)
    method_name: str = "teacher"
    teacher: str | None = None  # teacher folder or hub id, for methods that distill one
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": {"name": self.method_name, **to_plain(self.method)},
            "teacher": self.teacher,
            "data": to_plain(self.data),
            "trainer": to_plain(self.trainer),
            "eval": to_plain(self.eval),
        }


# ------------------------------------------------------------------------------------------ generic checking


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists: what ``yaml.safe_dump`` writes."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


_BAD = object()  # a value that failed its type check


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Check ``value`` against type ``tp``; return the converted value, or ``_BAD`` after recording an error."""
    origin = typing.get_origin(tp)
    bad = f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        errors.append(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in typing.get_args(tp))}")
        return _BAD
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            trial: list[str] = []
            out = _convert(value, a, where, trial)
            if not trial:
                return out
        errors.append(bad)
        return _BAD
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            errors.append(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return _BAD
        return _build(tp, value, where, errors)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            errors.append(bad)
            return _BAD
        (a,) = typing.get_args(tp) or (Any,)
        items = [_convert(v, a, f"{where}[{i}]", errors) for i, v in enumerate(value)]
        return _BAD if any(v is _BAD for v in items) else items
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            errors.append(bad)
            return _BAD
        if args and args[-1] is Ellipsis:
            args = (args[0],) * len(value)
        items = [_convert(v, a, f"{where}[{i}]", errors) for i, (v, a) in enumerate(zip(value, args))]
        return _BAD if any(v is _BAD for v in items) else tuple(items)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            errors.append(bad)
            return _BAD
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(bad)
        return _BAD
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        errors.append(bad)
        return _BAD
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        errors.append(bad)
        return _BAD
    if tp is str:
        if isinstance(value, str):
            return value
        errors.append(bad)
        return _BAD
    return value


def unknown_key_message(key: str, where: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}{'.' if where else ''}{key}: unknown key{hint}; valid keys: {', '.join(choices)}"


def _build(cls: type, data: Mapping[str, Any], where: str, errors: list[str]) -> Any:
    """Build ``cls`` from ``data``, appending every problem to ``errors``.

    Returns ``_BAD`` when a value has the wrong type (nothing can be built); otherwise the object, whose
    ``check()`` value problems are recorded too, so that one pass reports every problem.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            errors.append(unknown_key_message(str(key), where, list(fields)))
            continue
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}" if where else key, errors)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    errors.extend(f"{where}.{n}: required key is missing" for n in missing)
    if missing or any(v is _BAD for v in kwargs.values()):
        return _BAD
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        errors.extend(f"{where}.{msg}" if where else msg for msg in check())
    return obj


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; raise one :class:`ConfigError` listing every problem."""
    errors: list[str] = []
    obj = _build(cls, data, where, errors)
    if errors:
        raise ConfigError(errors)
    return obj


# ----------------------------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value), the value read as YAML (``1e-3``, ``true``, ``[1, 2]``)."""
    if "=" not in text:
        raise DistillError(f"override {text!r} is not key=value (for example trainer.max_steps=50).")
    key, raw = text.split("=", 1)
    if not key or any(not k for k in key.split(".")):
        raise DistillError(f"override {text!r} has an empty key; write section.key=value.")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise DistillError(f"override {text!r}: the value is not valid YAML ({exc.problem}).") from exc
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for k in path[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[path[-1]] = value
    return data


# ----------------------------------------------------------------------------------------------- recipes

RECIPE_KEYS = ("method", "teacher", "data", "trainer", "eval")


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
    from distill.methods import resolve_method

    errors: list[str] = []
    for key in data:
        if key not in RECIPE_KEYS:
            errors.append(unknown_key_message(str(key), "", list(RECIPE_KEYS)))
    sections = {}
    for key in ("method", "data", "trainer", "eval"):
        value = data.get(key) or {}
        if not isinstance(value, Mapping):
            errors.append(f"{key}: expected a mapping of fields (key: value lines), got {value!r}")
            value = {}
        sections[key] = value
    method_data = dict(sections["method"])
    name = method_data.pop("name", None)
    method_cfg = None
    if name is None:
        errors.append("method.name: required key is missing (for example `name: teacher`)")
    else:
        try:
            method_cls = resolve_method(str(name))
        except DistillError as exc:
            errors.append(f"method.name: {exc}")
        else:
            method_cfg = _build(method_cls.Config, method_data, "method", errors)
    data_cfg = _build(DataConfig, sections["data"], "data", errors)
    trainer_cfg = _build(TrainerConfig, sections["trainer"], "trainer", errors)
    eval_cfg = _build(EvalConfig, sections["eval"], "eval", errors)
    if all(c is not None and c is not _BAD for c in (method_cfg, trainer_cfg)):
        total = getattr(method_cfg, "total_steps", lambda: None)()
        if total is None and trainer_cfg.max_steps is None:
            errors.append("trainer.max_steps: required for method " + repr(name))
        elif total is not None and trainer_cfg.max_steps is not None and trainer_cfg.max_steps != total:
            errors.append(f"trainer.max_steps: method {name!r} runs {total} steps (its phases x iterations); "
                          "set max_steps to null or to that number")
    teacher = data.get("teacher")
    if teacher is not None and not isinstance(teacher, str):
        errors.append(f"teacher: expected a folder path or hub id (str), got {teacher!r}")
    if errors:
        raise ConfigError(errors, source)
    if trainer_cfg.max_steps is None:
        trainer_cfg.max_steps = method_cfg.total_steps()
    return RecipeConfig(method=method_cfg, method_name=str(name), teacher=teacher, data=data_cfg, trainer=trainer_cfg,
                        eval=eval_cfg)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Read, override and validate a recipe YAML file."""
    data = apply_overrides(load_yaml(path), overrides)
    return recipe_from_dict(data, source=str(path))
