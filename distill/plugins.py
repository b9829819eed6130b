"""Your own code named in a recipe: ``package.module:attr`` (importable) or ``path/to/file.py:attr``.

Methods (``method.name``), distances (``method.distance``) and discriminator backbones (``method.backbone``)
are all looked up here, so one spelling works everywhere. A file path is read relative to the working
directory; the file is imported as module ``distill_user.<file stem>`` (``custom_method.py`` ->
``distill_user.custom_method``), once per path.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from distill.errors import DistillError


def load_object(spec: str, what: str) -> Any:
    """The object ``spec`` names; one clear error (naming ``what``) if it cannot be imported or found."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise DistillError(f"{what} {spec!r} is not a name like package.module:attr or path/to/file.py:attr.")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            if not path.is_file():
                raise DistillError(f"{what} {spec!r}: no file {path}.")
            name = f"distill_user.{path.stem}"  # never shadows an installed module (a user's types.py, say)
            module = sys.modules.get(name)
            if module is None or Path(getattr(module, "__file__", "") or "").resolve() != path:
                loader = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(loader)
                sys.modules[name] = module  # dataclasses and pickling look their module up by name
                loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, attr)
    except DistillError:
        raise
    except Exception as exc:  # a user's file may fail in any way (SyntaxError, NameError, AttributeError...)
        raise DistillError(f"cannot import {what} {spec!r}: {type(exc).__name__}: {exc}") from exc
