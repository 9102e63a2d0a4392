"""iTPN's feature pyramid over HiViT's strides 16, 8 and 4, pretrained with the backbone (seed 004).

Top-down, as sunsmarterjie/iTPN builds it: the stride-16 level is the main stage's output
(projected to the pyramid width F); each finer level splits the coarser one (LayerNorm, linear
to 4F, each token to a 2 x 2 group), adds the lateral linear projection of the backbone's stage
at that stride, and fuses the sum with MLP blocks; a last MLP block per level gives the outputs.
Everything stays in the backbone's patch-major layout [B, K, k, k, F] (k = 1, 2, 4 inner tokens
per side), so it runs on the visible patches of a masked image as the backbone does;
`to_maps` turns the levels of a whole image into detector feature maps [B, F, H/s, W/s].
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .hivit import HiViT, LayerNorm, MlpBlock, build_hivit, init_weights


class PatchSplit(nn.Module):
    """[B, K, k, k, C] -> [B, K, 2k, 2k, F]: LayerNorm, linear to 4F, each token to a 2 x 2 group."""

    def __init__(self, dim: int, fpn_dim: int):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.reduction = nn.Linear(dim, fpn_dim * 4, bias=False)
        self.fpn_dim = fpn_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, K, h, w, _ = x.shape
        x = self.reduction(self.norm(x)).reshape(B, K, h, w, 2, 2, self.fpn_dim)
        return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, K, 2 * h, 2 * w, self.fpn_dim)


class FeaturePyramid(nn.Module):
    """dims: the backbone's widths at strides (4, 8, 16). Names follow the reference."""

    def __init__(self, dims: tuple[int, int, int], fpn_dim: int = 256, fpn_depth: int = 2, mlp_ratio: float = 4.0):
        super().__init__()
        d4, d8, d16 = dims
        self.fpn_dim = fpn_dim
        self.align_dim_16tofpn = nn.Linear(d16, fpn_dim) if d16 != fpn_dim else nn.Identity()
        self.split_16to8 = PatchSplit(d16, fpn_dim)
        self.align_dim_16to8 = nn.Linear(d8, fpn_dim, bias=False)
        self.block_16to8 = nn.Sequential(*[MlpBlock(fpn_dim, mlp_ratio) for _ in range(fpn_depth)])
        self.split_8to4 = PatchSplit(fpn_dim, fpn_dim)
        self.align_dim_8to4 = nn.Linear(d4, fpn_dim, bias=False)
        self.block_8to4 = nn.Sequential(*[MlpBlock(fpn_dim, mlp_ratio) for _ in range(fpn_depth)])
        self.fpn_modules = nn.ModuleList([MlpBlock(fpn_dim, mlp_ratio) for _ in range(3)])
        self.apply(init_weights)  # the reference initialises the whole model so, pyramid included

    def forward(self, stages: list[torch.Tensor]) -> list[torch.Tensor]:
        """stages: the backbone's [stride 4 [B, K, 4, 4, d4], stride 8 [B, K, 2, 2, d8], stride 16
        [B, K, d16]] -> levels [stride 16 [B, K, 1, 1, F], stride 8 [B, K, 2, 2, F], stride 4 [B, K, 4, 4, F]]."""
        s4, s8, s16 = stages
        x = s16[:, :, None, None, :]
        outs = [self.align_dim_16tofpn(x)]
        x = self.block_16to8(self.split_16to8(x) + self.align_dim_16to8(s8))
        outs.append(x)
        x = self.block_8to4(self.split_8to4(x) + self.align_dim_8to4(s4))
        outs.append(x)
        return [m(o) for m, o in zip(self.fpn_modules, outs)]


def to_maps(levels: list[torch.Tensor], grid: tuple[int, int]) -> list[torch.Tensor]:
    """Levels of whole images ([B, h * w, k, k, F] each) -> feature maps [B, F, h * k, w * k]."""
    out = []
    for x in levels:
        B, N, k, _, F = x.shape
        if N != grid[0] * grid[1]:
            raise ValueError(f"{N} patches are not the whole {grid[0]} x {grid[1]} grid (a masked image has no map)")
        out.append(x.reshape(B, grid[0], grid[1], k, k, F).permute(0, 5, 1, 3, 2, 4).reshape(
            B, F, grid[0] * k, grid[1] * k).contiguous())
    return out


class HiViTFPN(nn.Module):
    """Backbone and feature pyramid as downstream users get them: `forward_pyramid(images)` gives
    the three levels as detector feature maps [B, F, H/s, W/s] for s = 4, 8, 16."""

    def __init__(self, backbone: HiViT, pyramid: nn.Module):
        super().__init__()
        self.backbone, self.pyramid = backbone, pyramid

    def forward_features(self, x: torch.Tensor) -> dict:
        """{"cls": the mean stride-16 token (no [CLS] exists), "patch": the stride-16 tokens,
        "pyramid": the levels as token grids (models/pyramid.py)}."""
        out = self.backbone(x, pool=False)  # a module call: ZeRO-3 gathers the position table in its hooks
        return {"cls": out["patch"].mean(dim=1), "patch": out["patch"], "pyramid": self.pyramid(out["stages"])}

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        grid = (x.shape[-2] // self.backbone.patch_size, x.shape[-1] // self.backbone.patch_size)
        return to_maps(self.forward_features(x)["pyramid"], grid)[::-1]  # strides 4, 8, 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def build_itpn(arch: dict) -> HiViTFPN:
    """From the architecture record `itpn_arch` writes (and export files carry)."""
    backbone = build_hivit(arch["arch"], img_size=arch["image_size"], patch_size=arch["patch_size"],
                           layer_scale=arch.get("layer_scale"), pos_embed=arch.get("pos_embed", "sincos"))
    return HiViTFPN(backbone, FeaturePyramid(backbone.dims, arch["fpn_dim"], arch["fpn_depth"]))
