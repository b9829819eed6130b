"""Benchmarks as plug-ins: what a benchmark offers the core, and how the core finds one.

A benchmark is a package of its own (``distill/benchmarks/digits/``, ``distill/benchmarks/text_digits/``, or a
user's) that describes itself with one :class:`Benchmark` value: its datasets (``data.name``), feature extractors
(a protocol's ``extractor``), a folder of protocol YAMLs, its judge networks, and the table its quickstart runs.
The core (data loading, protocols, extractors, the adversarial recipe's guard, the quickstart) asks this module by
name and never imports a benchmark: so a user's benchmark in their own package works the same as a shipped one.

A benchmark is found

* by name, among the installed ones: every entry point of the group ``distill.benchmarks`` (distill's own
  ``pyproject.toml`` declares ``digits`` and ``text-digits``; a user's package declares its own the same way);
* or by dotted path, ``package.module:ATTR`` or ``path/to/file.py:ATTR`` (:func:`distill.plugins.load_object`),
  which also registers it for the rest of the process (:func:`register`).

Everything a :class:`Benchmark` names is a dotted path (``"distill.benchmarks.digits.data:dataset"``) resolved on
first use, so describing a benchmark imports neither torch nor its networks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from distill.errors import DistillError
from distill.plugins import load_object

ENTRY_POINT_GROUP = "distill.benchmarks"


@dataclass(frozen=True)
class Benchmark:
    """What one benchmark offers the core; every callable is named by a dotted path ``package.module:attr``.

    ``datasets``: ``data.name`` -> a function ``(split: str) -> datasets.Dataset`` of samples in [-1, 1].
    ``extractors``: a protocol's ``extractor`` name -> a :class:`~distill.eval.extractors.FeatureExtractor` class
    (or factory); ``aliases``: other names of those extractors (the ``name`` a result row records).
    ``protocols``: the folder of its protocol YAMLs (``<name>.yaml``), absolute or relative to the package folder of
    the module that defines the benchmark (``folder``).
    ``judges``: functions ``() -> list[nn.Module]``: every network that scores this benchmark (feature nets,
    classifiers). A training method never uses one of them as a discriminator backbone (:func:`refuse_judges`).
    ``judge_names``: words that mark a backbone name as one of the judges (``digits-net``).
    ``quickstart``: what ``distill quickstart --benchmark <name>`` runs (:class:`distill.quickstart.Quickstart`).
    """

    name: str
    datasets: Mapping[str, str] = field(default_factory=dict)
    extractors: Mapping[str, str] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    protocols: str | Path | None = None
    judges: Sequence[str] = ()
    judge_names: Sequence[str] = ()
    quickstart: Any = None
    folder: Path | None = None  # where relative paths (protocols, the quickstart's recipes) are read from

    def path(self, relative: str | Path) -> Path:
        """``relative`` under the benchmark's folder (unchanged when absolute or when the folder is unknown)."""
        p = Path(relative)
        return p if p.is_absolute() or self.folder is None else self.folder / p


_REGISTERED: dict[str, Benchmark] = {}  # found by dotted path in this process (register)


def _with_folder(b: Benchmark, module: str | None) -> Benchmark:
    if b.folder is not None or module is None:
        return b
    import importlib

    file = getattr(importlib.import_module(module), "__file__", None)
    return dataclasses.replace(b, folder=Path(file).resolve().parent) if file else b


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


@lru_cache(maxsize=None)
def _installed(name: str) -> Benchmark:
    ep = _entry_points()[name]
    try:
        b = ep.load()
    except Exception as exc:  # a broken plug-in names itself rather than failing somewhere later
        raise DistillError(f"benchmark {name!r} ({ep.value}) cannot be imported: {type(exc).__name__}: {exc}") from exc
    if not isinstance(b, Benchmark):
        raise DistillError(f"benchmark entry point {name!r} ({ep.value}) is a {type(b).__name__}, not a "
                           "distill.registry.Benchmark.")
    return _with_folder(b, ep.value.partition(":")[0])


def names() -> list[str]:
    """The names of the installed benchmarks and of those registered in this process."""
    return sorted(set(_entry_points()) | set(_REGISTERED))


def register(b: Benchmark) -> Benchmark:
    """Make ``b`` findable by its name (and its datasets, extractors and protocols by theirs) in this process."""
    if not isinstance(b, Benchmark):
        raise DistillError(f"a benchmark must be a distill.registry.Benchmark, got {type(b).__name__}.")
    _REGISTERED[b.name] = b
    return b


def benchmark(name_or_path: str | Benchmark) -> Benchmark:
    """The benchmark called ``name_or_path``, or the one a dotted path ``package.module:ATTR`` names (registered)."""
    if isinstance(name_or_path, Benchmark):
        return name_or_path
    spec = str(name_or_path)
    if spec in _REGISTERED:
        return _REGISTERED[spec]
    if spec in _entry_points():
        return _installed(spec)
    if ":" in spec:
        found = load_object(spec, "benchmark")
        if not isinstance(found, Benchmark):
            raise DistillError(f"benchmark {spec!r} is a {type(found).__name__}, not a distill.registry.Benchmark.")
        module = None if spec.rpartition(":")[0].endswith(".py") else spec.rpartition(":")[0]
        b = found if module is None else _with_folder(found, module)
        if b.folder is None and module is None:
            b = dataclasses.replace(b, folder=Path(spec.rpartition(":")[0]).resolve().parent)
        return register(b)
    raise DistillError(f"unknown benchmark {spec!r}; choose one of {', '.join(names()) or '(none installed)'}, or give "
                       "a dotted path package.module:BENCHMARK (or path/to/file.py:BENCHMARK). Installed benchmarks are "
                       f"the entry points of the group {ENTRY_POINT_GROUP!r}: is distill installed (pip install -e .)?")


def benchmarks() -> Iterator[Benchmark]:
    """Every installed and registered benchmark."""
    for name in names():
        yield benchmark(name)


def _lookup(table: str, key: str) -> tuple[Benchmark, str] | None:
    for b in benchmarks():
        mapping = getattr(b, table)
        if key in mapping:
            return b, mapping[key]
    return None


def dataset_loader(name: str) -> Callable[[str], Any] | None:
    """The loader ``(split) -> datasets.Dataset`` of a benchmark dataset called ``name``; None if none is."""
    found = _lookup("datasets", name)
    return None if found is None else load_object(found[1], f"benchmark {found[0].name}'s dataset {name!r}")


def is_benchmark_dataset(name: str) -> bool:
    return _lookup("datasets", name) is not None


def extractor_names() -> dict[str, str]:
    """Every benchmark extractor name (aliases included) -> the dotted path of its class."""
    out: dict[str, str] = {}
    for b in benchmarks():
        out.update(b.extractors)
        out.update({alias: b.extractors[key] for alias, key in b.aliases.items() if key in b.extractors})
    return out


def protocol_folders() -> list[Path]:
    """The protocol folders of every benchmark, in name order."""
    return [b.path(b.protocols) for b in benchmarks() if b.protocols is not None]


def judge_networks() -> Iterator[tuple[str, Any]]:
    """``(benchmark name, network)`` for every judge network of every benchmark."""
    for b in benchmarks():
        for spec in b.judges:
            for net in load_object(spec, f"benchmark {b.name}'s judge networks")():
                yield b.name, net


def refuse_judges(net: Any, name: str) -> None:
    """Raise if ``net`` (a would-be discriminator backbone called ``name``) is, contains, or holds the weights of a
    judge network of any benchmark: a metric that trains a model would grade its own student."""
    import torch

    lowered = name.lower()
    for b in benchmarks():
        if any(word in lowered for word in b.judge_names):
            raise DistillError(f"backbone {name!r} is benchmark {b.name}'s evaluation network; it may never train a "
                               "model (it would grade its own student).")
    mine = [p.detach().cpu().float() for p in net.state_dict().values() if p.numel() > 16]
    for bench, judge in judge_networks():
        judge_type = type(judge)
        if isinstance(net, judge_type) or any(isinstance(m, judge_type) for m in net.modules()):
            raise DistillError(f"backbone {name!r} is (or contains) benchmark {bench}'s evaluation network "
                               f"{judge_type.__name__}; it may never train a model (it would grade its own student).")
        ref = {tuple(v.shape): v for v in judge.state_dict().values()}
        for p in mine:
            v = ref.get(tuple(p.shape))
            if v is not None and torch.equal(p, v.float()):
                raise DistillError(f"backbone {name!r} holds benchmark {bench}'s evaluation network weights; it may "
                                   "never train a model.")
