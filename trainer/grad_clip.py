"""Per-parameter gradient clipping, as iBOT and DINO do it, on DeepSpeed's partitioned gradients.

iBOT (bytedance/ibot utils.py `clip_gradients`) scales each parameter's gradient on its own:
g <- g * min(1, clip / (|g| + 1e-6)). DeepSpeed only clips the norm of all gradients together, so
this runs between the last micro-step's `engine.backward` (gradients reduced and partitioned) and
`engine.step` (where DeepSpeed reads them):

- ZeRO-3: each rank holds a slice of every parameter's gradient. |g|^2 of parameter i is the sum
  over ranks of its slices' squared norms: one vector with an entry per parameter, summed over the
  data-parallel ranks with one all-reduce; each rank then scales its own slices
  (`deepspeed.utils.safe_get_local_grad` / `safe_set_local_grad`). Nothing is gathered.
- ZeRO-0/1/2: the whole gradient of each parameter through `safe_get_full_grad` /
  `safe_set_full_grad` (an all-reduce per parameter under ZeRO-1/2; fine at the sizes those
  stages are used for, ViT-B and smaller).

fp16's loss scale is divided out of the norms, so the threshold means what it means in iBOT.
A non-finite norm makes the factor 0 or NaN, which keeps the gradient non-finite: DeepSpeed then
skips the step as it would have (trainer/faults.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def clip_coefficients(sq_norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + 1e-6)) per parameter, from squared norms (iBOT's formula)."""
    return (max_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)


class PerParamClip:
    """Clip each of `params` (name, parameter) to gradient norm `max_norm`; call after backward."""

    def __init__(self, params: list[tuple[str, nn.Parameter]], max_norm: float):
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.max_norm = max_norm
        self.zero3 = bool(self.params) and hasattr(self.params[0], "ds_id")

    def _get(self, p: nn.Parameter) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        return safe_get_local_grad(p) if self.zero3 else safe_get_full_grad(p)

    def _set(self, p: nn.Parameter, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_grad, safe_set_local_grad

        (safe_set_local_grad if self.zero3 else safe_set_full_grad)(p, value)

    @torch.no_grad()
    def __call__(self, loss_scale: float = 1.0) -> torch.Tensor:
        """Scale the gradients in place; returns each parameter's (unscaled) gradient norm before clipping."""
        grads = [self._get(p) for p in self.params]
        device = next((g.device for g in grads if g is not None), torch.device("cpu"))
        sq = torch.stack([g.float().pow(2).sum() if g is not None else torch.zeros((), device=device)
                          for g in grads]) if grads else torch.zeros(0)
        if self.zero3 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sq)  # slices of one parameter on different ranks: their squares add up
        sq = sq / loss_scale**2
        # iBOT scales where `clip_coef < 1`; scaling every gradient by min(coef, 1) is the same (x 1.0 is
        # exact; a NaN gradient stays NaN either way) without reading the coefficients on the host.
        coef = clip_coefficients(sq, self.max_norm)
        for p, g, c in zip(self.params, grads, coef.unbind() if len(grads) else ()):
            if g is not None:  # the product in fp32, rounded once, as `g * float(c)` computes it
                self._set(p, (g.float() * c).to(g.dtype))
        return sq.sqrt()
