"""HiViT: the hierarchical backbone of iTPN (seed 004), as sunsmarterjie/iTPN builds it.

Each p x p patch (p = 16) is embedded as a 4 x 4 grid of inner tokens by a (p/4)-pixel
convolution, so every tensor before the main stage is [B, N, k, k, C] with N the patches and
k x k the patch's inner grid. Two early stages of MLP-only blocks (channel MLPs, no token
mixing) run at strides 4 and 8 with a patch merge between them (2 x 2 inner tokens concatenated,
LayerNorm, linear to twice the width) and a second merge into the main stage, where one token
per patch goes through global-attention blocks at stride 16.

Because nothing before the main stage mixes tokens across patches, a masked patch can be dropped
before the first stage: `forward_features(x, keep)` gathers the kept patches' inner tokens right
after the embedding, and every stage computes on visible tokens only (HiViT's point: hierarchical,
yet as cheap as a plain ViT under masking). Position embeddings are absolute, added at stride 16
(the reference's `ape`; its relative bias `rpe` is not built here, see docs/fidelity.md).

Parameter names follow the reference (`patch_embed`, one `blocks` list holding the merges,
`absolute_pos_embed`; timm's Block names in the main stage), so its backbone and pyramid weights
map by name, except layer-scale (the reference's gamma_1 / gamma_2, timm's ls1.gamma / ls2.gamma).
The attention blocks use the ViT's `Attention` (models/vit.py) with its swappable core, so the
Triton kernel serves both backbones. `HiViTFPN` is backbone + feature pyramid (models/pyramid.py),
what iTPN pretrains and exports together.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale, Mlp, trunc_normal_
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from .archs import get_arch
from .kernels.attention import AttentionFn, attention_reference
from .vit import Attention, dino_resample_pos_embed, sincos_pos_embed

LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # the reference's norm_layer


class PatchEmbed(nn.Module):
    """[B, 3, H, W] -> [B, N, k, k, C]: a (p/k)-pixel convolution, regrouped patch by patch."""

    def __init__(self, patch_size: int = 16, inner: int = 4, in_chans: int = 3, embed_dim: int = 128):
        super().__init__()
        if patch_size % inner:
            raise ValueError(f"patch size {patch_size} is not divisible by {inner} inner tokens per side")
        self.patch_size, self.inner = patch_size, inner
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size // inner, stride=patch_size // inner)
        self.norm = LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        h, w, k = H // self.patch_size, W // self.patch_size, self.inner
        x = self.proj(x).view(B, -1, h, k, w, k).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, k, k, -1)
        return self.norm(x)


class PatchMerge(nn.Module):
    """[..., k, k, C] -> [..., k/2, k/2, 2C]: each 2 x 2 group concatenated (the reference's order:
    top-left, bottom-left, top-right, bottom-right), LayerNorm, linear without bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = LayerNorm(dim * 4)
        self.reduction = nn.Linear(dim * 4, dim * 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class MlpBlock(nn.Module):
    """A block without token mixing: x + drop_path(MLP(LN(x))), per token (the reference's
    BlockWithRPE with num_heads 0; it keeps the name norm2)."""

    def __init__(self, dim: int, mlp_ratio: float = 3.0, drop_path: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class HiViT(nn.Module):
    """`pos_embed`: 'sincos' (learned, started from MAE's 2-D sin-cos table: iTPN's pixel
    pretraining) or 'learned' (trunc-normal 0.02: iTPN's CLIP pretraining)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, inner_patches: int = 4, embed_dim: int = 512,
                 mlp_depth: int = 3, depth: int = 24, num_heads: int = 8, bridge_mlp_ratio: float = 3.0,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, layer_scale: float | None = None,
                 pos_embed: str = "sincos", attn_fn: AttentionFn = attention_reference):
        super().__init__()
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed {pos_embed!r}: expected sincos or learned")
        if embed_dim % 4 or embed_dim % num_heads:
            raise ValueError(f"width {embed_dim} must be divisible by 4 and by {num_heads} heads")
        self.dims = (embed_dim // 4, embed_dim // 2, embed_dim)  # strides 4, 8, 16
        self.embed_dim, self.patch_size, self.pos_embed_kind = embed_dim, patch_size, pos_embed
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = PatchEmbed(patch_size, inner_patches, 3, self.dims[0])
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        n = 2 * mlp_depth + depth  # stochastic depth rising linearly over every block, as the reference
        dpr = iter([drop_path_rate * i / max(n - 1, 1) for i in range(n)])
        blocks: list[nn.Module] = [MlpBlock(self.dims[0], bridge_mlp_ratio, next(dpr), layer_scale)
                                   for _ in range(mlp_depth)]
        blocks.append(PatchMerge(self.dims[0]))
        blocks += [MlpBlock(self.dims[1], bridge_mlp_ratio, next(dpr), layer_scale) for _ in range(mlp_depth)]
        blocks.append(PatchMerge(self.dims[1]))
        for _ in range(depth):
            block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, init_values=layer_scale,
                          drop_path=next(dpr), norm_layer=LayerNorm, attn_layer=Attention)
            block.attn.attn_fn = attn_fn
            blocks.append(block)
        self.blocks = nn.ModuleList(blocks)
        self.num_main_blocks = depth
        self.checkpoint_every = 0
        self.apply(init_weights)
        self.init_pos_embed()

    @torch.no_grad()
    def init_pos_embed(self) -> None:
        if self.pos_embed_kind == "sincos":
            table = sincos_pos_embed(self.embed_dim, self.grid, num_prefix=0)
        else:
            table = trunc_normal_(torch.empty(self.absolute_pos_embed.shape, device=self.absolute_pos_embed.device),
                                  std=0.02)
        self.absolute_pos_embed.data.copy_(table.to(self.absolute_pos_embed.device))

    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        """Recompute every `every`-th block (MLP and attention blocks alike) in backward."""
        self.checkpoint_every = every if enable else 0

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"}

    def _run(self, i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_every and self.training and i % self.checkpoint_every == 0:
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> dict:
        """x: [B, 3, H, W]; keep: [B, K] indices of the only patches to encode (the rest never enter
        the network). Returns {"stages": [stride 4 [B, K, 4, 4, C/4], stride 8 [B, K, 2, 2, C/2],
        stride 16 [B, K, C]], "patch": the stride-16 tokens} (K = N without `keep`)."""
        B, _, H, W = x.shape
        grid = (H // self.patch_size, W // self.patch_size)
        x = self.patch_embed(x)
        if keep is not None:
            x = x.gather(1, keep[:, :, None, None, None].expand(-1, -1, *x.shape[2:]))
        stages = []
        early = len(self.blocks) - self.num_main_blocks
        for i, block in enumerate(self.blocks[:early]):
            if isinstance(block, PatchMerge):
                stages.append(x)
            x = self._run(i, block, x)
        x = x[..., 0, 0, :]
        pos = self.absolute_pos_embed
        if grid != self.grid:
            pos = dino_resample_pos_embed(pos, self.grid, grid, num_prefix=0)
        pos = pos.to(x.dtype).expand(B, -1, -1)
        if keep is not None:
            pos = pos.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = x + pos
        for i, block in enumerate(self.blocks[early:], start=early):
            x = self._run(i, block, x)
        stages.append(x)
        return {"stages": stages, "patch": x}

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, pool: bool = True) -> torch.Tensor | dict:
        """Pooled features: the mean stride-16 token (HiViT has no [CLS]); with pool=False what
        `forward_features` returns. Methods call the module, not `forward_features`: under ZeRO-3 a
        module's own parameters (the position table) are gathered by its forward hooks."""
        out = self.forward_features(x, keep)
        return out["patch"].mean(dim=1) if pool else out


def init_weights(m: nn.Module) -> None:
    """The reference's _init_weights: linear weights trunc-normal 0.02, biases 0, LayerNorms 1 / 0;
    the embedding convolution keeps PyTorch's default."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_hivit(arch: str, *, img_size: int, patch_size: int | None = None, drop_path_rate: float = 0.0,
                layer_scale: float | None = None, pos_embed: str = "sincos",
                attn_fn: AttentionFn = attention_reference) -> HiViT:
    a = get_arch(arch, "hivit")
    return HiViT(img_size=img_size, patch_size=patch_size or a.patch, embed_dim=a.width, mlp_depth=a.mlp_depth,
                 depth=a.depth, num_heads=a.heads, drop_path_rate=drop_path_rate, layer_scale=layer_scale,
                 pos_embed=pos_embed, attn_fn=attn_fn)
