"""BEiT: masked visual-token prediction (seed 002), as microsoft/unilm beit/ runs it.

One random-resized crop per image is seen twice: by the student at its resolution (224) with
about 40% of its patches, in blocks, replaced by the learned [MASK] embedding, and by the frozen
tokenizer (a dVAE encoder, models/dvae.py) at half that resolution (112), so its grid of visual
tokens (14 x 14) is the student's patch grid. A linear head over the vocabulary classifies the
student's final token at each masked position; the loss is the cross-entropy against the
tokenizer's argmax token there, averaged over all masked positions of the batch (the reference's
nn.CrossEntropyLoss on `x[bool_masked_pos]`). Unmasked positions never enter the loss.

The tokenizer is a frozen submodule like a CLIP teacher: partitioned by ZeRO-3 with the rest,
kept in eval mode, run under no_grad, left out of checkpoints (its file's sha256 is kept and
checked on resume). It runs in the engine's precision (the reference: DALL-E's own convs in
fp16 on a GPU, its output layer in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from models.dvae import DVAEArch, FrozenTokenizer, TokenizerWeightsError, downsampling, read_encoder_arch
from models.kernels import get_hard_ce
from models.kernels.softmax_ce import hard_ce_reference
from models.vit import VisionTransformer, beit_normal_
from trainer.config.checks import check_single_view
from trainer.config.fields import Invalid, at_least, checking_files, opt, require

from .base import ExportSpec, Method, meta_images, register
from .build import build_student, kernels

BEIT = "microsoft/unilm beit/"


@dataclass
class BEiTConfig:
    """Defaults are run_beit_pretraining.py's (microsoft/unilm beit/) unless the help says otherwise."""

    tokenizer: str | None = opt(None, "The frozen tokenizer: a dVAE encoder exported by scripts/export_tokenizer.py "
                                      "(.safetensors, architecture in its metadata), or a state dict in OpenAI "
                                      "DALL-E's Encoder layout (blocks.*.w/b; .pt/.bin/.safetensors). Never "
                                      "downloaded; pickled modules (DALL-E's encoder.pkl) are refused: convert them.")
    vocab_size: int = opt(8192, "Visual tokens the tokenizer's codebook has (the head's classes); the tokenizer "
                                "file must agree.")
    layer_scale: float = opt(0.1, f"LayerScale init of every block ({BEIT} --layer_scale_init_value: 0.1 for base, "
                                  "1e-5 for large); 0: off. Replaces model.layer_scale for this method.")
    rel_pos_bias: Literal["shared", "per_block", "none"] = opt(
        "shared", f"Relative position bias: one table shared by all blocks ({BEIT} --rel_pos_bias, default), one per "
                  "block, or none.")
    abs_pos_embed: bool = opt(False, f"Absolute (learned) position embeddings too ({BEIT} --abs_pos_emb, default "
                                     "false).")
    qkv_bias: Literal["qv", "qkv", "none"] = opt(
        "qv", f"Attention input biases: query and value only, no key bias ({BEIT} modeling_finetune.py Attention), "
              "all three (timm), or none.")
    init: Literal["beit", "timm"] = opt(
        "beit", f"beit: N(0, 0.02) truncated at +-0.02 and each block's output projections divided by sqrt(2 * layer) "
                f"({BEIT} modeling_pretrain.py fix_init_weight); timm: timm's ViT init.")

    def validate(self) -> None:
        at_least(self, 2, "vocab_size")
        at_least(self, 0, "layer_scale")




def beit_loss(logits: torch.Tensor, tokens: torch.Tensor, masks: torch.Tensor, loss_fn=hard_ce_reference,
              mask_index: torch.Tensor | None = None) -> dict:
    """logits: [M, V] at the masked positions, in the row order of `masks.nonzero()`; tokens: [B, N]
    the tokenizer's ids; masks: [B, N] bool. -> the mean cross-entropy ("mim", the loss) and the
    accuracy, each beside what a predictor that never looks at the image gets on the same tokens:
    the batch's own token frequencies as its prediction (their entropy, `mim_blind`) and the most
    frequent token (`accuracy_blind`). A MIM loss at `mim_blind` has learned nothing from context."""
    # (`mask_index`: masks.flatten().nonzero() found on the host; indexing by the boolean mask, or a
    # bincount, makes the host wait for the GPU)
    labels = tokens[masks] if mask_index is None else tokens.flatten().index_select(0, mask_index)
    per_token = loss_fn(logits, labels)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        counts = torch.zeros(logits.shape[-1], device=labels.device).index_add_(
            0, labels, torch.ones_like(labels, dtype=torch.float32))
        freq = counts / counts.sum().clamp(min=1)
        blind = -torch.special.xlogy(freq, freq).sum()
    return {"mim": per_token.mean(), "token_accuracy": accuracy, "mim_blind": blind, "accuracy_blind": freq.max()}


def tokenizer_arch(path: str, vocab_size: int, check: bool = False) -> DVAEArch:
    """The tokenizer file's architecture (`check`: and its tensors' shapes, as the config does); where
    the file is not there and the config is read without its files (sizing a run: trainer/plan),
    DALL-E's encoder with `vocab_size` codes."""
    if not checking_files() and not Path(path).expanduser().is_file():
        return DVAEArch(vocab_size=vocab_size)
    return read_encoder_arch(path, check=check)


@register("beit")
class BEiT(Method):
    config_section = ("beit", BEiTConfig)
    uses_mask_token = True
    knn_pool, knn_features = "avg", "student mean patch token"

    def __init__(self, student: VisionTransformer, tokenizer: FrozenTokenizer, vocab_size: int,
                 loss_fn=hard_ce_reference, init: str = "beit"):
        super().__init__()
        student.global_pool = "avg"  # kNN on the mean patch token: BEiT's [CLS] gets no objective
        head = nn.Linear(student.embed_dim, vocab_size)
        if init == "beit":  # the reference's lm_head: truncated normal 0.02, zero bias
            beit_normal_(head.weight)
            nn.init.zeros_(head.bias)
        self.student = nn.ModuleDict({"backbone": student, "head": head})
        self.tokenizer = tokenizer
        self.loss_fn = loss_fn
        self.loss_weights = {"mim": 1.0}

    @classmethod
    def loss_classes(cls, cfg) -> dict[str, tuple[int, ...]]:
        """The hard-label CE width the kernels' self-check runs at: the tokenizer's vocabulary."""
        return {"hard_ce": (cfg.beit.vocab_size,)}

    @classmethod
    def validate(cls, cfg) -> None:
        check_single_view(cfg)
        b, g = cfg.beit, cfg.data.global_crops
        require(cfg.model.layer_scale is None, "model.layer_scale", "method beit sets it with beit.layer_scale")
        require(b.tokenizer is not None, "beit.tokenizer",
                "beit needs its tokenizer: a dVAE encoder file (train one with method dvae and export it with "
                "scripts/export_tokenizer.py)")
        try:
            arch = tokenizer_arch(b.tokenizer, b.vocab_size, check=True)
        except TokenizerWeightsError as e:
            raise Invalid("beit.tokenizer", str(e)) from None
        require(arch.vocab_size == b.vocab_size, "beit.tokenizer",
                f"{b.tokenizer} has a vocabulary of {arch.vocab_size} codes, beit.vocab_size is {b.vocab_size}")
        require(g.second_size is not None, "data.global_crops.second_size",
                "beit needs the tokenizer's view of each crop (BEiT: 112 for a 224 crop)")
        side = g.size // cfg.model.patch_size
        down = downsampling(arch)
        # (sizing without the tokenizer file, its architecture is a guess: no check against it)
        require(not checking_files() or g.second_size == side * down, "data.global_crops.second_size",
                f"{g.second_size}: the tokenizer ({down}x down-sampling) must see a {side} x {side} grid like the "
                f"student's patches, so it must be {side * down}")

    @classmethod
    def export_spec(cls, cfg) -> ExportSpec:
        """BEiT's layer-scale init replaces `model.layer_scale`; its vocabulary goes into BeitConfig."""
        return ExportSpec(layer_scale_init=float(cfg.beit.layer_scale or cfg.model.layer_scale or 1.0),
                          vocab_size=cfg.beit.vocab_size)

    @classmethod
    def frozen_files(cls, cfg) -> dict[str, str]:
        return {"tokenizer": cfg.beit.tokenizer}

    def plan_calls(self, cfg, s, dt) -> list:
        b = s.b
        second = cfg.data.global_crops.second_size or s.global_size
        masks = torch.zeros(b, s.grid, s.grid, dtype=torch.bool, device="meta")
        M = b * s.masked_per_view

        def student():
            out = self.student.backbone.forward_features(meta_images(b, s.global_size, dt), masks)
            return self.student.head(out["patch"].flatten(0, 1)[:M])

        return [("frozen tokenizer", lambda: self.tokenizer(torch.empty(b, 3, second, second, device="meta")), False,
                 self.tokenizer), ("student + head", student, True, self.student)]

    def loss_logits(self, cfg, s) -> list[tuple[int, int, int, bool]]:
        """The masked patches' scores over the vocabulary, against hard labels."""
        head = self.student.head.weight
        return [(s.b * s.masked_per_view, head.shape[1], head.shape[0], False)]

    @classmethod
    def from_config(cls, cfg) -> BEiT:
        b = cfg.beit
        student = build_student(cfg, pos_embed="learned" if b.abs_pos_embed else "none",
                                layer_scale=b.layer_scale or None, rel_pos_bias=b.rel_pos_bias, qkv_bias=b.qkv_bias,
                                init=b.init)
        tokenizer = FrozenTokenizer(tokenizer_arch(b.tokenizer, b.vocab_size))
        return cls(student, tokenizer, b.vocab_size, get_hard_ce(kernels(cfg)), b.init)

    def eval_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.student.backbone(images)

    def train(self, mode: bool = True) -> BEiT:
        super().train(mode)
        self.tokenizer.eval()  # always: a no_grad module in train mode upsets ZeRO-3 (DeepSpeed #4922)
        return self

    def forward(self, batch: dict[str, torch.Tensor], values: dict[str, float]) -> dict[str, torch.Tensor]:
        """batch: `global_crops` [1, B, 3, H, W] normalised, `second_crops` [1, B, 3, h, w] uint8 (the
        tokenizer's view), `masks` [1, B, H/p, W/p]."""
        images, masks = batch["global_crops"][0], batch["masks"][0]
        with torch.no_grad():
            tokens = self.tokenizer(batch["second_crops"][0].float() / 255).flatten(1)  # [B, N]
        if tokens.shape[1] != masks[0].numel():
            raise ValueError(f"the tokenizer gives {tokens.shape[1]} tokens per image, the student has "
                             f"{masks[0].numel()} patches")
        flat = masks.flatten(1)
        s = self.student.backbone.forward_features(images, masks)
        index = batch.get("mask_index")  # the masked positions, found on the host (data/transforms.py)
        if index is None:
            index = flat.flatten().nonzero().squeeze(1)
        logits = self.student.head(s["patch"].flatten(0, 1).index_select(0, index))  # only the masked positions
        return beit_loss(logits, tokens, flat, self.loss_fn, index)
