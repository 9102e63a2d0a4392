"""Objectives: one module per method, each a registered `Method` (trainer/methods/base.py: the
interface the shared code asks it through, and the registry), built with trainer/methods/build.py.

    @register("name")
    class Name(Method): ...

`method_class(name)` is the one lookup by name; nothing outside a method's own module compares
a method's name. Importing this package imports every module in it, and so registers every method:
a new method is a new file here and nothing else (docs/adding-a-method.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import METHODS, Method, config_sections, method_class, register
from .build import build_frozen_teacher, build_student, check_shapes, kernels

__all__ = ["METHODS", "Method", "build_frozen_teacher", "build_student", "check_shapes", "config_sections",
           "frozen_files", "kernels", "method_class", "register", "replicated_frozen"]


def frozen_files(cfg) -> dict[str, str]:
    """The method's frozen networks, attribute -> weights file (Method.frozen_files)."""
    return method_class(cfg.method).frozen_files(cfg)


def replicated_frozen(cfg) -> tuple[str, ...]:
    """The frozen networks kept whole on every rank, outside the DeepSpeed engine (Method.replicated_frozen)."""
    return method_class(cfg.method).replicated_frozen(cfg)


for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "build"):
        importlib.import_module(f"{__name__}.{_module.name}")
