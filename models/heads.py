"""Projection heads for self-distillation (DINO / iBOT)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_


class NormedLinear(nn.Module):
    """Weight-normalised prototypes: w_k = g_k * v_k / |v_k| (no bias).

    With `fixed_norm` (DINO's norm_last_layer) g is 1 and there is no g parameter. Written out
    rather than through torch's parametrisations, which ZeRO-3 cannot gather.
    """

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        trunc_normal_(self.weight, std=0.02)
        self.scale = None if fixed_norm else nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
        """x @ w^T; or, with `loss_fn`, loss_fn(x, w): a loss over those logits that never holds
        them whole (models/kernels/softmax_ce.py). It runs here so that ZeRO-3 has gathered the weight."""
        w = F.normalize(self.weight, dim=-1)
        if self.scale is not None:
            w = w * self.scale
        return F.linear(x, w) if loss_fn is None else loss_fn(x, w)


class DINOHead(nn.Module):
    """MLP (n layers, GELU) -> bottleneck -> L2 normalise -> K weight-normalised prototypes."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = NormedLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised features the prototypes score."""
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))


class IBOTHead(nn.Module):
    """iBOT's head: one DINOHead for [CLS] and patch tokens (shared, the default), or two."""

    def __init__(self, in_dim: int, out_dim: int, patch_out_dim: int | None = None, shared: bool = True, **kw):
        super().__init__()
        self.cls = DINOHead(in_dim, out_dim, **kw)
        # Shared: not registered twice, so state dicts and ZeRO-3 see each parameter once.
        self.patch = None if shared else DINOHead(in_dim, patch_out_dim or out_dim, **kw)

    def forward(self, cls: torch.Tensor, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cls: [B, C], patch: [B, N, C] -> logits [B, K], [B, N, K']."""
        return self.cls(cls), (self.patch or self.cls)(patch)
