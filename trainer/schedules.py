"""Schedules: pure functions of the optimizer step (nothing to save, nothing to restore)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from `start` (step 0) to `end` (step >= total)."""
    t = min(max(step, 0), total) / max(total, 1)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine(step: int, total: int, peak: float, final: float, warmup: int) -> float:
    """Linear 0 -> peak over `warmup` steps, then cosine peak -> final until `total`."""
    if step < warmup:
        return peak * step / warmup
    return cosine(step - warmup, total - warmup, peak, final)


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """Linear start -> end over `warmup` steps, then constant."""
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup


@dataclass(frozen=True)
class Schedules:
    """The optimizer's schedules and, for a method with an EMA teacher, its momentum, with the method's
    own values (`Method.schedules`: iBOT's teacher temperatures, the dVAE's relaxation temperature...)."""

    total: int
    lr: float
    min_lr: float
    warmup: int
    weight_decay: tuple[float, float]
    momentum: tuple[float, float] | None  # None: no EMA teacher
    decay: int = 0  # the lr cosine ends here (0: at total)
    method_values: Callable[[int], dict[str, float]] = lambda step: {}

    @classmethod
    def from_config(cls, cfg, method) -> Schedules:
        """`method`: the run's method class (trainer/methods/base.py)."""
        o = cfg.optim
        return cls(cfg.schedule.steps, o.lr, o.min_lr, o.warmup_steps, tuple(o.weight_decay),
                   method.ema_momentum(cfg), o.decay_steps, method.schedules(cfg))

    def at(self, step: int) -> dict[str, float]:
        """Every scheduled value for optimizer step `step` (0-based)."""
        return {
            "lr": warmup_cosine(step, self.decay or self.total, self.lr, self.min_lr, self.warmup),
            "weight_decay": cosine(step, self.total, *self.weight_decay),
            **({"momentum": cosine(step, self.total, *self.momentum)} if self.momentum else {}),
            **self.method_values(step),
        }
