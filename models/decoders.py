"""iTPN's light decoders: pyramid levels of the visible patches -> a prediction at every patch.

As sunsmarterjie/iTPN's pixel decoder (itpn_pixel models_itpn_mim.py forward_decoder): each
level's inner tokens are normalised and projected so that one patch's k x k tokens concatenate to
the decoder width (D / k^2 each), the levels are summed, a learned [MASK] token fills the dropped
patches, fixed 2-D sin-cos positions are added, and transformer blocks (timm's, with our
swappable attention core) and a linear layer predict per patch. (The reference appends the
[MASK] token to each level before the sum, i.e. adds it once per level; a single token learns the
same thing.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from .hivit import LayerNorm, init_weights
from .kernels.attention import AttentionFn, attention_reference
from .vit import Attention, sincos_pos_embed


class MaskedDecoder(nn.Module):
    """inner: k of each input level (1, 2, 4 for strides 16, 8, 4); out_dim: per-patch prediction."""

    def __init__(self, in_dim: int, inner: list[int], width: int, depth: int, num_heads: int, out_dim: int,
                 grid: tuple[int, int], mlp_ratio: float = 4.0, attn_fn: AttentionFn = attention_reference):
        super().__init__()
        for k in inner:
            if width % (k * k):
                raise ValueError(f"decoder width {width} is not divisible by {k * k} inner tokens")
        self.embed = nn.ModuleList([nn.Sequential(LayerNorm(in_dim), nn.Linear(in_dim, width // (k * k)))
                                    for k in inner])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.grid = tuple(grid)
        self.register_buffer("pos_embed", sincos_pos_embed(width, self.grid, num_prefix=0), persistent=False)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            block = Block(width, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, attn_layer=Attention)
            block.attn.attn_fn = attn_fn
            self.blocks.append(block)
        self.norm = LayerNorm(width)
        self.pred = nn.Linear(width, out_dim)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, levels: list[torch.Tensor], keep: torch.Tensor | None) -> torch.Tensor:
        """levels: [B, K, k, k, F] each (the visible patches `keep` [B, K], or every patch with
        None) -> [B, N, out_dim] for all N patches of the grid."""
        B, K = levels[0].shape[:2]
        x = sum(embed(level).reshape(B, K, -1) for embed, level in zip(self.embed, levels))
        N = self.pos_embed.shape[1]
        if keep is not None:
            full = self.mask_token.to(x.dtype).expand(B, N, -1).clone()
            x = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
        elif K != N:
            raise ValueError(f"{K} patches without `keep`, but the decoder's grid has {N}")
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))

