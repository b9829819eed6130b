"""Configs: every shipped recipe validates; bad input is reported all at once, naming keys and choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import parse_override
from distill.recipe import load_recipe, recipe_from_dict
from distill.errors import ConfigError, DistillError

TEACHER = Path(__file__).resolve().parent.parent / "recipes" / "digits" / "teacher.yaml"
SHIPPED = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").rglob("*.yaml"))
RECIPES = [p for p in SHIPPED if not p.name.endswith("scaffold.yaml")]
SCAFFOLDS = [p for p in SHIPPED if p.name.endswith("scaffold.yaml")]


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_shipped_recipes_validate(path):
    cfg = load_recipe(path)
    assert cfg.trainer.max_steps >= 1
    # the header says how to launch it
    head = path.read_text().splitlines()[:12]
    assert any("distill " in line for line in head if line.startswith("#"))


@pytest.mark.parametrize("path", SCAFFOLDS, ids=lambda p: p.name)
def test_shipped_scaffold_specs_validate(path):
    from distill.scaffold import load_spec

    spec = load_spec(path)
    assert spec.pipeline and (Path(__file__).resolve().parent.parent / spec.vae).is_dir()
    head = path.read_text().splitlines()[:12]
    assert any("distill scaffold " in line for line in head if line.startswith("#"))


def test_overrides_are_typed():
    cfg = load_recipe(TEACHER, ["trainer.max_steps=7", "method.optimizer.lr=3e-4", "trainer.progress=false"])
    assert cfg.trainer.max_steps == 7 and cfg.method.optimizer.lr == 3e-4 and cfg.trainer.progress is False
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(DistillError, match="not key=value"):
        parse_override("trainer.max_steps")


def test_a_choice_that_yaml_reads_as_a_boolean():
    # unquoted, YAML reads `no` as False: mixed_precision=no must still mean "no", in overrides and in files
    assert load_recipe(TEACHER, ["trainer.mixed_precision=no"]).trainer.mixed_precision == "no"
    assert recipe_from_dict({**_teacher_dict(), "trainer": {"mixed_precision": False}}).trainer.mixed_precision == "no"
    with pytest.raises(ConfigError, match="True is not one of 'no', 'fp16', 'bf16'") as info:
        load_recipe(TEACHER, ["trainer.mixed_precision=yes"])
    assert "quote the value" in str(info.value)


def _teacher_dict():
    import yaml

    return yaml.safe_load(TEACHER.read_text())


def test_all_problems_reported_at_once():
    data = {
        "method": {"name": "teacher", "ema_decay": 1.5, "optimizer": {"lr": -1.0}},
        "data": {"nmae": "digits"},
        "trainer": {"max_step": 5, "batch_size": 0, "mixed_precision": "fp8"},
        "extra": 1,
    }
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(data)
    errs = "\n".join(info.value.errors)
    assert "extra: unknown key" in errs
    assert "data.nmae: unknown key (did you mean 'name'?)" in errs
    assert "trainer.max_step: unknown key (did you mean 'max_steps'?)" in errs and "valid keys: max_steps" in errs
    assert "trainer.mixed_precision: 'fp8' is not one of 'no', 'fp16', 'bf16'" in errs
    assert "method.optimizer.lr must be >= 0" in errs
    assert "method.ema_decay must lie in [0, 1)" in errs
    assert len(info.value.errors) == 6


def test_wrong_types_and_values():
    with pytest.raises(ConfigError) as info:
        recipe_from_dict({"method": {"name": "teacher"}, "trainer": {"seed": "x", "batch_size": 0}})
    assert "trainer.seed: expected int, got 'x'" in str(info.value)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        recipe_from_dict({"method": {"name": "teacher"}, "trainer": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="divisible by grad_accum"):
        recipe_from_dict({"method": {"name": "teacher"}, "trainer": {"batch_size": 10, "grad_accum": 3}})


def test_unknown_method_lists_choices():
    with pytest.raises(ConfigError, match="unknown method 'nope'; choose one of teacher"):
        recipe_from_dict({"method": {"name": "nope"}})
    with pytest.raises(ConfigError, match="method.name: required"):
        recipe_from_dict({"method": {}})
    with pytest.raises(ConfigError, match="cannot import method"):
        recipe_from_dict({"method": {"name": "no.such.module:Thing"}})


def test_unsupported_prediction_type_in_recipe():
    with pytest.raises(ConfigError, match="prediction_type 'flow'"):
        load_recipe(TEACHER, ["method.scheduler.prediction_type=flow"])
