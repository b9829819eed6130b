"""What the evals/ scripts share: their common options, where they write, and the provenance line of a report.

A script is run as ``python evals/NAME.py`` from anywhere (or under torchrun, or loaded by path from a test), so it
imports this module by the evals/ folder, not as a package::

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # evals/: the scripts' shared helper
    from common import ROOT, add_out, ...  # noqa: E402

Importing it puts the repository root first on ``sys.path``, so ``distill`` is this checkout's. torch and distill
are imported only inside the functions that need them: ``--help`` stays quick.

* options: :func:`add_out` / :func:`out_dir` (``--out DIR``: the folder a report goes to; without it evals/ of this
  repository, whose committed outputs the default command reproduces; with it nothing under evals/ is written),
  :func:`add_threads` / :func:`set_threads`, :func:`add_device` / :func:`resolve_device`;
* provenance: :func:`command` (the command line a report quotes), :func:`provenance` (machine and torch threads,
  device, package versions, git revision, command: :func:`distill.eval.harness.machine`, ``git_rev`` and
  ``versions``), :func:`measured_by` (the report's "Measured by ..." sentence), :func:`cpu_flags`;
* output: :func:`write_report` (``NAME.md`` and ``NAME.json``), :func:`fmt`, :func:`sync`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
EVALS = ROOT / "evals"
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------- options


def add_out(parser: argparse.ArgumentParser, files: str) -> None:
    """``--out DIR``: the folder for ``files`` (default: evals/ of this repository)."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for {files} (default: evals/ of this repository)")


def out_dir(out: str | Path | None) -> Path:
    """The folder a script writes into, made if missing: ``--out`` as given (absolute, so that child processes
    started elsewhere agree on it), else evals/ of this repository. A script writes under evals/ only when no
    ``--out`` is given: committed outputs are replaced only by the command that made them."""
    folder = Path(out).resolve() if out else EVALS
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def add_threads(parser: argparse.ArgumentParser, default: int | None = 2) -> None:
    """``--threads N``: torch.set_num_threads (``default`` None: leave torch's own)."""
    parser.add_argument("--threads", type=int, default=default,
                        help="torch.set_num_threads" + (f" (default {default})" if default else " (default: torch's)"))


def set_threads(threads: int | None = None) -> int:
    """``torch.set_num_threads(threads)``; None: 2, or the machine's cores where it has fewer. Returns the count."""
    import torch

    n = threads or min(2, os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device``: cuda where there is one, else cpu."""
    import torch

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(parser: argparse.ArgumentParser, name: str) -> "torch.device":
    """``--device`` as a torch device; a parser error for cuda on a machine without one."""
    import torch

    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return dev


# ---------------------------------------------------------------------------------------------- provenance


def command(script: str | Path, argv: Sequence[str] | None = None) -> str:
    """The command line a report quotes: ``python evals/SCRIPT ARGS``, the arguments as given (``argv``, or
    ``sys.argv[1:]`` when None), shell-quoted so the line can be pasted."""
    given = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"evals/{Path(script).name}", shlex.join(given)]).strip()


def version(package: str) -> str | None:
    """An installed package's version: the imported module's own ``__version__`` where it has one (torch's carries
    its build, ``2.x.y+cu130``), else :func:`distill.eval.harness.versions`' (the installed distribution's)."""
    mod = sys.modules.get(package)
    if mod is None:
        try:
            mod = __import__(package)
        except ImportError:
            mod = None
    own = getattr(mod, "__version__", None)
    if own:
        return str(own)
    from distill.eval.harness import versions

    return versions().get(package)


def provenance(cmd: str, *, device: Any = None, packages: Sequence[str] = ("torch",), git: bool = True
               ) -> dict[str, Any]:
    """The head of a report's JSON, in this order: ``machine`` (CPU, cores, torch threads now, GPU:
    :func:`distill.eval.harness.machine`), ``device`` (if given), each of ``packages``' version, ``git`` (the
    revision, ``-dirty`` with uncommitted changes; None outside a checkout) when asked, and ``command``."""
    from distill.eval.harness import git_rev, machine

    info: dict[str, Any] = {"machine": machine()}
    if device is not None:
        info["device"] = str(device)
    for p in packages:
        info[p] = version(p)
    if git:
        info["git"] = git_rev()
    info["command"] = cmd
    return info


def measured_by(info: Mapping[str, Any], packages: Sequence[str] = (), also: str | None = None) -> str:
    """A report's provenance sentence from :func:`provenance`'s dict: ``Measured by `COMMAND` on MACHINE (device:
    D); torch V, diffusers V, git G.``, with the device where ``info`` has one, the versions of ``packages``, the
    git revision where ``info`` has the key, then ``also``."""
    text = f"Measured by `{info['command']}` on {info['machine']}"
    if "device" in info:
        text += f" (device: {info['device']})"
    parts = [f"{p} {info[p]}" for p in packages]
    if "git" in info:
        parts.append(f"git {info['git'] or 'unknown'}")
    if also:
        parts.append(also)
    return text + ("; " + ", ".join(parts) if parts else "") + "."


def cpu_flags() -> str:
    """The CPU flags that decide which kernels torch runs (AVX2, AVX-512, AVX512-BF16, AMX, VNNI): ``flag: yes/no``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"]
                return ", ".join(f"{f}: {'yes' if f in have else 'no'}" for f in wanted)
    except OSError:
        pass
    return "unknown"


# ---------------------------------------------------------------------------------------------- output


def write_report(folder: Path, name: str, markdown: str | None, info: Any = None) -> list[Path]:
    """``folder/NAME.md`` (the text as given) and ``folder/NAME.json`` (``info``, indented by 1, with a final
    newline); either is skipped when None. Returns the paths written."""
    written = []
    if markdown is not None:
        (folder / f"{name}.md").write_text(markdown)
        written.append(folder / f"{name}.md")
    if info is not None:
        (folder / f"{name}.json").write_text(json.dumps(info, indent=1) + "\n")
        written.append(folder / f"{name}.json")
    return written


def fmt(v: float | None, spec: str) -> str:
    """``format(v, spec)``, or an em dash for a missing value."""
    return "—" if v is None else format(v, spec)


def sync(dev: "torch.device") -> None:
    """Wait for a CUDA device's queued work (a timing boundary); nothing on the CPU."""
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
