"""DINOv2: iBOT's objective with the changes facebookresearch/dinov2 makes to it (seed 000's successor).

The student, the EMA teacher, the cross-view [CLS] term and the masked-patch term are iBOT's
(trainer/methods/ibot.py, reused here); what differs, each a switch of the `dinov2` section whose
default is DINOv2's:

    centering      the teacher's [CLS] and masked-patch outputs become targets by Sinkhorn-Knopp
                   (`sinkhorn_knopp`, dinov2/loss/dino_clstoken_loss.py and ibot_patch_loss.py), or by
                   iBOT's momentum center, whose patch statistics are then the masked patches' only
    KoLeo          -log of each image's distance to its nearest neighbour in the batch, on the student
                   backbone's normalised [CLS] tokens of each global crop, per crop and per rank
                   (`koleo`, dinov2/loss/koleo_loss.py, weighted in ssl_meta_arch.py)
    heads          untied [CLS] and patch heads (separate_head), each with its own prototypes, hidden
                   and bottleneck widths; prototype norms trained from 1 (DINOHead's weight_g)
    one teacher temperature for [CLS] and patches; masks drawn per batch (`data.mask.spread`);
    SwiGLU, registers and uniform drop path are backbone options (`model.*`, models/vit.py).

The loss terms are DINOv2's normalisations: [CLS] averaged over the (student crop, other teacher
view) pairs, the patch term over each image's masked patches and then over all global crops, KoLeo
summed over the two global crops. `forward` returns them unweighted ("cls", "mim", "koleo").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.heads import IBOTHead
from models.kernels import get_softmax_ce
from trainer.config.fields import at_least, check_range, opt, require
from trainer.schedules import linear_warmup

from .base import register
from .build import build_student, kernels
from .ibot import IBOT, ibot_losses, sum_over_ranks

DINOV2 = "facebookresearch/dinov2"
DEFAULTS = f"{DINOV2} dinov2/configs/ssl_default_config.yaml"


@dataclass
class DINOv2Config:
    """Defaults are DINOv2's ssl_default_config.yaml (its ViT-g/14 recipe, vitg14.yaml, is
    configs/dinov2_vitg14_in22k.yaml)."""

    out_dim: int = opt(65536, f"[CLS] head prototypes ({DEFAULTS} dino.head_n_prototypes; vitg14: 131072).")
    head_hidden_dim: int = opt(2048, "[CLS] head MLP width (dino.head_hidden_dim).")
    head_bottleneck_dim: int = opt(256, "[CLS] head bottleneck (dino.head_bottleneck_dim; vitg14: 384).")
    head_layers: int = opt(3, "[CLS] head MLP layers (dino.head_nlayers).")
    separate_head: bool = opt(False, "Patch tokens get a head of their own (ibot.separate_head; vitg14: true); "
                                     "false: the [CLS] head scores them.")
    patch_out_dim: int = opt(65536, "Patch head prototypes with separate_head (ibot.head_n_prototypes; vitg14: "
                                    "131072).")
    patch_head_hidden_dim: int = opt(2048, "Patch head MLP width (ibot.head_hidden_dim).")
    patch_head_bottleneck_dim: int = opt(256, "Patch head bottleneck (ibot.head_bottleneck_dim: 256 in vitg14 too).")
    patch_head_layers: int = opt(3, "Patch head MLP layers (ibot.head_nlayers).")
    head_norm: Literal["none", "bn"] = opt(
        "none", f"Batch norm after each hidden layer of both heads ({DINOV2} dinov2/layers/dino_head.py use_bn, "
                "default False; statistics over every rank, as models/heads.py TokenBatchNorm).")
    norm_last_layer: bool = opt(
        False, f"Fix the prototype norms at 1. false: they start at 1 and train ({DINOV2} dinov2/layers/"
               "dino_head.py: weight_norm with weight_g filled with 1, not frozen).")
    prototype_init: Literal["linear", "trunc_normal"] = opt(
        "linear", "Initial prototype directions: nn.Linear's default, as DINOHead builds its last layer after its "
                  "trunc-normal init of the MLP.")
    student_temp: float = opt(0.1, "Student softmax temperature (dinov2/loss: student_temp 0.1).")
    teacher_temp: tuple[float, float] = opt(
        (0.04, 0.07), "Teacher temperature of [CLS] and patches, warm-up start and final value "
                      "(teacher.warmup_teacher_temp 0.04, teacher.teacher_temp 0.07).")
    teacher_temp_warmup_steps: int = opt(37_500, "Steps of its linear warm-up (teacher.warmup_teacher_temp_epochs "
                                                 "30 of DINOv2's 1,250-iteration epochs).")
    centering: Literal["sinkhorn_knopp", "centering"] = opt(
        "centering", f"How teacher outputs become targets ({DEFAULTS} train.centering: 'centering'; every released "
                     "recipe, dinov2/configs/train/vitl14.yaml and vitg14.yaml, sets 'sinkhorn_knopp'): "
                     "'sinkhorn_knopp' = equipartition over every rank's batch (dino_clstoken_loss.py "
                     "sinkhorn_knopp_teacher; the patches' over the masked patches, ibot_patch_loss.py); "
                     "'centering' = softmax after subtracting a momentum center.")
    sinkhorn_iterations: int = opt(3, "Sinkhorn-Knopp iterations (n_iterations=3).")
    center_momentum: float = opt(0.9, "Momentum of the centers with centering: 'centering' (center_momentum 0.9).")
    koleo_weight: float = opt(0.1, "Weight of the KoLeo term (dino.koleo_loss_weight 0.1; 0: off).")
    cls_weight: float = opt(1.0, "Weight of the [CLS] term (dino.loss_weight).")
    mim_weight: float = opt(1.0, "Weight of the masked-patch term (ibot.loss_weight).")
    ema_momentum: tuple[float, float] = opt((0.992, 1.0), "Teacher EMA momentum, start and end of a cosine "
                                                          "(teacher.momentum_teacher 0.992; vitg14: 0.994).")
    freeze_last_layer_steps: int = opt(1250, "Prototypes get lr 0 for these first steps (optim.freeze_last_layer_"
                                             "epochs 1).")

    def validate(self) -> None:
        at_least(self, 1, "out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_layers", "patch_out_dim",
                 "patch_head_hidden_dim", "patch_head_bottleneck_dim", "patch_head_layers", "sinkhorn_iterations")
        at_least(self, 0, "student_temp", strict=True)
        require(all(t > 0 for t in self.teacher_temp), "teacher_temp", "must be > 0")
        require(0 <= self.center_momentum < 1, "center_momentum", f"{self.center_momentum} is outside [0, 1)")
        check_range(self.ema_momentum, "ema_momentum", 0.0, 1.0)
        at_least(self, 0, "teacher_temp_warmup_steps", "freeze_last_layer_steps", "koleo_weight", "cls_weight",
                 "mim_weight")


def all_reduce_(x: torch.Tensor, op=None) -> torch.Tensor:
    """In-place sum (or `op`) over the data-parallel ranks; nothing on one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """[B, K] teacher logits on each rank -> [B, K] targets: exp(logits / temp) scaled so that over
    every rank's rows together each prototype gets 1/K of the mass and each row sums to 1
    (dino_clstoken_loss.py / ibot_patch_loss.py sinkhorn_knopp_teacher: one all-reduce of the total,
    one per iteration; the row count is all-reduced too, the patches' masked-patch count varies by rank).

    Not DINOv2's: the logits' largest value over ranks is subtracted before exp (one more scalar
    all-reduce), which changes nothing after the first normalisation but keeps exp finite at any
    prototype norm; and a prototype no row reaches keeps 0 mass instead of dividing 0 by 0."""
    x = logits.float() / temp
    peak = x.max() if x.numel() else x.new_full((), float("-inf"))
    all_reduce_(peak, dist.ReduceOp.MAX if dist.is_available() else None)
    Q = torch.exp(x - peak).t()  # [K, B]
    K = Q.shape[0]
    B = all_reduce_(Q.new_full((), float(Q.shape[1])))  # (new_full: no host-to-device copy)
    Q /= all_reduce_(Q.sum())
    for _ in range(iterations):
        Q /= all_reduce_(Q.sum(dim=1, keepdim=True)).clamp_min(torch.finfo(Q.dtype).tiny)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return (Q * B).t()


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Kozachenko-Leonenko entropy estimate's loss on [B, C] features: the mean over rows of
    -log(distance to the nearest other row + eps), rows L2-normalised, in fp32 (dinov2/loss/koleo_loss.py,
    the same values: distance |x - y + eps| as nn.PairwiseDistance(2, eps)).

    Safe where DINOv2's is not: it runs in fp32 whatever the input (DINOv2's turns autocast off but
    keeps the fp16 tensors FSDP gives it, where eps is 0: one image, or two identical ones, give
    -log(0) = inf and NaN gradients); a single row has no neighbour and gives 0 (DINOv2 pairs it with
    itself); the diagonal is excluded with -inf rather than -1 (an exactly opposite pair ties with it)."""
    if x.shape[0] < 2:
        return x.float().sum() * 0.0  # in the graph, so every rank's backward sees the same parameters
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(float("-inf"))
        nearest = dots.argmax(dim=1)
    d = torch.linalg.vector_norm(x - x[nearest] + eps, dim=-1)
    return -torch.log(d + eps).mean()


@register("dinov2")
class DINOv2(IBOT):
    """iBOT's networks and loss with DINOv2's targets, heads and KoLeo term."""

    config_section = ("dinov2", DINOv2Config)
    logged_schedules = ("teacher_temp",)

    def __init__(self, *, centering: str = "centering", sinkhorn_iterations: int = 3, **ibot):
        super().__init__(**ibot)
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations

    @classmethod
    def networks(cls, cfg) -> dict:
        d = cfg.dinov2

        def head(width: int) -> IBOTHead:
            patch = {"hidden_dim": d.patch_head_hidden_dim, "bottleneck_dim": d.patch_head_bottleneck_dim,
                     "nlayers": d.patch_head_layers}
            return IBOTHead(width, d.out_dim, d.patch_out_dim, patch="separate" if d.separate_head else "shared",
                            hidden_dim=d.head_hidden_dim, bottleneck_dim=d.head_bottleneck_dim,
                            nlayers=d.head_layers, norm_last_layer=d.norm_last_layer, prototype_init=d.prototype_init,
                            norm=d.head_norm, all_reduce=sum_over_ranks, patch_options=patch)

        student, teacher, impl = build_student(cfg), build_student(cfg, drop_path=0.0), kernels(cfg)
        patch_out_dim = d.patch_out_dim if d.separate_head else d.out_dim
        return {"student": student, "student_head": head(student.embed_dim), "teacher": teacher,
                "teacher_head": head(teacher.embed_dim), "out_dim": d.out_dim, "patch_out_dim": patch_out_dim,
                "student_temp": d.student_temp, "center_momentum": d.center_momentum,
                "loss_weights": {"cls": d.cls_weight, "mim": d.mim_weight, "koleo": d.koleo_weight},
                "loss_fn": get_softmax_ce(impl, fused_linear=True), "pack_crops": impl == "triton",
                "centering": d.centering, "sinkhorn_iterations": d.sinkhorn_iterations}

    @classmethod
    def loss_classes(cls, cfg) -> dict[str, tuple[int, ...]]:
        d = cfg.dinov2
        return {"softmax_ce": tuple(dict.fromkeys((d.out_dim, d.patch_out_dim if d.separate_head else d.out_dim)))}

    @classmethod
    def ema_momentum(cls, cfg) -> tuple[float, float]:
        return tuple(cfg.dinov2.ema_momentum)

    @classmethod
    def schedules(cls, cfg):
        """One teacher temperature for [CLS] and patches (DINOv2's teacher_temp schedule) and the
        prototypes frozen for the first steps."""
        d = cfg.dinov2

        def at(step: int) -> dict[str, float]:
            temp = linear_warmup(step, d.teacher_temp_warmup_steps, *d.teacher_temp)
            return {"teacher_temp": temp, "teacher_patch_temp": temp,
                    "last_layer_lr_factor": 0.0 if step < d.freeze_last_layer_steps else 1.0}

        return at

    def forward(self, batch: dict[str, torch.Tensor], values: dict[str, float]) -> dict[str, torch.Tensor]:
        losses, _, global_cls = self.ibot_step(batch, values)
        if self.loss_weights.get("koleo", 0) > 0:  # per global crop, this rank's images (ssl_meta_arch.py)
            losses["koleo"] = sum(koleo(crop) for crop in global_cls.chunk(batch["global_crops"].shape[0]))
        return losses

    def distill(self, h_cls, h_patch, masks, index, t_cls, t_patch, values, protos) -> dict:
        """The teacher's targets for the masked patches only (DINOv2 runs its teacher head on them alone);
        with Sinkhorn-Knopp they are probabilities, given to the fused loss as log-probabilities with
        no center at temperature 1 (softmax(log q) = q)."""
        temp = values["teacher_temp"]
        masked = t_patch.flatten(0, 1).index_select(0, index)  # [M, K']
        rows = torch.arange(masked.shape[0], device=masked.device)
        if self.centering == "sinkhorn_knopp":
            def log_targets(t: torch.Tensor) -> torch.Tensor:
                return sinkhorn_knopp(t, temp, self.sinkhorn_iterations).clamp_min(1e-30).log()

            zeros = self.center.new_zeros(self.center.shape), self.center_patch.new_zeros(self.center_patch.shape)
            return ibot_losses(h_cls, h_patch, masks, log_targets(t_cls), log_targets(masked), *zeros,
                               self.student_temp, 1.0, 1.0, self.loss_fn, protos, None, index, rows)
        cls_sum = self.center.new_zeros(self.center.shape, dtype=torch.float32)
        losses = ibot_losses(h_cls, h_patch, masks, t_cls, masked, self.center, self.center_patch, self.student_temp,
                             temp, temp, self.loss_fn, protos, (cls_sum, None), index, rows)
        # the patch center follows the masked patches' mean (ibot_patch_loss.py reduce_center_update)
        patch_mean = masked.float().sum(0) / max(masked.shape[0], 1)
        self.update_centers(cls_sum / t_cls.shape[0], patch_mean)
        return losses
