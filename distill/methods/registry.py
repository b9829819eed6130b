"""The method registry: built-in methods by name (:data:`METHODS`), and a recipe's ``method.name`` resolved to
its class (:func:`resolve_method`), a built-in name or a user's ``package.module:Class`` / ``path/to/file.py:Class``.

Built-in methods are named by dotted path, not imported here: a method's module loads when a recipe names it.
"""

from __future__ import annotations

from distill.errors import DistillError
from distill.methods.base import Method

METHODS: dict[str, str] = {
    "teacher": "distill.methods.teacher:TeacherTraining",
    "progressive": "distill.methods.progressive:ProgressiveDistillation",
    "consistency": "distill.methods.consistency:ConsistencyDistillation",
    "adversarial": "distill.methods.adversarial:AdversarialDistillation",
    "distribution_matching": "distill.methods.distribution_matching:DistributionMatching",
}


def describe_methods() -> dict[str, tuple[str, str]]:
    """``{name: (package.module:Class, first line of its docstring)}`` for the built-in methods."""
    out = {}
    for name, target in METHODS.items():
        cls = resolve_method(name)
        out[name] = (target, ((cls.__doc__ or "").strip().splitlines() or [""])[0])
    return out


def resolve_method(name: str) -> type[Method]:
    """A method class from a built-in name or ``package.module:Class``; unknown names list the choices."""
    target = METHODS.get(name, name)
    if ":" not in target:
        raise DistillError(
            f"unknown method {name!r}; choose one of {', '.join(METHODS)} or name your own as package.module:Class "
            "or path/to/file.py:Class."
        )
    from distill.plugins import load_object

    cls = load_object(target, "method")
    if not (isinstance(cls, type) and issubclass(cls, Method) and hasattr(cls, "Config")):
        raise DistillError(f"{target!r} is not a distill Method subclass with a Config dataclass.")
    return cls
