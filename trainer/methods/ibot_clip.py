"""iBOT + CLIP: iBOT's EMA teacher and a frozen CLIP teacher on one engine.

The student is trained with iBOT's two terms plus a feature-distillation term: at the masked
positions of each masked global view, an adapter on the student's final patch tokens predicts the
frozen teacher's features of the clean view (one teacher block, normalised by a LayerNorm
without affine), scored by cosine distance or smooth-L1. The adapter lives beside the student,
not in it: the EMA teacher and exported backbones never contain it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.align import adapter
from trainer.config.checks import check_frozen_teacher

from .base import register
from .build import build_frozen_teacher
from .ibot import IBOT


def distill_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """pred, target: [M, C]; mean over the M tokens (0 with the graph kept when M == 0)."""
    if pred.shape[0] == 0:
        return pred.sum() * 0.0
    target = F.layer_norm(target.float(), (target.shape[-1],))
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(pred.float(), target, dim=-1)).mean()
    return F.smooth_l1_loss(pred.float(), target)


@register("ibot_clip")
class IBOTCLIP(IBOT):
    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        check_frozen_teacher(cfg)

    @classmethod
    def frozen_files(cls, cfg) -> dict[str, str]:
        return {"clip_teacher": cfg.teacher.clip.weights}

    def __init__(self, *, clip_teacher, clip_block: int = -1, clip_loss: str = "cosine",
                 input_mean=(0.485, 0.456, 0.406), input_std=(0.229, 0.224, 0.225), **ibot):
        super().__init__(**ibot)
        self.clip_teacher = clip_teacher
        self.clip_head = adapter(self.student.backbone.embed_dim, clip_teacher.width, hidden_dim=clip_teacher.width)
        self.clip_block, self.clip_loss = clip_block, clip_loss
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)

    @classmethod
    def from_config(cls, cfg) -> IBOTCLIP:
        networks = cls.networks(cfg)
        networks["loss_weights"]["clip"] = cfg.ibot.clip_weight
        blocks = cfg.teacher.clip.blocks or [-1]
        return cls(clip_teacher=build_frozen_teacher(cfg), clip_block=blocks[0], clip_loss=cfg.ibot.clip_loss,
                   input_mean=cfg.data.augment.mean, input_std=cfg.data.augment.std, **networks)

    def forward(self, batch: dict[str, torch.Tensor], values: dict[str, float]) -> dict[str, torch.Tensor]:
        losses, masked_tokens, _ = self.ibot_step(batch, values)
        images = batch["global_crops"].flatten(0, 1)
        masks = batch["masks"].flatten(0, 1)  # [G*B, h, w]
        t = self.clip_teacher(images, tuple(masks.shape[-2:]), self.input_mean, self.input_std, [self.clip_block])
        # the clean view's features at the masked positions (the host-found index, see IBOT.ibot_step)
        index = batch.get("mask_index")
        if index is None:
            index = masks.flatten().nonzero().squeeze(1)
        target = t["blocks"][0].flatten(0, 1).index_select(0, index)
        losses["clip"] = distill_loss(self.clip_head(masked_tokens), target, self.clip_loss)
        return losses
