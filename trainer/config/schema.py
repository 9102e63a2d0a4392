"""The root of the run configuration: every section, and the checks that span sections."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .fields import _Invalid, _require, checking_files, opt
from .methods import BEiTConfig, DVAEConfig, IBOTConfig, ITPNConfig, MaskAlignConfig, TeacherConfig
from .sections import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
)


@dataclass
class Config:
    method: Literal["ibot", "maskalign", "ibot_clip", "beit", "dvae", "itpn"] = opt(
        "ibot", "Pretraining objective (trainer/methods/<method>.py); dvae trains BEiT's tokenizer (stage 1); itpn "
                "trains a HiViT with its feature pyramid.")
    run: RunConfig = opt(RunConfig(), "Run directory, seed, precision, kernels.")
    model: ModelConfig = opt(ModelConfig(), "Backbone.")
    data: DataConfig = opt(DataConfig(), "Shards, multi-crop augmentation and masks.")
    optim: OptimConfig = opt(OptimConfig(), "Optimizer and its schedules.")
    schedule: ScheduleConfig = opt(ScheduleConfig(), "Length of training.")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(), "Checkpoint cadence and retention.")
    log: LogConfig = opt(LogConfig(), "Metrics cadence and sinks.")
    ibot: IBOTConfig = opt(IBOTConfig(), "iBOT objective (methods ibot, ibot_clip).")
    teacher: TeacherConfig = opt(TeacherConfig(), "Frozen teachers.")
    maskalign: MaskAlignConfig = opt(MaskAlignConfig(), "MaskAlign objective (method: maskalign).")
    beit: BEiTConfig = opt(BEiTConfig(), "BEiT's masked visual-token prediction (method: beit).")
    dvae: DVAEConfig = opt(DVAEConfig(), "BEiT's tokenizer, a discrete VAE (method: dvae).")
    itpn: ITPNConfig = opt(ITPNConfig(), "iTPN: HiViT + feature pyramid, pixels and masked features (method: itpn).")
    eval: EvalConfig = opt(EvalConfig(), "kNN evaluation.")

    def validate(self) -> None:
        p = self.model.patch_size
        for name in ("global_crops", "local_crops"):
            crop = getattr(self.data, name)
            if crop.number:
                _require(crop.size % p == 0, f"data.{name}.size",
                         f"{crop.size} is not a multiple of model.patch_size ({p})")
        grid = (self.data.global_crops.size // p) ** 2
        if self.method in ("ibot", "ibot_clip"):
            _require(self.data.global_crops.number == 2, "data.global_crops.number",
                     f"{self.data.global_crops.number}: {self.method} needs exactly 2 global crops")
        for name in ("blur_p", "solarize_p"):
            _require(len(getattr(self.data.augment, name)) == self.data.global_crops.number, f"data.augment.{name}",
                     f"needs one probability per global crop ({self.data.global_crops.number})")
        if self.method == "maskalign":
            _require(self.data.local_crops.number == 0, "data.local_crops.number",
                     "maskalign uses no local crops: set it to 0")
            keep = max(1, int(grid * (1 - self.maskalign.mask_ratio)))
            _require(keep < grid, "maskalign.mask_ratio",
                     f"{self.maskalign.mask_ratio} leaves all {grid} patches of a global crop visible")
            _check_blocks(self.maskalign.student_blocks, _student_depth(self.model.arch), "maskalign.student_blocks")
        self._validate_arch()
        if self.method in ("maskalign", "ibot_clip") or (self.method == "itpn" and self.itpn.teacher == "clip"):
            self._validate_frozen_teacher()
        if self.method in ("beit", "dvae", "itpn"):
            self._validate_single_view()
        if self.method == "itpn":
            _require(p % 4 == 0, "model.patch_size", f"{p}: HiViT splits a patch into 4 x 4 inner tokens")
            if self.itpn.teacher == "clip":
                _require(len(self.teacher.clip.blocks) in (0, 3), "teacher.clip.blocks",
                         f"{self.teacher.clip.blocks}: itpn needs one teacher block per pyramid level (strides 16, 8, "
                         "4), or none (the last block for all three)")
        if self.method == "beit":
            self._validate_beit(grid)
        if self.data.mask.patches is not None:
            _require(self.data.mask.patches < grid, "data.mask.patches",
                     f"{self.data.mask.patches} is not fewer than the {grid} patches of a global crop")
        if self.data.mask.kind == "block" and self.data.mask.ratio[1] > 0:
            _require((self.data.mask.min_block_patches or 1) <= grid, "data.mask.min_block_patches",
                     f"{self.data.mask.min_block_patches} exceeds the {grid} patches of a global crop")


    def _validate_arch(self) -> None:
        from models.hivit import HIVIT_ARCHS

        hier = self.model.arch in HIVIT_ARCHS
        if self.method == "itpn":
            _require(hier, "model.arch", f"{self.model.arch!r}: itpn trains a HiViT ({', '.join(HIVIT_ARCHS)})")
        else:
            _require(not hier, "model.arch", f"{self.model.arch!r} is a HiViT: only method itpn trains one")

    def _validate_single_view(self) -> None:
        _require(self.data.global_crops.number == 1, "data.global_crops.number",
                 f"{self.data.global_crops.number}: {self.method} sees one view per image; set it to 1")
        _require(self.data.local_crops.number == 0, "data.local_crops.number", f"{self.method} uses no local crops: "
                 "set it to 0")
        if self.method == "dvae":
            d, size = self.dvae, self.data.global_crops.size
            down = 2 ** (d.group_count - 1)
            _require(size % down == 0, "data.global_crops.size", f"{size} is not a multiple of the dVAE's "
                     f"down-sampling {down} (dvae.group_count {d.group_count})")
            _require(not self.model.grad_checkpointing, "model.grad_checkpointing",
                     "the dVAE has no blocks to recompute")

    def _validate_beit(self, grid: int) -> None:
        from models.dvae import TokenizerWeightsError, downsampling
        from trainer.methods.beit import tokenizer_arch

        b, g = self.beit, self.data.global_crops
        _require(self.model.layer_scale is None, "model.layer_scale", "method beit sets it with beit.layer_scale")
        _require(b.tokenizer is not None, "beit.tokenizer",
                 "beit needs its tokenizer: a dVAE encoder file (train one with method dvae and export it with "
                 "scripts/export_tokenizer.py)")
        try:
            arch = tokenizer_arch(b.tokenizer, b.vocab_size, check=True)
        except TokenizerWeightsError as e:
            raise _Invalid("beit.tokenizer", str(e)) from None
        _require(arch.vocab_size == b.vocab_size, "beit.tokenizer",
                 f"{b.tokenizer} has a vocabulary of {arch.vocab_size} codes, beit.vocab_size is {b.vocab_size}")
        _require(g.second_size is not None, "data.global_crops.second_size",
                 "beit needs the tokenizer's view of each crop (BEiT: 112 for a 224 crop)")
        side = int(round(grid ** 0.5))
        down = downsampling(arch)
        # (sizing without the tokenizer file, its architecture is a guess: no check against it)
        _require(not checking_files() or g.second_size == side * down, "data.global_crops.second_size",
                 f"{g.second_size}: the tokenizer ({down}x down-sampling) must see a {side} x {side} grid like the "
                 f"student's patches, so it must be {side * down}")

    def _validate_frozen_teacher(self) -> None:
        from models.teachers import resolve_arch, teacher_depth

        t = self.teacher.clip
        try:
            resolve_arch(t.arch)
        except ValueError as e:
            raise _Invalid("teacher.clip.arch", str(e)) from None
        _require(t.weights is not None, "teacher.clip.weights",
                 f"{self.method} needs a local weights file for its frozen teacher ({t.arch})")
        path = Path(t.weights).expanduser()
        hint = "; make one with: python scripts/make_tiny_clip.py" if t.arch == "clip_vit_tiny" else ""
        _require(path.is_file() or not checking_files(), "teacher.clip.weights", f"{path}: file not found{hint}")
        # itpn: one block per pyramid level, and levels may share one (by default all use the last)
        _check_blocks(t.blocks, teacher_depth(t.arch), "teacher.clip.blocks", repeats=self.method == "itpn")


def _student_depth(arch: str) -> int:
    from models.vit import VIT_ARCHS

    return VIT_ARCHS[arch][1]


def _check_blocks(blocks: list[int], depth: int, key: str, repeats: bool = False) -> None:
    for b in blocks:
        _require(-depth <= b < depth, key, f"block {b} does not exist (depth {depth})")
    _require(repeats or len({b % depth for b in blocks}) == len(blocks), key, f"{blocks} names a block twice")

