"""MaskAlign: masked image modeling without reconstruction (seed 001), as OpenDriveLab/MaskAlign runs it.

The student encodes only the visible patches of each image, int(N * (1 - r)) of them (no [MASK]
tokens, no decoder); the frozen teacher (CLIP, or DINO) sees the whole image. The visible set is
uniformly random, or attentive: drawn without replacement with probabilities proportional to the
teacher's last-block [CLS] attention (the reference's `torch.multinomial`; `topk` keeps the most
attended instead). Dynamic Alignment (models/align.py) maps the student's block outputs, [CLS]
included, onto the teacher's chosen levels (by default its last 5, the reference's `top5`); the
targets are the teacher's block outputs normalised per token by a LayerNorm without affine
(`--target_norm whiten`) at the [CLS] and visible positions; the term is the mean over levels of
smooth-L1, which the reference weights by 2 (`maskalign.align_weight`). The student's position
embeddings are MAE's fixed sin-cos table by default.

Every global crop of a batch is an independent sample (MaskAlign uses one crop per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.masking import attentive_visible, dropped_mask, random_visible, step_generator, visible_count
from models.align import DynamicAlign, layerwise_matrix
from models.teachers import FrozenTeacher
from models.vit import VisionTransformer
from trainer.config.checks import check_blocks, check_frozen_teacher, student_depth
from trainer.config.fields import at_least, opt, require

from .base import Method, meta_images, register
from .build import build_frozen_teacher, build_student

MASKALIGN = "OpenDriveLab/MaskAlign"


@dataclass
class MaskAlignConfig:
    """Defaults follow the official code's ViT-B recipe (README: --mask_type attention --mask_ratio 0.7
    --loss_weights top5 --head_type linear --fusion_type linear --loss_type smoothl1 --target_norm whiten)."""

    mask_ratio: float = opt(0.7, "Fraction r of patches the student never sees; it encodes int(N * (1 - r)) "
                                 "(int() as the reference).")
    masking: Literal["attentive", "random"] = opt(
        "attentive", "attentive: visible patches chosen by the teacher's last-block [CLS] attention; random: uniform.")
    attentive_sampling: Literal["multinomial", "topk"] = opt(
        "multinomial", f"How attentive masking picks the visible patches: sampled without replacement with "
                       f"probabilities proportional to the attention ({MASKALIGN} models_pretrain.py "
                       "attention_masking: torch.multinomial), or the top-k.")
    student_blocks: list[int] = opt([], "Student blocks fed to the alignment (0-based, negative from the end); "
                                        "empty: all. The teacher's are teacher.clip.blocks (empty: its last 5, "
                                        "MaskAlign's --loss_weights top5).")
    adapter_on: Literal["teacher_level", "student_level"] = opt(
        "teacher_level", f"teacher_level: W mixes the student's block outputs, then one adapter per teacher level "
                         f"maps the mix ({MASKALIGN} models_pretrain.py get_student); student_level: one adapter per "
                         "student block, then W mixes the adapted features (the paper: y_j = sum_i w_ij A_i(x_i)).")
    adapter: Literal["linear", "mlp"] = opt(
        "linear", "Adapter: one linear layer (--head_type linear) or the paper's light 2-layer MLP (GELU).")
    adapter_hidden_dim: int = opt(0, "Hidden width of the 2-layer adapters; 0: the student's width (as the "
                                     "reference's --head_type mlp).")
    dynamic: bool = opt(True, "Learn W (false: fixed at its start value, the paper's layer-wise alignment).")
    w_offset: float = opt(0.01, f"W starts at the layer-wise mapping (student level at the same relative depth) plus "
                                f"this constant everywhere ({MASKALIGN}: torch.eye(depth) + 0.01).")
    align_cls: bool = opt(True, "Align the [CLS] token too (the reference concatenates it with the visible patches).")
    pos_embed: Literal["sincos", "learned"] = opt(
        "sincos", "Student position embeddings: fixed 2-D sin-cos in MAE's layout (the reference, built on MAE), "
                  "or learned.")
    loss_beta: float = opt(1.0, "Smooth-L1 transition point (the paper's loss: 1).")
    align_weight: float = opt(2.0, f"Weight of the alignment loss (the mean over levels of smooth-L1); "
                                   f"{MASKALIGN} forward_loss adds 2 * F.smooth_l1_loss.")

    def validate(self) -> None:
        require(0.0 < self.mask_ratio < 1.0, "mask_ratio", f"{self.mask_ratio} is outside (0, 1)")
        at_least(self, 0, "adapter_hidden_dim", "w_offset", "align_weight")
        at_least(self, 0, "loss_beta", strict=True)




def align_targets(cls_tokens: list[torch.Tensor], patches: list[torch.Tensor], visible: torch.Tensor,
                  align_cls: bool = True) -> list[torch.Tensor]:
    """Per teacher level: [CLS] (optionally) and the visible patches, each token normalised by a
    LayerNorm without affine (the reference's --target_norm whiten). cls_tokens: T x [B, C];
    patches: T x [B, N, C]; visible: [B, K] -> T x [B, (1 +) K, C] in fp32."""
    index = visible.unsqueeze(-1).expand(-1, -1, patches[0].shape[-1])
    out = []
    for cls_tok, level in zip(cls_tokens, patches):
        y = level.float().gather(1, index)
        if align_cls:
            y = torch.cat([cls_tok.float().unsqueeze(1), y], dim=1)
        out.append(F.layer_norm(y, (y.shape[-1],)))
    return out


def align_loss(pred: torch.Tensor, targets: list[torch.Tensor], beta: float = 1.0) -> torch.Tensor:
    """Mean over teacher levels of smooth-L1 (each a mean over tokens and channels). pred: [T, B, n, C]."""
    return torch.stack([F.smooth_l1_loss(x.float(), y, beta=beta) for x, y in zip(pred, targets)]).mean()


@register("maskalign")
class MaskAlign(Method):
    config_section = ("maskalign", MaskAlignConfig)
    knn_pool, knn_features = "avg", "student mean patch token"

    def __init__(self, student: VisionTransformer, clip_teacher: FrozenTeacher, student_blocks: list[int],
                 teacher_blocks: list[int], mask_ratio: float = 0.7, masking: str = "attentive",
                 attentive_sampling: str = "multinomial", adapter_on: str = "teacher_level", adapter: str = "linear",
                 adapter_hidden_dim: int | None = None, dynamic: bool = True, w_offset: float = 0.01,
                 align_cls: bool = True, loss_beta: float = 1.0, align_weight: float = 2.0,
                 input_mean=(0.485, 0.456, 0.406), input_std=(0.229, 0.224, 0.225), seed: int = 0):
        super().__init__()
        student.global_pool = "avg"  # kNN on the mean patch token, as MAE-style fine-tuning pools
        self.student = nn.ModuleDict({"backbone": student})
        self.clip_teacher = clip_teacher
        depth = len(student.blocks)
        self.student_blocks = [b % depth for b in student_blocks]
        self.teacher_blocks = [b % clip_teacher.depth for b in teacher_blocks]
        start = layerwise_matrix(self.student_blocks, self.teacher_blocks, depth, clip_teacher.depth)
        self.align = DynamicAlign(student.embed_dim, clip_teacher.width, start, adapter_on, adapter,
                                  adapter_hidden_dim, dynamic, w_offset)
        self.mask_ratio, self.masking, self.attentive_sampling = mask_ratio, masking, attentive_sampling
        self.align_cls, self.loss_beta = align_cls, loss_beta
        self.input_mean, self.input_std, self.seed = tuple(input_mean), tuple(input_std), seed
        self.loss_weights = {"align": align_weight}

    @classmethod
    def from_config(cls, cfg) -> MaskAlign:
        m, t = cfg.maskalign, cfg.teacher.clip
        student = build_student(cfg, pos_embed=m.pos_embed)
        teacher = build_frozen_teacher(cfg)
        return cls(student, teacher, m.student_blocks or list(range(len(student.blocks))),
                   t.blocks or list(range(max(teacher.depth - 5, 0), teacher.depth)), m.mask_ratio, m.masking,
                   m.attentive_sampling, m.adapter_on, m.adapter, m.adapter_hidden_dim or None, m.dynamic,
                   m.w_offset, m.align_cls, m.loss_beta, m.align_weight, cfg.data.augment.mean,
                   cfg.data.augment.std, cfg.run.seed)

    @classmethod
    def validate(cls, cfg) -> None:
        require(cfg.data.local_crops.number == 0, "data.local_crops.number",
                "maskalign uses no local crops: set it to 0")
        grid = (cfg.data.global_crops.size // cfg.model.patch_size) ** 2
        keep = max(1, int(grid * (1 - cfg.maskalign.mask_ratio)))
        require(keep < grid, "maskalign.mask_ratio",
                f"{cfg.maskalign.mask_ratio} leaves all {grid} patches of a global crop visible")
        check_blocks(cfg.maskalign.student_blocks, student_depth(cfg.model.arch), "maskalign.student_blocks")
        check_frozen_teacher(cfg)

    @classmethod
    def frozen_files(cls, cfg) -> dict[str, str]:
        return {"clip_teacher": cfg.teacher.clip.weights}

    def plan_calls(self, cfg, s, dt) -> list:
        b, n = s.global_n * s.b, s.patches
        keep = torch.zeros(b, visible_count(n, self.mask_ratio), dtype=torch.long, device="meta")
        clip = self.clip_teacher

        def teacher():
            return clip(meta_images(b, s.global_size, dt), (s.grid, s.grid), cfg.data.augment.mean,
                        cfg.data.augment.std, self.teacher_blocks, attention=self.masking == "attentive")

        def student():
            out = self.student.backbone.forward_features(meta_images(b, s.global_size, dt), keep=keep,
                                                         blocks=self.student_blocks)
            return self.align(out["blocks"])

        return [("frozen CLIP teacher", teacher, False, clip),
                ("student (visible patches) + alignment", student, True, self)]

    @classmethod
    def masks_to_draw(cls, cfg, views, loader_masks):
        """The visible patches its frozen teacher's attention chooses (the masks step 0 would use)."""
        from models.teachers import load_teacher_weights

        method = cls.from_config(cfg).eval()
        load_teacher_weights(method.clip_teacher, cfg.teacher.clip.weights)
        a, p, n = cfg.data.augment, cfg.model.patch_size, views.shape[0]
        grid = (views.shape[-2] // p, views.shape[-1] // p)
        with torch.no_grad():
            t = method.clip_teacher(views, grid, a.mean, a.std, method.teacher_blocks,
                                    attention=method.masking == "attentive")
        visible = method.visible(t.get("cls_attn"), n, grid[0] * grid[1], 0, views.device)
        masks = dropped_mask(visible, grid[0] * grid[1]).view(n, *grid)
        return masks, f"maskalign: {method.masking} masking, visible patches kept"

    def no_weight_decay(self) -> set[str]:
        return {"align.weight"}  # the reference: skip_list=["distill_weights"]

    def eval_features(self, images: torch.Tensor) -> torch.Tensor:
        """What kNN measures: the student's mean patch token (its [CLS] output is never trained)."""
        return self.student.backbone(images)

    def visible(self, cls_attn: torch.Tensor | None, batch: int, num_patches: int, micro_step: int,
                device: torch.device) -> torch.Tensor:
        keep = visible_count(num_patches, self.mask_ratio)
        generator = step_generator(self.seed, micro_step)
        if self.masking == "attentive":
            return attentive_visible(cls_attn, keep, generator, self.attentive_sampling)
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
        # [CLS] first, then the visible patches: the student's tokens are already in this order.
        pred = self.align([x if self.align_cls else x[:, prefix:] for x in s["blocks"]])  # [T, B, n, C_t]
        targets = align_targets(t["cls"], t["blocks"], visible, self.align_cls)
        return {"align": align_loss(pred, targets, self.loss_beta)}
