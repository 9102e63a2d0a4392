"""Schedules: pure functions of the optimizer step (nothing to save, nothing to restore)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.methods import method_class


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
    total: int
    lr: float
    min_lr: float
    warmup: int
    weight_decay: tuple[float, float]
    momentum: tuple[float, float]
    teacher_temp: tuple[float, float]
    teacher_patch_temp: tuple[float, float]
    teacher_temp_warmup: int
    freeze_last_layer: int
    gumbel_temp: tuple[float, float] = (1.0, 1.0)
    gumbel_temp_steps: int = 0
    kl_weight: tuple[float, float] = (0.0, 0.0)
    kl_steps: int = 0
    decay: int = 0  # the lr cosine ends here (0: at total)

    @classmethod
    def from_config(cls, cfg) -> Schedules:
        o, i, d = cfg.optim, cfg.ibot, cfg.dvae
        momentum = method_class(cfg.method).ema_momentum(cfg)  # whose EMA teacher it is
        return cls(cfg.schedule.steps, o.lr, o.min_lr, o.warmup_steps, tuple(o.weight_decay), tuple(momentum),
                   tuple(i.teacher_temp), tuple(i.teacher_patch_temp), i.teacher_temp_warmup_steps,
                   i.freeze_last_layer_steps, tuple(d.temperature), d.temperature_steps, tuple(d.kl_weight), d.kl_steps,
                   o.decay_steps)

    def at(self, step: int) -> dict[str, float]:
        """Every scheduled value for optimizer step `step` (0-based)."""
        return {
            "lr": warmup_cosine(step, self.decay or self.total, self.lr, self.min_lr, self.warmup),
            "weight_decay": cosine(step, self.total, *self.weight_decay),
            "momentum": cosine(step, self.total, *self.momentum),
            # iBOT's two teacher temperatures ([CLS], patches), warmed up over the same steps
            "teacher_temp": linear_warmup(step, self.teacher_temp_warmup, *self.teacher_temp),
            "teacher_patch_temp": linear_warmup(step, self.teacher_temp_warmup, *self.teacher_patch_temp),
            "last_layer_lr_factor": 0.0 if step < self.freeze_last_layer else 1.0,
            # the dVAE's (DALL-E): relaxation temperature annealed, KL weight ramped, both by half-cosines
            "gumbel_temp": cosine(step, self.gumbel_temp_steps, *self.gumbel_temp),
            "kl_weight": cosine(step, self.kl_steps, *self.kl_weight),
        }
