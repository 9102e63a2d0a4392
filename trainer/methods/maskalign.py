"""MaskAlign: masked image modeling without reconstruction (seed 001).

The student encodes only the visible patches of each image (a fraction 1 - r; no [MASK] tokens,
no decoder); the frozen teacher (CLIP, or DINO) sees the whole image. The visible set is uniformly
random, or attentive: the patches the teacher's last-block [CLS] attends to most. Dynamic
Alignment maps the student's block outputs into the teacher's levels (an adapter per student
block, a learnable S x T mixing matrix W); the targets are the teacher's block outputs, normalised
by a LayerNorm without affine, at the visible positions; the loss is smooth-L1.

Every global crop of a batch is an independent sample (MaskAlign uses one crop per image).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models.align import DynamicAlign
from models.teachers import FrozenTeacher
from models.vit import VisionTransformer

from . import build_frozen_teacher, build_student, register


def visible_count(num_patches: int, mask_ratio: float) -> int:
    return max(1, round(num_patches * (1.0 - mask_ratio)))


def random_visible(batch: int, num_patches: int, keep: int, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """[B, keep] patch indices, uniformly random per image, in increasing order."""
    noise = torch.rand(batch, num_patches, generator=generator, device=generator.device).to(device)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def attentive_visible(cls_attn: torch.Tensor, keep: int) -> torch.Tensor:
    """[B, keep] indices of the patches with the highest teacher [CLS] attention, in increasing order."""
    return cls_attn.topk(keep, dim=1).indices.sort(dim=1).values


@register("maskalign")
class MaskAlign(nn.Module):
    def __init__(self, student: VisionTransformer, clip_teacher: FrozenTeacher, student_blocks: list[int],
                 teacher_blocks: list[int], mask_ratio: float = 0.7, masking: str = "attentive",
                 dynamic: bool = True, adapter_hidden_dim: int | None = None, loss_beta: float = 1.0,
                 input_mean=(0.485, 0.456, 0.406), input_std=(0.229, 0.224, 0.225), seed: int = 0):
        super().__init__()
        student.global_pool = "avg"  # its [CLS] output is never trained (MAE-style pooling)
        self.student = nn.ModuleDict({"backbone": student})
        self.clip_teacher = clip_teacher
        self.align = DynamicAlign(student.embed_dim, clip_teacher.width, len(student_blocks), len(teacher_blocks),
                                  adapter_hidden_dim, dynamic)
        self.student_blocks, self.teacher_blocks = list(student_blocks), list(teacher_blocks)
        self.mask_ratio, self.masking, self.loss_beta = mask_ratio, masking, loss_beta
        self.input_mean, self.input_std, self.seed = tuple(input_mean), tuple(input_std), seed
        self.loss_weights = {"align": 1.0}

    @classmethod
    def from_config(cls, cfg) -> MaskAlign:
        m, t = cfg.maskalign, cfg.teacher.clip
        student = build_student(cfg)
        teacher = build_frozen_teacher(cfg)
        return cls(student, teacher, m.student_blocks or list(range(len(student.blocks))),
                   t.blocks or list(range(teacher.depth)), m.mask_ratio, m.masking, m.dynamic,
                   m.adapter_hidden_dim or None, m.loss_beta, cfg.data.augment.mean, cfg.data.augment.std,
                   cfg.run.seed)

    def no_weight_decay(self) -> set[str]:
        return {"align.weight"}  # a mixing matrix: decay would pull every level's weight to 0

    def eval_features(self, images: torch.Tensor) -> torch.Tensor:
        """What kNN measures: the student's mean patch token (its [CLS] output is never trained)."""
        return self.student.backbone(images)

    def visible(self, cls_attn: torch.Tensor | None, batch: int, num_patches: int, micro_step: int,
                device: torch.device) -> torch.Tensor:
        keep = visible_count(num_patches, self.mask_ratio)
        if self.masking == "attentive":
            return attentive_visible(cls_attn, keep)
        # A pure function of (seed, rank, micro-step): resumes draw the same masks, ranks differ.
        rank = dist.get_rank() if dist.is_initialized() else 0
        generator = torch.Generator().manual_seed(hash((self.seed, rank, micro_step)) & (2**62 - 1))
        return random_visible(batch, num_patches, keep, generator, device)

    def forward(self, batch: dict[str, torch.Tensor], values: dict[str, float]) -> dict[str, torch.Tensor]:
        images = batch["global_crops"].flatten(0, 1)  # [G*B, 3, H, W]
        p = self.student.backbone.patch_embed.patch_size[0]
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        t = self.clip_teacher(images, grid, self.input_mean, self.input_std, self.teacher_blocks,
                              attention=self.masking == "attentive")
        visible = self.visible(t.get("cls_attn"), images.shape[0], grid[0] * grid[1], int(values["micro_step"]),
                               images.device)
        s = self.student.backbone.forward_features(images, keep=visible, blocks=self.student_blocks)
        prefix = self.student.backbone.num_prefix_tokens
        pred = self.align([x[:, prefix:] for x in s["blocks"]])  # [T, B, K, C_t]
        index = visible.unsqueeze(-1).expand(-1, -1, self.clip_teacher.width)
        target = torch.stack([F.layer_norm(y.float().gather(1, index), (y.shape[-1],)) for y in t["blocks"]])
        return {"align": F.smooth_l1_loss(pred.float(), target, beta=self.loss_beta)}
