"""Config building blocks: the error type, field declaration with help text, and value checks."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value; `str()` is the one line shown to the user."""

    def __init__(self, source: str, key: str, problem: str):
        self.source, self.key, self.problem = source, key, problem
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")


class Invalid(Exception):
    """Raised by `validate()` methods with a key relative to their section."""

    def __init__(self, key: str, problem: str):
        super().__init__(key, problem)
        self.key, self.problem = key, problem


# Whether validation reads the files a config names (teacher and tokenizer weights): off only while
# sizing a run somewhere those files are not (scripts/plan_memory.py on a laptop), see
# `files_unchecked`. A context variable, not a module switch: set for one `with` block, in this thread.
_CHECK_FILES: contextvars.ContextVar[bool] = contextvars.ContextVar("check_files", default=True)


@contextlib.contextmanager
def files_unchecked() -> Iterator[None]:
    """Validate configs without reading the weights files they name (planning, not training)."""
    token = _CHECK_FILES.set(False)
    try:
        yield
    finally:
        _CHECK_FILES.reset(token)


def checking_files() -> bool:
    return _CHECK_FILES.get()


def require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise Invalid(key, problem)


def at_least(section: Any, lo: float, *names: str, strict: bool = False) -> None:
    """Each named field must be >= lo (> lo with strict)."""
    for name in names:
        value = getattr(section, name)
        require(value > lo if strict else value >= lo, name, f"{value} must be {'>' if strict else '>='} {lo}")


def check_prob(value: float, key: str) -> None:
    require(0.0 <= value <= 1.0, key, f"{value} is outside [0, 1]")


def check_range(pair: tuple[float, float], key: str, lo: float, hi: float, hi_open: bool = False) -> None:
    a, b = pair
    upper = f"{hi})" if hi_open else f"{hi}]"
    for v in pair:
        require(lo <= v and (v < hi if hi_open else v <= hi), key, f"{v} is outside [{lo}, {upper}")
    require(a <= b, key, f"[{a}, {b}] is not an interval (first must be <= second)")


def opt(default: Any, help: str) -> Any:
    """A config field with its help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _copy(value: Any) -> Any:
    return copy.deepcopy(value)

