"""Vision Transformer for masked image modeling, built from timm's blocks.

What it adds to timm's `VisionTransformer`: our `Attention` (timm's parameter names, so timm
weights load; its core is a swappable function, where the Triton kernel plugs in), a learnable
[MASK] embedding that replaces masked patch tokens before position embeddings are added,
position embeddings resampled for any crop size (local crops) the way DINO/iBOT do it or timm's
way, optionally fixed 2-D sin-cos position embeddings (MAE, MaskAlign), `forward_features`
returning [CLS] and patch tokens separately, and activation checkpointing of every k-th block.

BEiT's backbone options (microsoft/unilm beit/modeling_finetune.py), each a switch: relative
position bias shared by all blocks or one per block (with or without absolute position
embeddings), query and value biases without a key bias, and BEiT's init (std-0.02 normals
truncated at one std, each block's output projections divided by sqrt(2 * layer)).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, GluMlp, Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch.utils.checkpoint import checkpoint

from .archs import get_arch
from .kernels.attention import AttentionFn, VarlenAttentionFn, attention_reference, attention_varlen_reference


@dataclass(frozen=True)
class Packed:
    """Several images' tokens in one sequence [1, T, C]: where each image starts (cu_seqlens, for
    block-diagonal attention) and which image each token belongs to (per-image stochastic depth)."""

    cu_seqlens: torch.Tensor  # int32 [S + 1]
    max_seqlen: int
    image: torch.Tensor  # [T]
    num_images: int


@functools.cache
def relative_position_index(h: int, w: int, device: torch.device) -> torch.Tensor:
    """BEiT's table index [1 + hw, 1 + hw] for an h x w grid with [CLS] in front: 2-D offsets of query
    i to key j first, then [CLS]->patch, patch->[CLS], [CLS]->[CLS] (microsoft/unilm beit/modeling_finetune.py)."""
    n_offsets = (2 * h - 1) * (2 * w - 1)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # [2, hw]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, hw, hw]
    index = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
    index[1:, 1:] = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
    index[0, :], index[:, 0], index[0, 0] = n_offsets, n_offsets + 1, n_offsets + 2
    return index.to(device)


class RelativePositionBias(nn.Module):
    """BEiT's learned relative position bias for a fixed h x w grid with a [CLS] token in front:
    a table of (2h - 1)(2w - 1) + 3 entries per head (every 2-D offset, plus [CLS]->patch,
    patch->[CLS] and [CLS]->[CLS]), zero at init; `forward()` -> [H, 1 + hw, 1 + hw]. The index
    is a cached function of the grid, not a buffer: nothing to save, partition or materialise."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        self.grid = tuple(grid)
        n_offsets = (2 * grid[0] - 1) * (2 * grid[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n_offsets + 3, num_heads))

    def forward(self) -> torch.Tensor:
        table = self.relative_position_bias_table
        index = relative_position_index(*self.grid, table.device)
        n = index.shape[0]
        return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


class Attention(nn.Module):
    """Multi-head self-attention with timm's layout (`qkv`, `proj`) and a pluggable core.

    `qkv_bias`: 'qkv' (one bias for all three, timm), 'qv' (BEiT: `q_bias` and `v_bias`, the keys
    get none) or 'none'. `rel_pos`: a grid for a relative position bias of this block's own; a
    float `attn_mask` of shape [H, N, N] is an additive bias too (the shared one, from the model).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool | str = True, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer: type[nn.Module] | None = None,
                 rel_pos: tuple[int, int] | None = None, **_unused):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        if attn_drop:
            raise ValueError("attention dropout is not supported (the fused kernels have none)")
        kind = {True: "qkv", False: "none"}.get(qkv_bias, qkv_bias)
        if kind not in ("qkv", "qv", "none"):
            raise ValueError(f"qkv_bias {qkv_bias!r}: expected qkv, qv or none")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=kind == "qkv")
        self.q_bias = nn.Parameter(torch.zeros(dim)) if kind == "qv" else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if kind == "qv" else None
        self.rel_pos = RelativePositionBias(rel_pos, num_heads) if rel_pos else None
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.norm = norm_layer(dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_fn: AttentionFn = attention_reference
        self.varlen_fn: VarlenAttentionFn = attention_varlen_reference

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_bias is None:
            return self.qkv(x)
        # Called as a module, not through self.qkv.weight: ZeRO-3 gathers a module's parameters in its own hooks.
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        return self.qkv(x) + bias.to(x.dtype)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | Packed | None = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        if isinstance(attn_mask, Packed):  # x: [1, T, C], images side by side
            if self.rel_pos is not None:
                raise ValueError("packed (multi-crop) attention has no relative position bias")
            q, k, v = self._qkv(x).reshape(N, 3, self.num_heads, self.head_dim).unbind(1)
            x = self.varlen_fn(self.q_norm(q), self.k_norm(k), v, attn_mask.cu_seqlens, attn_mask.max_seqlen)
            return self.proj_drop(self.proj(self.norm(x.reshape(B, N, C))))
        bias = None
        if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dim() == 3:
            bias, attn_mask = attn_mask, None  # the model's shared relative position bias
        if self.rel_pos is not None:
            own = self.rel_pos()
            bias = own if bias is None else bias + own
        q, k, v = self._qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        extra = {} if bias is None else {"bias": bias}  # (the kernels' bias input)
        x = self.attn_fn(self.q_norm(q), self.k_norm(k), v, attn_mask, **extra)
        x = self.norm(x.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(self.proj(x))


def swiglu_hidden(mlp_width: int) -> int:
    """DINOv2's SwiGLU width for a block whose MLP would be `mlp_width` wide: two thirds of it (the same
    parameter count: three matrices instead of two), rounded up to a multiple of 8
    (facebookresearch/dinov2 dinov2/layers/swiglu_ffn.py; transformers' Dinov2SwiGLUFFN likewise)."""
    return (int(mlp_width * 2 / 3) + 7) // 8 * 8


def swiglu_ffn(in_features: int, hidden_features: int, act_layer=None, bias: bool = True, drop: float = 0.0,
               **kw) -> GluMlp:
    """timm's SwiGLUPacked (fc1 -> [x1, x2], silu(x1) * x2 -> fc2, DINOv2's w12 / w3) at DINOv2's width for
    the MLP width timm's Block asks for (its `act_layer`, GELU, is not the gate's)."""
    return GluMlp(in_features, 2 * swiglu_hidden(hidden_features), act_layer=nn.SiLU, gate_last=False, bias=bias,
                  drop=drop, **kw)


def sincos_pos_embed(dim: int, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings [1, num_prefix + h * w, dim] in MAE's layout (what
    MaskAlign uses): channels [sin(x w), cos(x w), sin(y w), cos(y w)] with x the column, y the row,
    w = 10000^(-k / (dim / 4)); prefix tokens get zeros. timm's builder orders the channels otherwise."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, not {dim}")
    h, w = grid
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")

    def bands(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([bands(cols), bands(rows)], axis=1)
    table = np.concatenate([np.zeros((num_prefix, dim)), table], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)


def dino_resample_pos_embed(pos_embed: torch.Tensor, old: tuple[int, int], new: tuple[int, int],
                            num_prefix: int = 1) -> torch.Tensor:
    """DINO/iBOT/DINOv2's resampling: bicubic, no antialias, scale factors (new + 0.1) / old (the
    offset keeps floor(old * scale) == new against float error; it also shifts the sampling grid
    slightly, which is why it is kept rather than passing a size)."""
    prefix, patch = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = patch.shape[-1]
    patch = patch.float().reshape(1, old[0], old[1], dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((new[0] + 0.1) / old[0], (new[1] + 0.1) / old[1]), mode="bicubic",
                          align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patch], dim=1)


class VisionTransformer(TimmVisionTransformer):
    """timm's ViT with a [MASK] token, any input size, and split [CLS] / patch outputs.

    `pos_embed`: 'learned' (trunc-normal 0.02, timm/iBOT) or 'sincos' (fixed, MAE's table; listed by
    `fixed_parameters()` so the optimizer gives it lr 0). `pos_interp`: 'dino' or 'timm', how the
    table is resampled for another grid (see `dino_resample_pos_embed`).

    DINOv2's options: `ffn` 'swiglu' (`swiglu_ffn`), `registers` learned tokens placed after [CLS]
    once position embeddings are added (they have none, as in facebookresearch/dinov2
    vision_transformer.py), so the position table stays [CLS] + patches; and `drop_path_uniform`.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 layer_scale: float | None = None, attn_fn: AttentionFn = attention_reference,
                 varlen_fn: VarlenAttentionFn = attention_varlen_reference, pos_embed: str = "learned",
                 pos_interp: str = "dino", rel_pos_bias: str = "none", qkv_bias: str = "qkv", init: str = "timm",
                 ffn: str = "mlp", registers: int = 0, drop_path_uniform: bool = False):
        if ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn {ffn!r}: expected mlp or swiglu")
        if pos_embed not in ("learned", "sincos", "none") or pos_interp not in ("dino", "timm"):
            raise ValueError(f"pos_embed {pos_embed!r} / pos_interp {pos_interp!r}: expected learned|sincos|none, "
                             "dino|timm")
        if rel_pos_bias not in ("none", "shared", "per_block") or init not in ("timm", "beit"):
            raise ValueError(f"rel_pos_bias {rel_pos_bias!r} / init {init!r}: expected none|shared|per_block, "
                             "timm|beit")
        grid = (img_size // patch_size, img_size // patch_size)
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate,
                         init_values=layer_scale, num_classes=0, global_pool="token", dynamic_img_size=True,
                         attn_layer=Attention, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                         pos_embed="none" if pos_embed == "none" else "learn",
                         mlp_layer=swiglu_ffn if ffn == "swiglu" else Mlp, block_fn=Block)
        if drop_path_uniform and drop_path_rate > 0:  # timm's rates rise linearly over depth
            for block in self.blocks:
                block.drop_path1, block.drop_path2 = DropPath(drop_path_rate), DropPath(drop_path_rate)
        # DINOv2 initialises its register tokens from N(0, 1e-6), as [CLS] (models/init.py redoes it)
        self.reg_token = nn.Parameter(torch.randn(1, registers, embed_dim) * 1e-6) if registers else None
        self.num_prefix_tokens = 1 + registers
        for block in self.blocks:
            block.attn.attn_fn, block.attn.varlen_fn = attn_fn, varlen_fn
            if rel_pos_bias == "per_block":
                block.attn.rel_pos = RelativePositionBias(grid, num_heads)
        self.rel_pos_bias = RelativePositionBias(grid, num_heads) if rel_pos_bias == "shared" else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))  # iBOT: zero init
        self.pos_embed_kind, self.pos_interp, self.init_kind = pos_embed, pos_interp, init
        if init == "beit":
            self.init_beit()
        self.init_pos_embed()
        self.checkpoint_every = 0

    @torch.no_grad()
    def init_beit(self) -> None:
        """BEiT's init (microsoft/unilm beit/modeling_pretrain.py): every weight of a linear or conv
        layer and the [CLS], [MASK] and position embeddings from N(0, 0.02) truncated at +-0.02,
        biases 0, then each block's attention and MLP output weights divided by sqrt(2 * (i + 1))."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                beit_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for t in (self.cls_token, self.mask_token):
            beit_normal_(t)
        self.rescale_block_outputs()

    def partitioned_init_steps(self) -> list[tuple[list[nn.Parameter], Callable[[], None]]]:
        """This model's own init as small steps, for when its parameters are partitioned (built under
        DeepSpeed's zero.Init, where the constructor's init saw empty tensors): the caller gathers
        each step's parameters, runs the step on one rank and partitions them again. Empty for timm's
        init, which `models.init.init_module_` redoes module by module; BEiT's draws every weight
        again and then scales each block's output projections by its depth."""
        if self.init_kind != "beit":
            return []

        def draw(*tensors: torch.Tensor) -> Callable[[], None]:
            def step() -> None:  # in fp32, then cast (bf16 trunc_normal_ is far off, see models/init.py)
                for t in tensors:
                    t.data.copy_(beit_normal_(torch.empty(t.shape, dtype=torch.float32, device=t.device)))
            return step

        def linear(module: nn.Module) -> Callable[[], None]:
            def step() -> None:
                draw(module.weight)()
                if module.bias is not None:
                    module.bias.data.zero_()
            return step

        steps = [(list(m.parameters(recurse=False)), linear(m)) for m in self.modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d))]
        steps += [([t], draw(t)) for t in (self.cls_token, self.mask_token)]
        if self.pos_embed is not None:
            steps.append(([self.pos_embed], self.init_pos_embed))
        steps += [([b.attn.proj.weight, b.mlp.fc2.weight], partial(self.rescale_block_outputs, only=b))
                  for b in self.blocks]
        return steps

    @torch.no_grad()
    def rescale_block_outputs(self, only: nn.Module | None = None) -> None:
        for i, block in enumerate(self.blocks):
            if only is not None and block is not only:
                continue
            block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    @torch.no_grad()
    def init_pos_embed(self) -> None:
        """(Re)initialise the position table: trunc-normal 0.02 (drawn in fp32; truncated at +-0.02 under
        BEiT's init) or the sin-cos table."""
        if self.pos_embed is None:
            return
        if self.pos_embed_kind == "sincos":
            table = sincos_pos_embed(self.embed_dim, self.patch_embed.grid_size)
        else:
            table = torch.empty(self.pos_embed.shape, dtype=torch.float32, device=self.pos_embed.device)
            beit_normal_(table) if self.init_kind == "beit" else trunc_normal_(table, std=0.02)
        self.pos_embed.data.copy_(table)

    def fixed_parameters(self) -> set[str]:
        """Parameters that must never change (trained with lr 0, so checkpoints and exports keep them)."""
        return {"pos_embed"} if self.pos_embed_kind == "sincos" else set()

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: patch tokens [B, h, w, C] -> [B, 1 + R + h * w, C]: [CLS] and the patches with their position
        embeddings, the R register tokens (none by default) between them."""
        return self._add_registers(self._cls_and_positions(x))

    def _add_registers(self, x: torch.Tensor) -> torch.Tensor:
        if self.reg_token is None:
            return x
        return torch.cat([x[:, :1], self.reg_token.expand(x.shape[0], -1, -1).to(x.dtype), x[:, 1:]], dim=1)

    def _cls_and_positions(self, x: torch.Tensor) -> torch.Tensor:
        B, h, w, C = x.shape
        old = tuple(self.patch_embed.grid_size)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x.reshape(B, h * w, C)], dim=1)
        if self.pos_embed is None:  # relative position bias only (BEiT's pretraining default)
            return self.pos_drop(x)
        pos = self.pos_embed
        if (h, w) != old:
            if self.pos_interp == "dino":
                pos = dino_resample_pos_embed(pos, old, (h, w))
            else:  # (the table's one prefix token is [CLS]: registers have no position)
                pos = resample_abs_pos_embed(pos, (h, w), old, num_prefix_tokens=1)
        return self.pos_drop(x + pos.to(x.dtype))

    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        """Recompute every `every`-th block in backward (0 or enable=False: none)."""
        self.checkpoint_every = every if enable else 0

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "mask_token", "reg_token", "dist_token"}

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                         blocks: list[int] | None = None) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """x: [B, 3, H, W]; masks: [B, H/p, W/p] bool (True = replace by [MASK]); keep: [B, K] indices
        of the only patches to encode (MaskAlign: the rest never enter the network); blocks: also
        return the tokens after these blocks (0-based), before the final norm.
        Returns {"cls": [B, C], "patch": [B, N or K, C]} after the final norm, and "blocks"."""
        x = self.patch_embed(x)  # [B, h, w, C]
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = self.norm_pre(self._pos_embed(x))
        p = self.num_prefix_tokens
        if keep is not None:  # after the position embeddings, so each kept token knows where it was
            x = torch.cat([x[:, :p], x[:, p:].gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))], dim=1)
        depth = len(self.blocks)
        wanted = {b % depth for b in blocks or []}
        outputs = {}
        bias = self.shared_bias(x.shape[1] - p, keep is not None)
        for i, block in enumerate(self.blocks):
            if self.checkpoint_every and self.training and i % self.checkpoint_every == 0:
                x = checkpoint(block, x, bias, use_reentrant=False)
            else:
                x = block(x, bias)
            if i in wanted:
                outputs[i] = x
        x = self.norm(x)
        out = {"cls": x[:, 0], "patch": x[:, p:]}
        if blocks is not None:
            out["blocks"] = [outputs[b % depth] for b in blocks]
        return out

    def shared_bias(self, num_patches: int, subset: bool = False) -> torch.Tensor | None:
        """The shared relative position bias [H, N, N] (None without one); it is defined on the
        model's own grid only, so other sizes and patch subsets are refused rather than guessed."""
        has_rel = self.rel_pos_bias is not None or self.blocks[0].attn.rel_pos is not None
        grid = self.patch_embed.grid_size
        if has_rel and (subset or num_patches != grid[0] * grid[1]):
            raise ValueError(f"relative position bias is defined on the {grid[0]} x {grid[1]} grid of img_size "
                             f"{self.patch_embed.img_size}; got {num_patches} patches{' (a subset)' if subset else ''}")
        return self.rel_pos_bias() if self.rel_pos_bias is not None else None

    def forward_features_packed(self, views: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[dict]:
        """Several batches of different resolutions (multi-crop: the global crops with their masks,
        the local crops without) through the blocks as one packed sequence, so each block runs,
        and under ZeRO-3 is gathered, once. Attention is block-diagonal over the images. Returns
        what `forward_features(x, masks)` returns for each view, in order."""
        if self.rel_pos_bias is not None:
            raise ValueError("packed (multi-crop) forward has no relative position bias")
        seqs = []
        for x, masks in views:
            x = self.patch_embed(x)
            if masks is not None:
                x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
            seqs.append(self.norm_pre(self._pos_embed(x)))  # [B_i, N_i, C]
        lengths = [s.shape[1] for s in seqs for _ in range(s.shape[0])]
        device = seqs[0].device
        x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seqs]).unsqueeze(0)
        # built on the host and sent without blocking (torch.tensor(..., device=cuda) waits for the GPU)
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        seq_ids = torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths))
        packed = Packed(cu.to(device, non_blocking=True), max(lengths), seq_ids.to(device, non_blocking=True),
                        len(lengths))
        for i, block in enumerate(self.blocks):
            if self.checkpoint_every and self.training and i % self.checkpoint_every == 0:
                x = checkpoint(block, x, packed, use_reentrant=False)
            else:
                x = block(x, packed)
        x = self.norm(x)[0]
        outs, offset, p = [], 0, self.num_prefix_tokens
        for s in seqs:
            B, N = s.shape[:2]
            y = x[offset:offset + B * N].view(B, N, -1)
            offset += B * N
            outs.append({"cls": y[:, 0], "patch": y[:, p:]})
        return outs

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features: [CLS] (timm's global_pool "token"), or the mean patch token ("avg")."""
        out = self.forward_features(x, masks)
        return out["patch"].mean(dim=1) if self.global_pool == "avg" else out["cls"]


class Block(TimmBlock):
    """timm's Block, and on a packed multi-crop sequence (`attn_mask` a Packed) `_packed_block`. Either way
    it is called as a module, so ZeRO-3's hooks on the block fire, and run.compile's compiled forward
    (trainer/compile.py) covers both."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | Packed | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if isinstance(attn_mask, Packed):
            return _packed_block(self, x, attn_mask)
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)


def _packed_block(block: nn.Module, x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """timm's Block.forward on a packed sequence, with stochastic depth drawn per image (timm's
    DropPath would drop the whole pack at once)."""

    def residual(y: torch.Tensor, drop: nn.Module) -> torch.Tensor:
        if not isinstance(drop, DropPath) or not drop.training or drop.drop_prob == 0.0:
            return y
        keep = y.new_empty(packed.num_images).bernoulli_(1.0 - drop.drop_prob) / (1.0 - drop.drop_prob)
        return y * keep[packed.image].view(1, -1, 1)

    x = x + residual(block.ls1(block.attn(block.norm1(x), attn_mask=packed)), block.drop_path1)
    return x + residual(block.ls2(block.mlp(block.norm2(x))), block.drop_path2)


def vit_options(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """The BEiT options of `build_vit` that built these tensors (read off their names)."""
    rel = ("shared" if "rel_pos_bias.relative_position_bias_table" in state else
           "per_block" if "blocks.0.attn.rel_pos.relative_position_bias_table" in state else "none")
    qkv = "qv" if "blocks.0.attn.q_bias" in state else "qkv" if "blocks.0.attn.qkv.bias" in state else "none"
    fc1, fc2 = state.get("blocks.0.mlp.fc1.weight"), state.get("blocks.0.mlp.fc2.weight")
    swiglu = fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]  # SwiGLUPacked's halves
    return {"rel_pos_bias": rel, "qkv_bias": qkv, "pos_embed": "learned" if "pos_embed" in state else "none",
            "ffn": "swiglu" if swiglu else "mlp",
            "registers": state["reg_token"].shape[1] if "reg_token" in state else 0}


def beit_normal_(t: torch.Tensor) -> torch.Tensor:
    """BEiT's trunc_normal_(std=0.02): timm's truncation bounds are absolute (+-2), BEiT passes +-std."""
    return trunc_normal_(t, std=0.02, a=-0.02, b=0.02)


def build_vit(arch: str, *, img_size: int, patch_size: int | None = None, drop_path_rate: float = 0.0,
              layer_scale: float | None = None, attn_fn: AttentionFn = attention_reference,
              varlen_fn: VarlenAttentionFn = attention_varlen_reference, pos_embed: str = "learned",
              pos_interp: str = "dino", rel_pos_bias: str = "none", qkv_bias: str = "qkv",
              init: str = "timm", ffn: str = "mlp", registers: int = 0,
              drop_path_uniform: bool = False) -> VisionTransformer:
    a = get_arch(arch, "vit")
    return VisionTransformer(img_size=img_size, patch_size=patch_size or a.patch, embed_dim=a.width,
                             depth=a.depth, num_heads=a.heads, mlp_ratio=a.mlp_ratio, drop_path_rate=drop_path_rate,
                             layer_scale=layer_scale, attn_fn=attn_fn, varlen_fn=varlen_fn, pos_embed=pos_embed,
                             pos_interp=pos_interp, rel_pos_bias=rel_pos_bias, qkv_bias=qkv_bias, init=init,
                             ffn=ffn, registers=registers, drop_path_uniform=drop_path_uniform)
