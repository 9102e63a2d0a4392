"""Checks that span sections, for the methods' `validate(cfg)` (trainer/methods/base.py) and the root
config: each raises `Invalid(dotted key, problem)`, which the loader turns into one line naming where
the value came from."""

from __future__ import annotations

from pathlib import Path

from .fields import Invalid, checking_files, require


def check_blocks(blocks: list[int], depth: int, key: str, repeats: bool = False) -> None:
    for b in blocks:
        require(-depth <= b < depth, key, f"block {b} does not exist (depth {depth})")
    require(repeats or len({b % depth for b in blocks}) == len(blocks), key, f"{blocks} names a block twice")


def student_depth(arch: str) -> int:
    from models.archs import get_arch

    return get_arch(arch).depth


def check_single_view(cfg) -> None:
    """One global crop per image and no local crops (BEiT, its dVAE, iTPN)."""
    require(cfg.data.global_crops.number == 1, "data.global_crops.number",
            f"{cfg.data.global_crops.number}: {cfg.method} sees one view per image; set it to 1")
    require(cfg.data.local_crops.number == 0, "data.local_crops.number",
            f"{cfg.method} uses no local crops: set it to 0")


def check_frozen_teacher(cfg, repeats: bool = False) -> None:
    """teacher.clip: a known architecture, a weights file that exists, blocks it has (`repeats`: a
    block may be named more than once)."""
    from models.teachers import resolve_arch, teacher_depth

    t = cfg.teacher.clip
    try:
        resolve_arch(t.arch)
    except ValueError as e:
        raise Invalid("teacher.clip.arch", str(e)) from None
    require(t.weights is not None, "teacher.clip.weights",
            f"{cfg.method} needs a local weights file for its frozen teacher ({t.arch})")
    path = Path(t.weights).expanduser()
    hint = "; make one with: python scripts/make_tiny_clip.py" if t.arch == "clip_vit_tiny" else ""
    require(path.is_file() or not checking_files(), "teacher.clip.weights", f"{path}: file not found{hint}")
    check_blocks(t.blocks, teacher_depth(t.arch), "teacher.clip.blocks", repeats=repeats)
