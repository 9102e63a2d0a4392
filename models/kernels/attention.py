"""Attention core: softmax(q k^T / sqrt(d) + bias) v over [B, H, N, D] tensors.

`attention_reference` is the PyTorch implementation (scaled_dot_product_attention, which picks
flash / memory-efficient / math backends itself); `attention_triton` runs the FlashAttention-style
kernel of attention_triton.py under the same signature. The packed variable-length form
(`cu_seqlens`) has `attention_varlen_reference` and `attention_triton.flash_attention_varlen`.
`get_attention(impl)` returns the function a model is built with. The optional `bias` [H, N, N]
(BEiT's relative position bias) is added to the scaled scores of every sequence and gets a gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# (q, k, v, attn_mask, bias) -> out
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
                       torch.Tensor]
VarlenAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: [B, H, N, D]; attn_mask: bool (True = attend) or additive, broadcastable to [B, H, N, N];
    bias: float [H, N, N], added to the scaled scores (with attn_mask if both are given)."""
    if bias is not None:
        if attn_mask is None:
            attn_mask = bias
        elif attn_mask.dtype == torch.bool:
            attn_mask = torch.where(attn_mask, bias, float("-inf"))
        else:
            attn_mask = bias + attn_mask
        # SDPA wants a float mask in q's dtype; the cast is differentiable, so the bias keeps its gradient
        attn_mask = attn_mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def attention_varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               max_seqlen: int | None = None) -> torch.Tensor:
    """Packed q, k, v: [T, H, D]; cu_seqlens [S + 1]: block-diagonal attention, one SDPA per segment."""
    bounds = cu_seqlens.tolist()
    out = [F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v))).transpose(0, 1)
           for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(out)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel (models/kernels/attention_triton.py), bias included; masks go to the reference."""
    if attn_mask is not None:
        return attention_reference(q, k, v, attn_mask, bias)
    from .attention_triton import flash_attention

    return flash_attention(q, k, v, bias=bias)


def attention_varlen_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int) -> torch.Tensor:
    from .attention_triton import flash_attention_varlen

    return flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen)


IMPLEMENTATIONS: dict[str, AttentionFn] = {"torch": attention_reference, "triton": attention_triton}
VARLEN_IMPLEMENTATIONS: dict[str, VarlenAttentionFn] = {"torch": attention_varlen_reference,
                                                        "triton": attention_varlen_triton}
