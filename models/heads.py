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


class TokenBatchNorm(nn.Module):
    """Batch normalisation over every token of a forward ([..., C], all leading dimensions), with the
    batch's statistics only: iBOT's head norm 'bn' (its teacher runs in train mode, so it normalises
    with batch statistics too; running averages are never used, since the head is never evaluated).

    `all_reduce` (a differentiable sum over ranks, given by the caller: models hold no process
    groups) makes it a SyncBatchNorm, as main_ibot.py converts it on several GPUs. Not torch's
    nn.SyncBatchNorm: it refuses CPU tensors, so the CPU ranks of CI could not run it.
    """

    def __init__(self, dim: int, eps: float = 1e-5, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps, self.all_reduce = eps, all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        stats = torch.cat([rows.sum(0), rows.pow(2).sum(0), rows.new_full((1,), rows.shape[0])])
        if self.all_reduce is not None:
            stats = self.all_reduce(stats)
        C = rows.shape[1]
        mean = stats[:C] / stats[-1]
        var = (stats[C:2 * C] / stats[-1] - mean.pow(2)).clamp(min=0)
        y = (rows - mean) * torch.rsqrt(var + self.eps) * self.weight.float() + self.bias.float()
        return y.to(x.dtype).view(x.shape)


HEAD_NORMS = ("none", "bn", "ln")


class DINOHead(nn.Module):
    """MLP (n layers, optional norm after each hidden layer, GELU) -> bottleneck -> L2 normalise ->
    K weight-normalised prototypes. `norm`: none, bn (`TokenBatchNorm`) or ln, as iBOT's --norm_in_head."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True, prototype_init: str = "linear", norm: str = "none",
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        if norm not in HEAD_NORMS:
            raise ValueError(f"head norm {norm!r} is not one of {', '.join(HEAD_NORMS)}")
        self.batch_norm = norm == "bn"
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                if norm == "bn":
                    layers.append(TokenBatchNorm(dims[i + 1], all_reduce=all_reduce))
                elif norm == "ln":
                    layers.append(nn.LayerNorm(dims[i + 1]))
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
                 norm_last_layer: bool = True, prototype_init: str = "linear", patch_options: dict | None = None,
                 **kw):
        """kw: DINOHead's hidden_dim, bottleneck_dim, nlayers, norm, all_reduce; `patch_options`: those of
        the 'separate' patch head that differ (DINOv2 sizes its two heads apart)."""
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
                               **{**kw, **(patch_options or {})}) if patch == "separate" else None)

    def cls_path(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], NormedLinear]:
        """(bottleneck, prototype layer) of the [CLS] token."""
        return self.cls.bottleneck, self.cls.last_layer

    def patch_path(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], NormedLinear]:
        """(bottleneck, prototype layer) of the patch tokens."""
        if self.patch is not None:
            return self.patch.bottleneck, self.patch.last_layer
        return self.cls.bottleneck, self.cls.last_layer if self.last_layer2 is None else self.last_layer2

    @property
    def batch_norm(self) -> bool:
        """Whether rows interact (batch norm): then which tokens go through the MLP together matters."""
        return self.cls.batch_norm

    def bottlenecks(self, cls: torch.Tensor, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cls: [B, C], patch: [B, N, C] -> their bottleneck features. A shared MLP sees all the tokens of
        a forward at once, as iBOT runs its head on the backbone's whole output (with batch norm, one set
        of statistics for [CLS] and patches)."""
        if self.patch is not None:
            return self.cls.bottleneck(cls), self.patch.bottleneck(patch)
        h = self.cls.bottleneck(torch.cat([cls.unsqueeze(1), patch], dim=1))
        return h[:, 0], h[:, 1:]

    def forward(self, cls: torch.Tensor, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cls: [B, C], patch: [B, N, C] -> logits [B, K], [B, N, K']."""
        h_cls, h_patch = self.bottlenecks(cls, patch)
        return self.cls_path()[1](h_cls), self.patch_path()[1](h_patch)
