"""iBOT: masked image modeling with an online tokenizer (seeds 000, 003).

The student (backbone + head) sees both global views with their patches masked, and the local
crops unmasked; the EMA teacher (same networks) sees the two global views whole.

    L_CLS: cross-view [CLS] self-distillation: every student crop v against every teacher global
           view q != v, averaged over the pairs.
    L_MIM: for each global view, distillation of the teacher's patch distribution of the clean
           view into the student's output at the masked positions of the masked view; averaged
           over the masked patches of each image, then over images (unmasked images count 0),
           then over the two views.

Teacher outputs are centred (separate centers for [CLS] and patches, EMA of the batch mean,
all-reduced over ranks) and sharpened by the teacher temperature. `forward` returns the two
unweighted terms; the loop weights them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from models.heads import IBOTHead
from models.kernels.softmax_ce import SoftmaxCEFn, get_softmax_ce, softmax_ce_reference
from models.vit import VisionTransformer

from . import build_student, register


def ibot_losses(student_cls: list[torch.Tensor], student_patch: list[torch.Tensor], patch_masks: torch.Tensor,
                teacher_cls: list[torch.Tensor], teacher_patch: list[torch.Tensor], center: torch.Tensor,
                center_patch: torch.Tensor, student_temp: float, teacher_temp: float,
                softmax_ce=softmax_ce_reference) -> dict[str, torch.Tensor]:
    """The iBOT loss terms.

    student_cls: per student crop (globals first), [B, K] logits.
    student_patch: per global view, [M_v, K'] logits of its masked patches only (row order of
        `patch_masks[v].nonzero()`).
    patch_masks: [G, B, N] bool.
    teacher_cls: per global view, [B, K]; teacher_patch: per global view, [M_v, K'] at the same
        masked positions as the student's.
    center: [K]; center_patch: [K'].
    """
    G = len(teacher_cls)
    cls_terms = [softmax_ce(student_cls[v], teacher_cls[q], center, student_temp, teacher_temp).mean()
                 for q in range(G) for v in range(len(student_cls)) if v != q]
    mim_terms = []
    for v in range(G):
        mask = patch_masks[v]  # [B, N]
        per_patch = softmax_ce(student_patch[v], teacher_patch[v], center_patch, student_temp, teacher_temp)
        image = mask.nonzero()[:, 0]  # image index of each masked patch
        per_image = torch.zeros(mask.shape[0], device=per_patch.device, dtype=per_patch.dtype)
        per_image.index_add_(0, image, per_patch)
        mim_terms.append((per_image / mask.sum(dim=1).clamp(min=1)).mean())
    return {"cls": torch.stack(cls_terms).mean(), "mim": torch.stack(mim_terms).mean()}


@register("ibot")
class IBOT(nn.Module):
    """Student and EMA teacher (backbone + iBOT head each) on one module tree."""

    def __init__(self, student: VisionTransformer, student_head: IBOTHead, teacher: VisionTransformer,
                 teacher_head: IBOTHead, out_dim: int, patch_out_dim: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, loss_weights: dict[str, float] | None = None,
                 softmax_ce: SoftmaxCEFn = softmax_ce_reference, pack_crops: bool = False):
        super().__init__()
        self.student = nn.ModuleDict({"backbone": student, "head": student_head})
        self.teacher = nn.ModuleDict({"backbone": teacher, "head": teacher_head})
        self.teacher.requires_grad_(False)
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.loss_weights = loss_weights or {"cls": 1.0, "mim": 1.0}
        self.softmax_ce, self.pack_crops = softmax_ce, pack_crops
        self.register_buffer("center", torch.zeros(out_dim))
        self.register_buffer("center_patch", torch.zeros(patch_out_dim))
        self.train()

    @classmethod
    def networks(cls, cfg) -> dict:
        """Constructor arguments shared with subclasses: both backbones, both heads, loss settings."""
        i = cfg.ibot

        def head(width: int) -> IBOTHead:
            return IBOTHead(width, i.out_dim, i.patch_out_dim, shared=i.shared_head, hidden_dim=i.head_hidden_dim,
                            bottleneck_dim=i.head_bottleneck_dim, norm_last_layer=i.norm_last_layer)

        student, teacher = build_student(cfg), build_student(cfg, drop_path=0.0)
        return {"student": student, "student_head": head(student.embed_dim), "teacher": teacher,
                "teacher_head": head(teacher.embed_dim), "out_dim": i.out_dim,
                "patch_out_dim": i.out_dim if i.shared_head else i.patch_out_dim, "student_temp": i.student_temp,
                "center_momentum": i.center_momentum,
                "loss_weights": {"cls": i.cls_weight, "mim": i.mim_weight},
                "softmax_ce": get_softmax_ce(cfg.run.kernels),
                # one packed pass for all crops where a varlen kernel makes it pay (run.kernels: triton)
                "pack_crops": cfg.run.kernels == "triton"}

    @classmethod
    def from_config(cls, cfg) -> IBOT:
        return cls(**cls.networks(cfg))

    def eval_features(self, images: torch.Tensor) -> torch.Tensor:
        """What kNN measures: the EMA teacher's [CLS] features. (Module calls, not forward_features:
        ZeRO-3 gathers a module's own parameters in its forward hooks.)"""
        return self.teacher.backbone(images)

    def train(self, mode: bool = True) -> IBOT:
        super().train(mode)
        self.teacher.eval()  # always: a no_grad module in train mode upsets ZeRO-3 (DeepSpeed #4922)
        return self

    def forward(self, batch: dict[str, torch.Tensor], values: dict[str, float]) -> dict[str, torch.Tensor]:
        """batch: normalised `global_crops` [G, B, 3, H, W], `local_crops` [L, B, 3, h, w], `masks` [G, B, h', w'];
        values: this step's schedule (teacher_temp)."""
        return self.ibot_step(batch, values["teacher_temp"])[0]

    def ibot_step(self, batch: dict[str, torch.Tensor], teacher_temp: float) -> tuple[dict, torch.Tensor]:
        """-> (iBOT loss terms, the student's final tokens at the masked positions [M, C])."""
        g, loc = batch["global_crops"], batch["local_crops"]
        G, B = g.shape[:2]
        masks = batch["masks"].flatten(2)  # [G, B, N]
        flat_masks = masks.flatten(0, 1)  # [G*B, N]

        with torch.no_grad():
            t = self.teacher.backbone.forward_features(g.flatten(0, 1))
            t_cls, t_patch = self.teacher.head(t["cls"], t["patch"])  # [GB, K], [GB, N, K']
        backbone = self.student.backbone
        views = [(g.flatten(0, 1), batch["masks"].flatten(0, 1))]
        if loc.shape[0]:
            views.append((loc.flatten(0, 1), None))
        if self.pack_crops:
            outs = backbone.forward_features_packed(views)
        else:
            outs = [backbone.forward_features(x, m) for x, m in views]
        s = outs[0]
        s_head = self.student.head
        s_cls = [s_head.cls(s["cls"])]
        # Patch head on the masked tokens only: the rest never enters the loss.
        masked_tokens = s["patch"][flat_masks]
        s_patch = (s_head.patch or s_head.cls)(masked_tokens)
        if loc.shape[0]:
            s_cls.append(s_head.cls(outs[1]["cls"]))
        s_cls = list(torch.cat(s_cls).chunk(G + loc.shape[0]))
        per_view = masks.sum(dim=(1, 2)).tolist()
        losses = ibot_losses(
            s_cls, list(s_patch.split(per_view)), masks, list(t_cls.chunk(G)),
            list(t_patch[flat_masks].split(per_view)), self.center, self.center_patch, self.student_temp,
            teacher_temp, self.softmax_ce)
        self.update_centers(t_cls, t_patch)
        return losses, masked_tokens

    @torch.no_grad()
    def update_centers(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        means = torch.cat([teacher_cls.float().mean(0), teacher_patch.float().mean((0, 1))])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(means)
            means /= dist.get_world_size()
        m = self.center_momentum
        K = self.center.numel()
        self.center.mul_(m).add_(means[:K], alpha=1 - m)
        self.center_patch.mul_(m).add_(means[K:], alpha=1 - m)
