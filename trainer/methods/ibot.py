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
all-reduced over ranks) and sharpened by the teacher temperatures (one schedule for [CLS], one for
patches). `forward` returns the two unweighted terms; the loop weights them.

The head (models/heads.py) is shared by [CLS] and patches, or gives patches prototypes of their
own after the same MLP (iBOT), or a whole head (DINOv2). As in iBOT (--shared_head_teacher), the
EMA teacher may keep a shared head while the student's is not: its patch targets then come from
its [CLS] prototypes, and the student's patch prototypes have no teacher twin (trainer/ema.py
pairs the parameters the two have in common).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn

from models.heads import IBOTHead
from models.kernels import get_softmax_ce
from models.kernels.softmax_ce import SoftmaxCEFn, fused_linear_softmax_ce_reference, softmax_ce_reference
from models.vit import VisionTransformer
from trainer.config.fields import at_least, check_range, opt, require
from trainer.schedules import linear_warmup

from .base import Method, meta_images, register
from .build import build_student, kernels

IBOT = "bytedance/ibot"


@dataclass
class IBOTConfig:
    """Defaults are main_ibot.py's argument defaults unless the help says otherwise."""

    out_dim: int = opt(8192, f"Prototypes K of the [CLS] head ({IBOT} main_ibot.py --out_dim 8192, at every size).")
    patch_out_dim: int | None = opt(None, "Prototypes of the patch head when it is not shared (--patch_out_dim); "
                                          "null: out_dim. With shared_head_teacher it must equal out_dim: iBOT "
                                          "ignores it then.")
    shared_head: bool = opt(True, "One projection head for [CLS] and patch tokens (--shared_head true, as every "
                                  "recipe in iBOT's README; main_ibot.py's own default is false).")
    separate_patch_mlp: bool = opt(
        False, f"With shared_head false: false = iBOT's iBOTHead, one MLP and a second prototype layer for patches "
               f"({IBOT} models/head.py, last_layer2); true = DINOv2's separate_head, a whole second head "
               "(facebookresearch/dinov2 ssl_meta_arch.py).")
    shared_head_teacher: bool = opt(
        True, f"With shared_head false: the EMA teacher keeps one shared head, so its patch targets come from its "
              f"[CLS] prototypes and the student's patch prototypes have no teacher twin ({IBOT} "
              "--shared_head_teacher, default true). false: the teacher mirrors the student (DINOv2).")
    head_hidden_dim: int = opt(2048, "Hidden width of the 3-layer head MLP.")
    head_norm: Literal["none", "bn", "ln"] = opt(
        "none", f"Norm after each hidden layer of the head MLP ({IBOT} main_ibot.py --norm_in_head, default none). "
                "bn: batch statistics over every token of a forward on every rank (iBOT's SyncBatchNorm; its "
                "teacher uses batch statistics too), the head run on all tokens as iBOT runs it.")
    head_bottleneck_dim: int = opt(256, "Bottleneck before the prototypes.")
    norm_last_layer: bool = opt(True, "Fix the prototype norms to 1 (more stable; False for ViT-S in iBOT).")
    prototype_init: Literal["linear", "trunc_normal"] = opt(
        "linear", f"Initial prototype directions: 'linear' = nn.Linear's default (kaiming-uniform, row norm about "
                  f"0.58), as iBOT's and DINO's weight_norm(nn.Linear) ({IBOT} models/head.py); 'trunc_normal': "
                  "std 0.02 (row norm about 0.32 at 256 inputs).")
    student_temp: float = opt(0.1, "Student softmax temperature.")
    teacher_temp: tuple[float, float] = opt(
        (0.04, 0.04), "[CLS] teacher temperature: warm-up start and final value (--warmup_teacher_temp 0.04, "
                      "--teacher_temp 0.04; iBOT's README recipes warm it to 0.07).")
    teacher_patch_temp: tuple[float, float] = opt(
        (0.04, 0.07), "Patch teacher temperature: warm-up start and final value (--warmup_teacher_patch_temp 0.04, "
                      "--teacher_patch_temp 0.07).")
    teacher_temp_warmup_steps: int = opt(37_500, "Steps of linear warm-up of both teacher temperatures "
                                                 "(--warmup_teacher_temp_epochs 30: 30 epochs of IN-1k at 1024).")
    center_momentum: float = opt(0.9, "Momentum of the teacher output centers ([CLS] and patch).")
    ema_momentum: tuple[float, float] = opt((0.996, 1.0), "Teacher EMA momentum: start and end of a cosine.")
    cls_weight: float = opt(1.0, "Weight of L_CLS in the optimised loss.")
    mim_weight: float = opt(1.0, "Weight of L_MIM in the optimised loss.")
    freeze_last_layer_steps: int = opt(1250, "Prototype layer gets lr 0 for these first steps (one epoch).")
    clip_weight: float = opt(1.0, "method ibot_clip: weight of the frozen-teacher feature distillation term "
                                  "(its target: the block teacher.clip.blocks names; empty: the last).")
    clip_loss: Literal["cosine", "smooth_l1"] = opt(
        "cosine", "method ibot_clip: distance between predicted and (normalised) teacher features.")

    def validate(self) -> None:
        at_least(self, 1, "out_dim", "head_hidden_dim", "head_bottleneck_dim")
        if self.patch_out_dim is not None:
            at_least(self, 1, "patch_out_dim")
        at_least(self, 0, "student_temp", strict=True)
        for name in ("teacher_temp", "teacher_patch_temp"):
            require(all(t > 0 for t in getattr(self, name)), name, "must be > 0")
        require(0 <= self.center_momentum < 1, "center_momentum", f"{self.center_momentum} is outside [0, 1)")
        check_range(self.ema_momentum, "ema_momentum", 0.0, 1.0)
        at_least(self, 0, "teacher_temp_warmup_steps", "freeze_last_layer_steps")
        require(self.cls_weight >= 0 and self.mim_weight >= 0, "cls_weight", "loss weights must be >= 0")
        at_least(self, 0, "clip_weight")
        if not self.shared_head and self.shared_head_teacher:
            require(self.patch_out_dim in (None, self.out_dim), "patch_out_dim",
                     f"{self.patch_out_dim}: with shared_head_teacher the teacher scores patches with its [CLS] "
                     f"prototypes, so it must equal out_dim ({self.out_dim})")


def ibot_losses(student_cls: torch.Tensor, student_patch: torch.Tensor, patch_masks: torch.Tensor,
                teacher_cls: torch.Tensor, teacher_patch: torch.Tensor, center: torch.Tensor,
                center_patch: torch.Tensor, student_temp: float, teacher_temp: float, teacher_patch_temp: float,
                loss_fn: SoftmaxCEFn = softmax_ce_reference, last_layers: tuple = (None, None),
                teacher_sums: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask_index: torch.Tensor | None = None,
                patch_teacher_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The iBOT loss terms.

    student_cls: [C*B, X], every student crop (globals first); student_patch: [M, X] at the masked
        positions, in the row order of `patch_masks.nonzero()`. X is the K logits; or, with
        `last_layers` (the [CLS] and patch heads' NormedLinear), the heads' bottleneck features,
        and `loss_fn` is then a fused linear loss run inside the layer (`NormedLinear.forward`).
    patch_masks: [G, B, N] bool.
    teacher_cls: [G*B, K]; teacher_patch: [G*B*N, K'], every patch (the loss reads the masked ones).
    center: [K]; center_patch: [K'].
    teacher_sums: ([K], [K']) fp32 that get the column sums of teacher_cls and teacher_patch, the
        center statistics, out of the loss pass itself.
    mask_index: `patch_masks.flatten().nonzero()[:, 0]` where the caller has it already (found on the
        host from the loader's masks: a `nonzero` on the GPU makes the host wait for it).
    patch_teacher_rows: the row of `teacher_patch` each masked patch reads (default: `mask_index`, the
        teacher's every patch; DINOv2's teacher targets hold the masked patches only: arange(M)).
    """
    G, B, N = patch_masks.shape
    cls_sum, patch_sum = teacher_sums or (None, None)

    def ce(layer, x, teacher, teacher_rows, c, total, temp):
        args = (teacher, c, student_temp, temp, teacher_rows, total)
        return loss_fn(x, *args) if layer is None else layer(x, lambda h, w: loss_fn(h, w, *args))

    # [CLS]: every student crop v against every teacher view q != v. The pairs go in two calls, the
    # first holding one pair per teacher view, so the column sums count each teacher row once.
    pairs = [(v, q) for q in range(G) for v in range(student_cls.shape[0] // B) if v != q]
    first = [next(p for p in pairs if p[1] == q) for q in range(G)]
    arange = torch.arange(B, device=student_cls.device)
    cls_total = 0.0
    for group, total in ((first, cls_sum), ([p for p in pairs if p not in first], None)):
        if group:
            s_rows = torch.cat([v * B + arange for v, _ in group])
            t_rows = torch.cat([q * B + arange for _, q in group])
            cls_total = cls_total + ce(last_layers[0], student_cls[s_rows], teacher_cls, t_rows, center, total,
                                       teacher_temp).sum()
    # MIM: per image over its masked patches, then over images (unmasked images count 0) and views.
    t_rows = patch_masks.flatten().nonzero().squeeze(1) if mask_index is None else mask_index
    per_patch = ce(last_layers[1], student_patch, teacher_patch, t_rows if patch_teacher_rows is None
                   else patch_teacher_rows, center_patch, patch_sum, teacher_patch_temp)
    per_image = torch.zeros(G * B, device=per_patch.device, dtype=per_patch.dtype).index_add_(0, t_rows // N, per_patch)
    mim = (per_image / patch_masks.flatten(0, 1).sum(dim=1).clamp(min=1)).mean()
    return {"cls": cls_total / (len(pairs) * B), "mim": mim}


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """A differentiable all-reduce (sum) over the data-parallel ranks; identity on one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(x)
    return x


@register("ibot")
class IBOT(Method):
    """Student and EMA teacher (backbone + iBOT head each) on one module tree."""

    config_section = ("ibot", IBOTConfig)
    logged_schedules = ("teacher_temp", "teacher_patch_temp")
    lr_factors = {"last_layer": "last_layer_lr_factor"}  # the prototypes, frozen for the first steps
    uses_mask_token = True
    fp32_buffers = ("center", "center_patch")  # averages: fp32 whatever the engine's precision

    def __init__(self, student: VisionTransformer, student_head: IBOTHead, teacher: VisionTransformer,
                 teacher_head: IBOTHead, out_dim: int, patch_out_dim: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, loss_weights: dict[str, float] | None = None,
                 loss_fn: SoftmaxCEFn = fused_linear_softmax_ce_reference, pack_crops: bool = False):
        super().__init__()
        self.student = nn.ModuleDict({"backbone": student, "head": student_head})
        self.teacher = nn.ModuleDict({"backbone": teacher, "head": teacher_head})
        self.teacher.requires_grad_(False)
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.loss_weights = loss_weights or {"cls": 1.0, "mim": 1.0}
        self.loss_fn, self.pack_crops = loss_fn, pack_crops
        self.register_buffer("center", torch.zeros(out_dim))
        self.register_buffer("center_patch", torch.zeros(patch_out_dim))
        self.train()

    @classmethod
    def networks(cls, cfg) -> dict:
        """Constructor arguments shared with subclasses: both backbones, both heads, loss settings."""
        i = cfg.ibot

        patch = "shared" if i.shared_head else "separate" if i.separate_patch_mlp else "last_layer"
        teacher_patch = "shared" if i.shared_head_teacher else patch
        patch_out_dim = i.patch_out_dim or i.out_dim

        def head(width: int, patch: str) -> IBOTHead:
            return IBOTHead(width, i.out_dim, patch_out_dim, patch=patch, hidden_dim=i.head_hidden_dim,
                            bottleneck_dim=i.head_bottleneck_dim, norm_last_layer=i.norm_last_layer,
                            prototype_init=i.prototype_init, norm=i.head_norm, all_reduce=sum_over_ranks)

        student, teacher, impl = build_student(cfg), build_student(cfg, drop_path=0.0), kernels(cfg)
        return {"student": student, "student_head": head(student.embed_dim, patch), "teacher": teacher,
                "teacher_head": head(teacher.embed_dim, teacher_patch), "out_dim": i.out_dim,
                # the patch center has the size of the teacher's patch outputs
                "patch_out_dim": i.out_dim if teacher_patch == "shared" else patch_out_dim,
                "student_temp": i.student_temp, "center_momentum": i.center_momentum,
                "loss_weights": {"cls": i.cls_weight, "mim": i.mim_weight},
                "loss_fn": get_softmax_ce(impl, fused_linear=True),
                # one packed pass for all crops where a varlen kernel makes it pay
                "pack_crops": impl == "triton"}

    @classmethod
    def loss_classes(cls, cfg) -> dict[str, tuple[int, ...]]:
        """The softmax-CE widths the kernels' self-check runs at: the [CLS] and patch prototypes."""
        return {"softmax_ce": tuple(dict.fromkeys((cfg.ibot.out_dim, cfg.ibot.patch_out_dim or cfg.ibot.out_dim)))}

    @classmethod
    def from_config(cls, cfg) -> IBOT:
        return cls(**cls.networks(cfg))

    @classmethod
    def ema_momentum(cls, cfg) -> tuple[float, float]:
        return tuple(cfg.ibot.ema_momentum)

    @classmethod
    def schedules(cls, cfg):
        """iBOT's two teacher temperatures ([CLS], patches), warmed up over the same steps, and the
        prototypes' learning rate held at 0 for the first freeze_last_layer_steps."""
        i = cfg.ibot

        def at(step: int) -> dict[str, float]:
            return {"teacher_temp": linear_warmup(step, i.teacher_temp_warmup_steps, *i.teacher_temp),
                    "teacher_patch_temp": linear_warmup(step, i.teacher_temp_warmup_steps, *i.teacher_patch_temp),
                    "last_layer_lr_factor": 0.0 if step < i.freeze_last_layer_steps else 1.0}

        return at

    @classmethod
    def validate(cls, cfg) -> None:
        require(cfg.data.global_crops.number == 2, "data.global_crops.number",
                f"{cfg.data.global_crops.number}: {cfg.method} needs exactly 2 global crops")

    def plan_calls(self, cfg, s, dt) -> list:
        G, L, b = s.global_n, s.local_n, s.b
        masks = torch.zeros(G * b, s.grid, s.grid, dtype=torch.bool, device="meta")
        M = G * b * s.masked_per_view

        def teacher():  # its features and its logits both stay alive until the loss (ibot_step)
            t = self.teacher.backbone.forward_features(meta_images(G * b, s.global_size, dt))
            return t, self.teacher.head(t["cls"], t["patch"])

        calls = [("EMA teacher (backbone + head)", teacher, False, self.teacher)]
        clip = getattr(self, "clip_teacher", None)
        if clip is not None:
            def clip_pass():
                images = meta_images(G * b, s.global_size, dt)
                return clip(images, (s.grid, s.grid), cfg.data.augment.mean, cfg.data.augment.std, [self.clip_block])
            calls.append(("frozen CLIP teacher", clip_pass, False, clip))
        bb, head = self.student.backbone, self.student.head

        def student():
            outs = [bb.forward_features(meta_images(G * b, s.global_size, dt), masks)]
            if L:
                outs.append(bb.forward_features(meta_images(L * b, s.local_size, dt)))
            (cls_mlp, _), (patch_mlp, _) = head.cls_path(), head.patch_path()
            masked_tokens = outs[0]["patch"].flatten(0, 1)[:M]  # (a view: as many rows as the masks select)
            if head.batch_norm:
                h = [head.bottlenecks(o["cls"], o["patch"]) for o in outs]
            else:
                h = [cls_mlp(torch.cat([o["cls"] for o in outs])), patch_mlp(masked_tokens)]
            if clip is not None:
                h.append(self.clip_head(masked_tokens))
            return h

        calls.append(("student (backbone + head MLP)", student, True, self.student))
        return calls

    def loss_logits(self, cfg, s) -> list[tuple[int, int, int, bool]]:
        """The student's prototype scores: each student crop against each other teacher view ([CLS]),
        and the masked patches."""
        head = self.student.head
        (_, cls_protos), (_, patch_protos) = head.cls_path(), head.patch_path()
        pairs = s.global_n * (s.global_n + s.local_n - 1)
        return [(pairs * s.b, cls_protos.weight.shape[1], cls_protos.weight.shape[0], True),
                (s.global_n * s.b * s.masked_per_view, patch_protos.weight.shape[1], patch_protos.weight.shape[0],
                 True)]

    def eval_features(self, images: torch.Tensor) -> torch.Tensor:
        """What kNN measures: the EMA teacher's [CLS] features. (Module calls, not forward_features:
        ZeRO-3 gathers a module's own parameters in its forward hooks.)"""
        return self.teacher.backbone(images)

    def student_eval_features(self, images: torch.Tensor) -> torch.Tensor:
        """The student's [CLS] features, measured beside the teacher's."""
        return self.student.backbone(images)

    def train(self, mode: bool = True) -> IBOT:
        super().train(mode)
        self.teacher.eval()  # always: a no_grad module in train mode upsets ZeRO-3 (DeepSpeed #4922)
        return self

    def forward(self, batch: dict[str, torch.Tensor], values: dict[str, float]) -> dict[str, torch.Tensor]:
        """batch: normalised `global_crops` [G, B, 3, H, W], `local_crops` [L, B, 3, h, w], `masks` [G, B, h', w'];
        values: this step's schedule (teacher_temp, teacher_patch_temp)."""
        return self.ibot_step(batch, values)[0]

    def ibot_step(self, batch: dict[str, torch.Tensor], values: dict[str, float]
                  ) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """-> (iBOT loss terms, the student's final tokens at the masked positions [M, C], its [CLS]
        tokens of the global crops [G*B, C], before the head)."""
        g, loc = batch["global_crops"], batch["local_crops"]
        masks = batch["masks"].flatten(2)  # [G, B, N]
        flat_masks = masks.flatten(0, 1)  # [G*B, N]
        # the masked positions, row-major: from the batch (found on the host, see data/transforms.py)
        index = batch.get("mask_index")
        if index is None:
            index = flat_masks.flatten().nonzero().squeeze(1)

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
        head = self.student.head
        (cls_mlp, cls_protos), (patch_mlp, patch_protos) = head.cls_path(), head.patch_path()
        # The heads' last layers run inside the loss (fused where the kernels are on).
        masked_tokens = s["patch"].flatten(0, 1).index_select(0, index)  # (not [flat_masks]: a host sync)
        if head.batch_norm:  # statistics per forward, grouped as iBOT's: global crops, then local crops
            h_cls, h_patch = head.bottlenecks(s["cls"], s["patch"])
            h_cls = torch.cat([h_cls] + [head.bottlenecks(o["cls"], o["patch"])[0] for o in outs[1:]])
            h_patch = h_patch.flatten(0, 1).index_select(0, index)
        else:  # rows are independent: the patch MLP sees the masked tokens only, the rest never enters the loss
            h_cls, h_patch = cls_mlp(torch.cat([o["cls"] for o in outs])), patch_mlp(masked_tokens)
        losses = self.distill(h_cls, h_patch, masks, index, t_cls, t_patch, values, (cls_protos, patch_protos))
        return losses, masked_tokens, s["cls"]

    def distill(self, h_cls: torch.Tensor, h_patch: torch.Tensor, masks: torch.Tensor, index: torch.Tensor,
                t_cls: torch.Tensor, t_patch: torch.Tensor, values: dict[str, float], protos: tuple) -> dict:
        """The two distillation terms from the student's bottleneck features and the teacher's logits
        (`ibot_losses`), then the centers' update."""
        sums = (self.center.new_zeros(self.center.shape, dtype=torch.float32),
                self.center_patch.new_zeros(self.center_patch.shape, dtype=torch.float32))
        losses = ibot_losses(
            h_cls, h_patch, masks, t_cls, t_patch.flatten(0, 1), self.center, self.center_patch, self.student_temp,
            values["teacher_temp"], values["teacher_patch_temp"], self.loss_fn, protos, sums, index)
        self.update_centers(sums[0] / t_cls.shape[0], sums[1] / (t_patch.shape[0] * t_patch.shape[1]))
        return losses

    @torch.no_grad()
    def update_centers(self, cls_mean: torch.Tensor, patch_mean: torch.Tensor) -> None:
        """EMA of the teacher outputs' batch means (this rank's, averaged over ranks here)."""
        means = torch.cat([cls_mean, patch_mean])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(means)
            means /= dist.get_world_size()
        m = self.center_momentum
        K = self.center.numel()
        self.center.mul_(m).add_(means[:K], alpha=1 - m)
        self.center_patch.mul_(m).add_(means[K:], alpha=1 - m)
