"""The frozen teachers' section (`teacher.clip`), shared by the methods that distil from one (the
ones whose `frozen_files` name `clip_teacher`)."""

from __future__ import annotations

from dataclasses import dataclass

from .fields import opt


@dataclass
class FrozenTeacherConfig:
    arch: str = opt("ViT-L-14", "An open_clip image tower (ViT-B-16, ViT-L-14, ViT-H-14, ViT-g-14; add -quickgelu "
                                "for OpenAI's weights), clip_vit_tiny (CPU tests), or any timm ViT name (a DINO "
                                "teacher: vit_base_patch16_224.dino).")
    weights: str | None = opt(None, "Local weights file: open_clip .pt/.bin (whole CLIP or its visual tower), a "
                                    "timm/DINO state dict, or .safetensors. Never downloaded.")
    blocks: list[int] = opt([], "Teacher blocks whose outputs are targets (0-based; negative counts from the end). "
                                "Empty: the method's default (its own section's help says which).")
    mean: tuple[float, float, float] | None = opt(None, "Teacher input normalisation mean; null: the arch's own.")
    std: tuple[float, float, float] | None = opt(None, "Teacher input normalisation std; null: the arch's own.")
    antialias: bool = opt(False, "Resize the teacher's input and position embeddings with antialiasing (timm's "
                                 "default). false: bicubic without, as MaskAlign does (OpenDriveLab/MaskAlign "
                                 "models_pretrain.py: forward_clip, resize_pos_embed).")
    replicate: bool = opt(False, "Under ZeRO-3, keep the frozen teacher whole on every rank (bf16, outside the "
                                 "engine: never gathered) instead of partitioned and gathered block by block at "
                                 "each forward. Costs its full size per GPU (ViT-L/14 0.6 GiB, bigG/14 3.4 GiB) and "
                                 "saves that size in all-gather traffic per rank per micro-batch: worth it "
                                 "whenever that memory is free (scripts/plan_memory.py shows it). The reference "
                                 "code (DDP) always holds it whole.")


@dataclass
class TeacherConfig:
    clip: FrozenTeacherConfig = opt(FrozenTeacherConfig(), "The frozen teacher of the methods that distil from one.")


