"""The backbone architectures, by name: one registry for the ViTs (models/vit.py) and the HiViTs
(models/hivit.py). Shapes of the design note; `*_test` and `*_tiny` are for the CPU and the tests;
hivit_base and hivit_large are iTPN's (itpn_base / itpn_large in sunsmarterjie/iTPN)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    family: str  # "vit" | "hivit"
    width: int
    depth: int  # attention blocks (HiViT: of its main stage)
    heads: int
    patch: int  # the default patch size
    mlp_ratio: float = 4.0
    mlp_depth: int = 0  # HiViT: MLP-only blocks in each of its two early stages
    timm: str | None = None  # timm's registered model of these shapes (what an export names)
    timm_beit: str | None = None  # timm's BEiT of these shapes

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


ARCHS: dict[str, Arch] = {
    "vit_test": Arch("vit", width=32, depth=2, heads=2, patch=4, mlp_ratio=2.0),
    "vit_tiny": Arch("vit", width=96, depth=6, heads=3, patch=8),
    "vit_small": Arch("vit", width=384, depth=12, heads=6, patch=16, timm="vit_small_patch16_224"),
    "vit_base": Arch("vit", width=768, depth=12, heads=12, patch=16, timm="vit_base_patch16_224",
                     timm_beit="beit_base_patch16_224"),
    "vit_large": Arch("vit", width=1024, depth=24, heads=16, patch=16, timm="vit_large_patch16_224",
                      timm_beit="beit_large_patch16_224"),
    "vit_huge": Arch("vit", width=1280, depth=32, heads=16, patch=14, timm="vit_huge_patch14_224"),
    "vit_giant": Arch("vit", width=1408, depth=40, heads=16, patch=14, mlp_ratio=6144 / 1408,
                      timm="vit_giant_patch14_224"),
    # DINOv2's vit_giant2 (facebookresearch/dinov2 dinov2/models/vision_transformer.py): ViT-g/14 at width
    # 1536 with 24 heads of 64; its recipe adds model.ffn swiglu (timm: vit_giant_patch14_dinov2)
    "vit_giant2": Arch("vit", width=1536, depth=40, heads=24, patch=14),
    "vit_gigantic": Arch("vit", width=1664, depth=48, heads=16, patch=14, mlp_ratio=8192 / 1664,
                         timm="vit_gigantic_patch14_224"),
    "hivit_test": Arch("hivit", width=32, depth=2, heads=2, patch=8, mlp_depth=1),
    "hivit_tiny": Arch("hivit", width=96, depth=4, heads=3, patch=8, mlp_depth=1),
    "hivit_base": Arch("hivit", width=512, depth=24, heads=8, patch=16, mlp_depth=3),
    "hivit_large": Arch("hivit", width=768, depth=40, heads=12, patch=16, mlp_depth=2),
}
VIT_ARCHS = {name: a for name, a in ARCHS.items() if a.family == "vit"}
HIVIT_ARCHS = {name: a for name, a in ARCHS.items() if a.family == "hivit"}


def get_arch(name: str, family: str | None = None) -> Arch:
    """The named architecture (of `family`, if given), or a ValueError that lists the known ones."""
    known = ARCHS if family is None else {n: a for n, a in ARCHS.items() if a.family == family}
    if name not in known:
        what = f"{family} arch" if family else "arch"
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(known)}")
    return known[name]
