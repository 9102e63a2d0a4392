"""iTPN: a HiViT and its feature pyramid pretrained together (seed 004), after sunsmarterjie/iTPN.

The student encodes only the visible patches of each image (int(N * (1 - r)), r = 0.75, uniformly
random; HiViT drops the masked patches' inner tokens before its first stage) and the pyramid
(models/pyramid.py) turns the three stages into levels at strides 16, 8 and 4, still on the
visible patches only. Two objectives read the pyramid:

    pixel: a light decoder (models/decoders.py, MAE's: [MASK] tokens at the dropped patches, sin-cos
           positions, transformer blocks) sums the three levels and predicts each patch's pixels;
           the loss is the MSE to the per-patch normalised pixels (MAE's norm_pix_loss), averaged
           over the masked patches only (itpn_pixel: forward_loss).
    mfm:   masked feature modelling. A teacher sees the whole image; each pyramid level has its own
           decoder (same design) that predicts the teacher's features at that level, normalised
           by a LayerNorm without affine, scored by smooth-L1 (or cosine) at every patch (itpn_clip:
           "we supervise all tokens as default") or the masked ones. Teachers: the moving-averaged
           backbone (`teacher`, an fp32 shard-local EMA by trainer/ema.py, as iBOT's), whose stage
           at the level's stride is the target (stride 4: the 4 x 4 inner tokens of a patch
           concatenated); or the frozen CLIP teacher (`clip_teacher`), one of its blocks per level.

`forward` returns the unweighted terms (`pixel`, `mfm16`, `mfm8`, `mfm4`) and, beside each kind,
what predicting zeros scores (`pixel_zero`, `mfm_zero`): a loss near it has learned nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data.masking import dropped_mask, random_visible, step_generator, visible_count
from models.decoders import MaskedDecoder
from models.hivit import HiViT, build_hivit
from models.kernels import get_attention
from models.pyramid import FeaturePyramid
from trainer.config.checks import check_frozen_teacher, check_single_view
from trainer.config.fields import at_least, check_range, opt, require

from .base import ExportSpec, Method, meta_images, register
from .build import build_frozen_teacher, kernels

ITPN = "sunsmarterjie/iTPN"


@dataclass
class ITPNConfig:
    """Defaults are the reference's pixel recipe (itpn_pixel: itpn_base_dec512d8b, --mask_ratio 0.75)
    unless the help says otherwise; model.arch must be a HiViT (hivit_base, hivit_large, ...)."""

    teacher: Literal["ema", "clip", "none"] = opt(
        "none", f"Target of masked feature modelling: none = pixels only ({ITPN} itpn_pixel), ema = the moving-"
                f"averaged backbone (the paper's MFM; its code is not public), clip = the frozen teacher.clip.* "
                f"({ITPN} itpn_clip; teacher.clip.blocks: one per pyramid level, empty: the last block for each).")
    mask_ratio: float = opt(0.75, "Fraction of patches dropped before the first stage; int(N * (1 - r)) are "
                                  f"encoded, uniformly random per image ({ITPN} itpn_pixel --mask_ratio 0.75).")
    pos_embed: Literal["sincos", "learned"] = opt(
        "sincos", "Absolute position embeddings: learned from MAE's 2-D sin-cos table (itpn_pixel), or learned from "
                  "trunc-normal 0.02 (itpn_clip, which adds a relative bias not built here).")
    layer_scale: float = opt(0.0, f"LayerScale init of the backbone's blocks (MLP and attention); 0: off (itpn_pixel; "
                                  f"{ITPN} itpn_clip --layer_scale_init_value 0.1).")
    fpn_dim: int = opt(256, "Width F of the pyramid levels.")
    fpn_depth: int = opt(2, f"MLP fusion blocks per top-down step (itpn_pixel: 2; {ITPN} itpn_clip: 1).")
    decoder_dim: int = opt(512, "Width of the pixel decoder (dec512d8b).")
    decoder_depth: int = opt(8, "Transformer blocks of the pixel decoder (dec512d8b).")
    decoder_heads: int = opt(16, "Attention heads of the pixel decoder (decoder_num_heads 16).")
    norm_pix_loss: bool = opt(True, "Pixel targets normalised per patch by its mean and std (MAE's norm_pix_loss, "
                                    "on in itpn_pixel).")
    pixel_weight: float = opt(1.0, f"Weight of the pixel term (the MSE over masked patches); 0 turns the pixel "
                                   f"decoder off ({ITPN} itpn_clip trains without it).")
    mfm_dim: int = opt(256, "Width of each level's feature decoder. No reference exists for decoding dropped "
                            "patches' features (itpn_clip keeps [MASK] tokens in the backbone instead): ours.")
    mfm_depth: int = opt(2, "Transformer blocks of each level's feature decoder (ours, see mfm_dim).")
    mfm_heads: int = opt(8, "Attention heads of each level's feature decoder.")
    mfm_weights: tuple[float, float, float] = opt(
        (1.0, 1.0, 1.0), "Weights of the feature terms of the pyramid levels at strides 16, 8 and 4 (0 leaves a level "
                         f"out). {ITPN} itpn_clip: one CLIP target for the fused levels, weight 1.")
    mfm_loss: Literal["smooth_l1", "cosine"] = opt(
        "smooth_l1", f"Distance to the LayerNorm'ed teacher features ({ITPN} itpn_clip: nn.SmoothL1Loss()).")
    mfm_positions: Literal["all", "masked"] = opt(
        "all", f"Patches whose features are reconstructed: every patch ({ITPN} itpn_clip: 'we supervise all tokens as "
               "default') or the masked ones only.")
    ema_momentum: tuple[float, float] = opt((0.996, 1.0), "teacher ema: momentum, start and end of a cosine (as "
                                                          "iBOT's).")

    def validate(self) -> None:
        require(0.0 < self.mask_ratio < 1.0, "mask_ratio", f"{self.mask_ratio} is outside (0, 1)")
        at_least(self, 1, "fpn_dim", "fpn_depth", "decoder_dim", "decoder_depth", "decoder_heads", "mfm_dim",
                  "mfm_depth", "mfm_heads")
        for name in ("decoder", "mfm"):
            dim, heads = getattr(self, f"{name}_dim"), getattr(self, f"{name}_heads")
            require(dim % 16 == 0 and dim % heads == 0, f"{name}_dim",
                     f"{dim} must be divisible by 16 (the stride-4 level's 16 inner tokens) and by {heads} heads")
        at_least(self, 0, "layer_scale", "pixel_weight")
        require(all(w >= 0 for w in self.mfm_weights), "mfm_weights", "must be >= 0")
        check_range(self.ema_momentum, "ema_momentum", 0.0, 1.0)
        require(self.pixel_weight > 0 or (self.teacher != "none" and any(self.mfm_weights)), "pixel_weight",
                 "0 with no feature term (teacher none or every mfm_weights 0) leaves nothing to train")

log = logging.getLogger(__name__)

LEVELS = (16, 8, 4)  # the pyramid's strides, in its output order
INNER = {16: 1, 8: 2, 4: 4}  # inner tokens per patch side at each stride


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, N, p * p * 3], row-major patches, (row, column, channel) inside (MAE's)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int]) -> torch.Tensor:
    B = x.shape[0]
    x = x.reshape(B, grid[0], grid[1], p, p, 3)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, 3, grid[0] * p, grid[1] * p)


def pixel_targets(images: torch.Tensor, p: int, norm_pix: bool = True) -> torch.Tensor:
    target = patchify(images.float(), p)
    if norm_pix:  # MAE: unbiased variance, eps 1e-6
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    return target


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE. pred, target: [B, N, D]; masked: [B, N] bool."""
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    return (per_patch * masked).sum() / masked.sum().clamp(min=1)


def feature_target(x: torch.Tensor) -> torch.Tensor:
    """A teacher's stage [B, N, (k, k,) C] -> [B, N, k * k * C], each token LayerNorm'ed (no affine)."""
    x = F.layer_norm(x.float(), (x.shape[-1],))
    return x.flatten(2) if x.dim() > 3 else x


def feature_loss(pred: torch.Tensor, target: torch.Tensor, where: torch.Tensor | None, kind: str) -> torch.Tensor:
    """pred, target: [B, N, D]; where: [B, N] bool (None: every patch)."""
    pred = pred.float()
    # the mean over the `where` tokens as a weighted mean, not pred[where]: boolean-mask indexing (and
    # its backward) makes the host wait for the GPU; the same value, the same gradients
    if kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(pred, target, dim=-1)
        if where is None:
            return per_token.mean()
        return torch.where(where, per_token, 0.0).sum() / where.sum().clamp(min=1)
    per_element = F.smooth_l1_loss(pred, target, reduction="none")
    if where is None:
        return per_element.mean()
    return torch.where(where.unsqueeze(-1), per_element, 0.0).sum() / (where.sum() * pred.shape[-1]).clamp(min=1)


@register("itpn")
class ITPN(Method):
    config_section = ("itpn", ITPNConfig)
    family = "hivit"
    export_parts = ("backbone", "pyramid")  # the exported network is HiViT with its feature pyramid
    teacher_not_exported = ("iTPN's pyramid is trained with the student only (its EMA teacher is a backbone "
                            "without one)")
    knn_pool, knn_features = "avg", "student mean patch token"

    def __init__(self, backbone: HiViT, pyramid: FeaturePyramid, pixel_decoder: MaskedDecoder | None,
                 mfm_decoders: dict[str, MaskedDecoder], teacher: HiViT | None = None, clip_teacher=None,
                 clip_blocks: tuple[int, int, int] = (-1, -1, -1), mask_ratio: float = 0.75, norm_pix: bool = True,
                 mfm_loss: str = "smooth_l1", mfm_positions: str = "all", loss_weights: dict[str, float] | None = None,
                 input_mean=(0.485, 0.456, 0.406), input_std=(0.229, 0.224, 0.225), seed: int = 0):
        super().__init__()
        parts = {"backbone": backbone, "pyramid": pyramid}
        if pixel_decoder is not None:
            parts["pixel_decoder"] = pixel_decoder
        if mfm_decoders:
            parts["mfm_decoders"] = nn.ModuleDict(mfm_decoders)
        self.student = nn.ModuleDict(parts)
        if teacher is not None:  # the EMA pairs its parameters with student.backbone's by name
            self.teacher = nn.ModuleDict({"backbone": teacher})
            self.teacher.requires_grad_(False)
        if clip_teacher is not None:
            self.clip_teacher = clip_teacher
        self.clip_blocks = tuple(clip_blocks)
        self.mask_ratio, self.norm_pix, self.seed = mask_ratio, norm_pix, seed
        self.mfm_loss, self.mfm_positions = mfm_loss, mfm_positions
        self.loss_weights = loss_weights or {"pixel": 1.0}
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)
        self.train()

    @classmethod
    def from_config(cls, cfg) -> ITPN:
        c, m = cfg.itpn, cfg.model
        attn = get_attention(kernels(cfg))
        size = cfg.data.global_crops.size

        def hivit(drop_path: float) -> HiViT:
            return build_hivit(m.arch, img_size=size, patch_size=m.patch_size, drop_path_rate=drop_path,
                               layer_scale=c.layer_scale or None, pos_embed=c.pos_embed, attn_fn=attn)

        backbone = hivit(m.drop_path)
        grid = backbone.grid
        pyramid = FeaturePyramid(backbone.dims, c.fpn_dim, c.fpn_depth)
        pixel = None
        if c.pixel_weight > 0:
            pixel = MaskedDecoder(c.fpn_dim, [1, 2, 4], c.decoder_dim, c.decoder_depth, c.decoder_heads,
                                  m.patch_size ** 2 * 3, grid, attn_fn=attn)
        teacher = hivit(0.0) if c.teacher == "ema" else None
        clip = build_frozen_teacher(cfg) if c.teacher == "clip" else None
        blocks = tuple(cfg.teacher.clip.blocks or (-1, -1, -1))
        mfm, weights = {}, {"pixel": c.pixel_weight} if pixel is not None else {}
        if c.teacher != "none":
            for stride, w in zip(LEVELS, c.mfm_weights):
                if w == 0:
                    continue
                k = INNER[stride]
                out = clip.width if clip is not None else backbone.dims[LEVELS[::-1].index(stride)] * k * k
                mfm[f"mfm{stride}"] = MaskedDecoder(c.fpn_dim, [k], c.mfm_dim, c.mfm_depth, c.mfm_heads, out, grid,
                                                    attn_fn=attn)
                weights[f"mfm{stride}"] = w
        return cls(backbone, pyramid, pixel, mfm, teacher, clip, blocks, c.mask_ratio, c.norm_pix_loss, c.mfm_loss,
                   c.mfm_positions, weights, cfg.data.augment.mean, cfg.data.augment.std, cfg.run.seed)

    @classmethod
    def validate(cls, cfg) -> None:
        check_single_view(cfg)
        p = cfg.model.patch_size
        require(p % 4 == 0, "model.patch_size", f"{p}: HiViT splits a patch into 4 x 4 inner tokens")
        if cfg.itpn.teacher == "clip":
            require(len(cfg.teacher.clip.blocks) in (0, 3), "teacher.clip.blocks",
                    f"{cfg.teacher.clip.blocks}: itpn needs one teacher block per pyramid level (strides 16, 8, 4), "
                    "or none (the last block for all three)")
            check_frozen_teacher(cfg, repeats=True)  # levels may share a block (by default all use the last)

    @classmethod
    def frozen_files(cls, cfg) -> dict[str, str]:
        return {"clip_teacher": cfg.teacher.clip.weights} if cfg.itpn.teacher == "clip" else {}

    @classmethod
    def export_spec(cls, cfg) -> ExportSpec:
        """HiViT with its pyramid: transformers has no class for it, so the file carries the record that
        rebuilds it (models.pyramid.build_itpn)."""
        c = cfg.itpn
        arch = {"arch": cfg.model.arch, "image_size": cfg.data.global_crops.size, "patch_size": cfg.model.patch_size,
                "layer_scale": c.layer_scale or None, "pos_embed": c.pos_embed, "fpn_dim": c.fpn_dim,
                "fpn_depth": c.fpn_depth}
        return ExportSpec(format="itpn", arch=arch,
                          about=f"backbone and pyramid pretrained together, teacher {c.teacher}")

    @classmethod
    def ema_momentum(cls, cfg) -> tuple[float, float] | None:
        return tuple(cfg.itpn.ema_momentum) if cfg.itpn.teacher == "ema" else None

    def plan_calls(self, cfg, s, dt) -> list:
        b, n = s.b, s.patches
        keep = torch.zeros(b, visible_count(n, self.mask_ratio), dtype=torch.long, device="meta")
        images = meta_images(b, s.global_size, dt)
        calls = []
        teacher = getattr(self, "teacher", None) or getattr(self, "clip_teacher", None)
        if teacher is not None:
            calls.append(("teacher targets", lambda: self.teacher_targets(images, (s.grid, s.grid)), False, teacher))
        calls.append(("student + pyramid + decoders", lambda: self.predict(images, keep), True, self.student))
        return calls

    def eval_features(self, images: torch.Tensor) -> torch.Tensor:
        """What kNN measures: the student's mean stride-16 token (no [CLS])."""
        return self.student.backbone(images)

    def train(self, mode: bool = True) -> ITPN:
        super().train(mode)
        for name in ("teacher", "clip_teacher"):  # always eval: a no_grad module in train mode upsets ZeRO-3
            if hasattr(self, name):
                getattr(self, name).eval()
        return self

    def visible(self, batch: int, num_patches: int, micro_step: int, device: torch.device) -> torch.Tensor:
        keep = visible_count(num_patches, self.mask_ratio)
        return random_visible(batch, num_patches, keep, step_generator(self.seed, micro_step), device)

    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        """{mfm<stride>: [B, N, D]} for the levels that have a decoder, from the whole image."""
        wanted = list(self.student.mfm_decoders) if "mfm_decoders" in self.student else []
        if not wanted:
            return {}
        if hasattr(self, "teacher"):
            stages = self.teacher.backbone(images, pool=False)["stages"]  # strides 4, 8, 16
            by_stride = dict(zip(LEVELS[::-1], stages))
            return {name: feature_target(by_stride[int(name[3:])]) for name in wanted}
        blocks = [self.clip_blocks[LEVELS.index(int(name[3:]))] for name in wanted]
        t = self.clip_teacher(images, grid, self.input_mean, self.input_std, sorted(set(blocks)))
        out = dict(zip(sorted(set(blocks)), t["blocks"]))
        return {name: feature_target(out[b]) for name, b in zip(wanted, blocks)}

    def predict(self, images: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student's predictions at every patch: {pixel: [B, N, p*p*3], mfm<s>: [B, N, D]}."""
        s = self.student
        levels = s.pyramid(s.backbone(images, keep, pool=False)["stages"])  # strides 16, 8, 4
        out = {}
        if "pixel_decoder" in s:
            out["pixel"] = s.pixel_decoder(levels, keep)
        for name, decoder in (s.mfm_decoders.items() if "mfm_decoders" in s else ()):
            out[name] = decoder([levels[LEVELS.index(int(name[3:]))]], keep)
        return out

    def forward(self, batch: dict[str, torch.Tensor], values: dict[str, float]) -> dict[str, torch.Tensor]:
        """batch: `global_crops` [1, B, 3, H, W] normalised."""
        images = batch["global_crops"][0]
        p = self.student.backbone.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        N = grid[0] * grid[1]
        keep = self.visible(images.shape[0], N, int(values["micro_step"]), images.device)
        masked = dropped_mask(keep, N)
        targets = self.teacher_targets(images, grid)
        preds = self.predict(images, keep)
        losses = {}
        if "pixel" in preds:
            target = pixel_targets(images, p, self.norm_pix)
            losses["pixel"] = pixel_loss(preds["pixel"], target, masked)
            losses["pixel_zero"] = pixel_loss(torch.zeros_like(target), target, masked).detach()
        where = masked if self.mfm_positions == "masked" else None
        zeros = []
        for name, target in targets.items():
            losses[name] = feature_loss(preds[name], target, where, self.mfm_loss)
            # (cosine: zeros have no direction; any constant vector is orthogonal to a LayerNorm'ed target)
            zeros.append(feature_loss(torch.full_like(target, float(self.mfm_loss == "cosine")), target, where,
                                      self.mfm_loss).detach())
        if zeros:
            losses["mfm_zero"] = torch.stack(zeros).mean()
        return losses

    @classmethod
    def summary_lines(cls, cfg, summary: dict, run_dir: Path) -> list[str]:
        lines = super().summary_lines(cfg, summary, run_dir)
        if summary.get("heldout_pixel") is not None:  # its pixel decoder
            lines.append(f"held-out pixel loss on masked patches {summary['heldout_pixel']:.3f} (untrained: "
                         f"{summary['heldout_pixel_random_init']:.3f}; predicting zeros: "
                         f"{summary['heldout_pixel_zero']:.3f}); reconstructions: {run_dir / 'reconstructions.png'}")
        return lines

    @torch.no_grad()
    def held_out_metrics(self, batches, run_dir: Path, step: int, size: int) -> dict[str, float]:
        """The pixel loss on the first held-out batch of each rank (fixed masks), beside predicting
        zeros, and `reconstructions.png` (rank 0): originals, the masked inputs, the reconstructions
        (visible patches pasted back). One forward per rank: under ZeRO-3 each one is collective."""
        if "pixel_decoder" not in self.student:
            return {}
        device = self.student.pyramid.split_16to8.reduction.weight.device
        images = next(batches, None)
        real = images is not None
        if not real:
            images = torch.zeros(1, 3, size, size, dtype=torch.uint8)
        mean = torch.tensor(self.input_mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.input_std, device=device).view(1, 3, 1, 1)
        x = (images.to(device).float() / 255 - mean) / std
        p = self.student.backbone.patch_size
        grid = (size // p, size // p)
        N = grid[0] * grid[1]
        keep = random_visible(x.shape[0], N, visible_count(N, self.mask_ratio), torch.Generator().manual_seed(0),
                              device)
        masked = dropped_mask(keep, N)
        dtype = self.student.pyramid.split_16to8.reduction.weight.dtype
        pred = self.predict(x.to(dtype), keep)["pixel"].float()
        target = pixel_targets(x, p, self.norm_pix)
        n_masked = float(masked.sum()) * real  # sums over masked patches, so every rank's patch counts once
        totals = torch.tensor([pixel_loss(pred, target, masked).item() * n_masked,
                               pixel_loss(torch.zeros_like(target), target, masked).item() * n_masked, n_masked],
                              device=device, dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(totals)
        n = max(totals[2].item(), 1.0)
        out = {"heldout_pixel": totals[0].item() / n, "heldout_pixel_zero": totals[1].item() / n}
        if real and (not dist.is_initialized() or dist.get_rank() == 0):
            log.info("step %d: held-out pixel loss %.3f on masked patches (predicting zeros: %.3f)", step,
                     out["heldout_pixel"], out["heldout_pixel_zero"])
            self._draw(x[:8], pred[:8], masked[:8], p, grid, mean, std, Path(run_dir) / "reconstructions.png", step,
                       out["heldout_pixel"])
        return out

    def _draw(self, x, pred, masked, p, grid, mean, std, path: Path, step: int, loss: float) -> None:
        from evaluation.pictures import image_rows_figure

        patches = patchify(x, p)
        if self.norm_pix:  # back to pixels with each patch's own statistics, as MAE's visualisation
            mu, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mu
        m = masked.unsqueeze(-1)
        shown = [unpatchify(t, p, grid) * std + mean for t in
                 (patches, patches.masked_fill(m, float("nan")), torch.where(m, pred, patches))]
        image_rows_figure([t.clamp(0, 1).nan_to_num(0.5).cpu() for t in shown],
                          f"held-out images, masked inputs (grey: dropped), iTPN reconstructions; step {step}, "
                          f"pixel loss {loss:.3f}", path)
