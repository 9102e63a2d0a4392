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

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


ARCHS: dict[str, Arch] = {
    "vit_test": Arch("vit", 32, 2, 2, 4, mlp_ratio=2.0),
    "vit_tiny": Arch("vit", 96, 6, 3, 8),
    "vit_small": Arch("vit", 384, 12, 6, 16),
    "vit_base": Arch("vit", 768, 12, 12, 16),
    "vit_large": Arch("vit", 1024, 24, 16, 16),
    "vit_huge": Arch("vit", 1280, 32, 16, 14),
    "vit_giant": Arch("vit", 1408, 40, 16, 14, mlp_ratio=6144 / 1408),
    "vit_gigantic": Arch("vit", 1664, 48, 16, 14, mlp_ratio=8192 / 1664),
    "hivit_test": Arch("hivit", 32, 2, 2, 8, mlp_depth=1),
    "hivit_tiny": Arch("hivit", 96, 4, 3, 8, mlp_depth=1),
    "hivit_base": Arch("hivit", 512, 24, 8, 16, mlp_depth=3),
    "hivit_large": Arch("hivit", 768, 40, 12, 16, mlp_depth=2),
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
