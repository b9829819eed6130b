"""Your own code named in a recipe: ``package.module:attr`` (importable) or ``path/to/file.py:attr``.

Methods (``method.name``), distances (``method.distance``) and discriminator backbones (``method.backbone``)
are all looked up here, so one spelling works everywhere. A file path is read relative to the working
directory; the file is imported once per path, as module ``distill_user.<file stem>_<hash of its path>``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

from distill.errors import DistillError

USER_PACKAGE = "distill_user"


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
            # distill_user.<stem>_<path hash>: never shadows an installed module (a user's types.py, say), and two
            # files with one name stay apart
            name = f"{USER_PACKAGE}.{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
            module = sys.modules.get(name)
            if module is None:
                if USER_PACKAGE not in sys.modules:
                    pkg = types.ModuleType(USER_PACKAGE)
                    pkg.__path__ = []  # a namespace for users' files, so their classes pickle by name
                    sys.modules[USER_PACKAGE] = pkg
                loader = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(loader)
                sys.modules[name] = module  # dataclasses look their module up by name while it executes
                try:
                    loader.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]  # a failed import is not cached
                    raise
        else:
            module = importlib.import_module(module_name)
        return getattr(module, attr)
    except DistillError:
        raise
    except Exception as exc:  # a user's file may fail in any way (SyntaxError, NameError, AttributeError...)
        raise DistillError(f"cannot import {what} {spec!r}: {type(exc).__name__}: {exc}") from exc
