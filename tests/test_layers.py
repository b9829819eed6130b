"""The package reads top-down: no import circle, no import from a lower layer up, and the core never imports a
benchmark (benchmarks are plug-ins found by name or dotted path, like a user's own).

The check is static (the ``ast`` of every module, imports inside functions included), so it also sees the imports
that run only on some paths, which a circle hidden in a function would otherwise keep out of sight.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distill"

# Each core module's layer: a module may import only from its own layer or lower ones. Within a layer, modules may
# import each other as long as no circle forms (checked separately). A module not listed here fails the test, so a
# new module gets a place on purpose. Benchmarks sit on top, beside the CLI; the core imports none of them.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "tensors", "typed", "hub", "plugins", "precision", "media"),
    ("schedules", "config", "checkpoint", "text", "sharding", "losses", "registry"),
    ("denoisers",),
    ("guidance", "samplers", "pipelines"),
    ("conditioning", "lora", "scaffold"),
    ("models", "data"),
    ("methods",),
    ("recipe",),
    ("eval",),
    ("export", "model_card"),
    ("trainer", "training"),
    ("jobs", "quickstart"),
    ("cli", "__main__"),
    ("benchmarks",),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The distill modules ``name`` imports anywhere in its body (``from pkg import submodule`` counts as the
    submodule, not the package)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in modules]
            targets = subs if subs and len(subs) == len(node.names) else [module, *subs]
        else:
            continue
        for t in targets:
            while t and t not in modules and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in modules and t != name:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> int | None:
    part = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    return None


def test_every_module_has_a_layer(graph):
    assert [m for m in graph if m != "distill" and _layer(m) is None] == []


def test_no_import_circle(graph):
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for start in sorted(graph):
        if start not in seen:
            visit(start, [start])
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_import_from_a_lower_layer_up(graph):
    up = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
          for m, targets in graph.items() if m != "distill" for t in targets
          if t != "distill" and _layer(t) is not None and _layer(m) is not None and _layer(t) > _layer(m)]
    assert up == []


def test_the_core_never_imports_a_benchmark(graph):
    core = {m: ts for m, ts in graph.items() if not m.startswith("distill.benchmarks")}
    bad = [f"{m} imports {t}" for m, ts in core.items() for t in ts if t.startswith("distill.benchmarks")]
    assert bad == []


def test_the_checks_see_an_import_inside_a_function(tmp_path):
    """The graph must count lazy imports: a circle hidden in a function is still a circle."""
    pkg = tmp_path / "distill"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from distill import b\n")
    (pkg / "b.py").write_text("def f():\n    from distill.a import x\n")
    mods = {"distill": pkg / "__init__.py", "distill.a": pkg / "a.py", "distill.b": pkg / "b.py"}
    assert _imports("distill.b", mods["distill.b"], mods) == {"distill.a"}
    assert _imports("distill.a", mods["distill.a"], mods) == {"distill.b"}
