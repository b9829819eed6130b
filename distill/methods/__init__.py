"""Methods: what is trained and with which losses. The loop that trains them is :mod:`distill.trainer`.

A method is one file with a config dataclass and a :class:`Method` subclass; the contract it follows is written
out in :mod:`distill.methods.base`. The package is laid out by job, each module importing only those above it here:

* :mod:`~distill.methods.context`: :class:`Context`, what the trainer tells a method when building it;
* :mod:`~distill.methods.builders`: :func:`load_teacher`, :func:`started_from`, :func:`freeze_unused`, the
  networks a method starts from;
* :mod:`~distill.methods.base`: the contract, :class:`Method`, :class:`Role`, :class:`Cycle`, :class:`Milestone`,
  :class:`StepEvents` (and :class:`Context`);
* :mod:`~distill.methods.registry`: :data:`METHODS`, :func:`resolve_method`, :func:`describe_methods`;
* :mod:`~distill.methods.common`: pieces several methods share (distances, feature-discriminator heads);
* the built-in methods, one module each: ``teacher``, ``progressive``, ``consistency``, ``adversarial``,
  ``distribution_matching``.

Import the contract, the builders and the registry from here (``from distill.methods import Method, Role,
load_teacher``).
"""

from __future__ import annotations

from distill.methods.base import Cycle, Method, Milestone, Role, StepEvents
from distill.methods.builders import freeze_unused, load_teacher, started_from
from distill.methods.context import Context
from distill.methods.registry import METHODS, describe_methods, resolve_method

__all__ = [
    "METHODS",
    "Context",
    "Cycle",
    "Method",
    "Milestone",
    "Role",
    "StepEvents",
    "describe_methods",
    "freeze_unused",
    "load_teacher",
    "resolve_method",
    "started_from",
]
