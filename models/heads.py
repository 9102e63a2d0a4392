"""Projection heads for self-distillation (DINO / iBOT)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_


class NormedLinear(nn.Module):
    """Weight-normalised prototypes: w_k = g_k * v_k / |v_k| (no bias).

    With `fixed_norm` (DINO's norm_last_layer) g is 1 and there is no g parameter. Written out
    rather than through torch's parametrisations, which ZeRO-3 cannot gather. `init`: 'linear' is
    nn.Linear's default, kaiming-uniform (what DINO's and iBOT's `weight_norm(nn.Linear)` start
    from: row norms about 0.58); 'trunc_normal' is std 0.02 (row norms about 0.02 * sqrt(in)).
    The norms matter even though only directions are used: the gradient reaching v scales as 1/|v|.
    """

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool = True, init: str = "linear"):
        super().__init__()
        if init not in ("linear", "trunc_normal"):
            raise ValueError(f"prototype init {init!r} is not 'linear' or 'trunc_normal'")
        self.init = init
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.scale = None if fixed_norm else nn.Parameter(torch.ones(out_dim, 1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Drawn in fp32 and copied: under zero.Init the weight may already be bf16 (see models/init.py).
        w = torch.empty(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        if self.init == "linear":
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        else:
            trunc_normal_(w, std=0.02)
        self.weight.data.copy_(w)
        if self.scale is not None:
            nn.init.ones_(self.scale)

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
                 nlayers: int = 3, norm_last_layer: bool = True, prototype_init: str = "linear"):
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
        self.last_layer = NormedLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer, init=prototype_init)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised features the prototypes score."""
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))


PATCH_HEADS = ("shared", "last_layer", "separate")


class IBOTHead(nn.Module):
    """iBOT's head for [CLS] and patch tokens. `patch` says what the patch tokens go through:

    - 'shared': the [CLS] head itself (iBOT's README recipes, --shared_head true);
    - 'last_layer': the same MLP, then prototypes of their own, `last_layer2` (iBOT's iBOTHead with
      shared_head false, bytedance/ibot models/head.py);
    - 'separate': a whole second DINOHead (DINOv2's separate_head).
    """

    def __init__(self, in_dim: int, out_dim: int, patch_out_dim: int | None = None, patch: str = "shared",
                 norm_last_layer: bool = True, prototype_init: str = "linear", **kw):
        super().__init__()
        if patch not in PATCH_HEADS:
            raise ValueError(f"patch head {patch!r} is not one of {', '.join(PATCH_HEADS)}")
        patch_out_dim = patch_out_dim or out_dim
        self.cls = DINOHead(in_dim, out_dim, norm_last_layer=norm_last_layer, prototype_init=prototype_init, **kw)
        # Parts that do not exist are None rather than a second reference to a shared module, so
        # state dicts, ZeRO-3 and the EMA see each parameter once.
        self.last_layer2 = (NormedLinear(self.cls.last_layer.weight.shape[1], patch_out_dim, norm_last_layer,
                                         prototype_init) if patch == "last_layer" else None)
        self.patch = (DINOHead(in_dim, patch_out_dim, norm_last_layer=norm_last_layer, prototype_init=prototype_init,
                               **kw) if patch == "separate" else None)

    def cls_path(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], NormedLinear]:
        """(bottleneck, prototype layer) of the [CLS] token."""
        return self.cls.bottleneck, self.cls.last_layer

    def patch_path(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], NormedLinear]:
        """(bottleneck, prototype layer) of the patch tokens."""
        if self.patch is not None:
            return self.patch.bottleneck, self.patch.last_layer
        return self.cls.bottleneck, self.cls.last_layer if self.last_layer2 is None else self.last_layer2

    def forward(self, cls: torch.Tensor, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cls: [B, C], patch: [B, N, C] -> logits [B, K], [B, N, K']."""
        (cls_mlp, cls_protos), (patch_mlp, patch_protos) = self.cls_path(), self.patch_path()
        return cls_protos(cls_mlp(cls)), patch_protos(patch_mlp(patch))
