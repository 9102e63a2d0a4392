"""Attention core: softmax(q k^T / sqrt(d)) v over [B, H, N, D] tensors.

`attention_reference` is the PyTorch implementation (scaled_dot_product_attention, which picks
flash / memory-efficient / math backends itself). `get_attention(impl)` returns the function a
model is built with; the Triton kernel registers here under the same signature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: [B, H, N, D]; attn_mask: bool (True = attend) or additive, broadcastable to [B, H, N, N]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


IMPLEMENTATIONS: dict[str, AttentionFn] = {"torch": attention_reference}


def get_attention(impl: str = "auto") -> AttentionFn:
    """The attention function for `impl` ('auto' takes the fastest one available)."""
    if impl == "auto":
        return IMPLEMENTATIONS.get("triton", attention_reference)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r} is not one of {sorted(IMPLEMENTATIONS)} or 'auto'")
    return IMPLEMENTATIONS[impl]
