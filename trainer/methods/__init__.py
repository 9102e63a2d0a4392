"""Objectives: one registered nn.Module per method; `forward(batch, ...)` returns unweighted loss terms."""

from __future__ import annotations

METHODS: dict[str, type] = {}


def register(name: str):
    def deco(cls: type) -> type:
        METHODS[name] = cls
        return cls

    return deco


from . import ibot  # noqa: E402,F401  (registers itself)
