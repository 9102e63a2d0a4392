"""The root of the run configuration: every section, and the checks that span sections."""

from __future__ import annotations

from dataclasses import dataclass

from .fields import Invalid, opt, require
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
from .teacher import TeacherConfig


@dataclass
class Config:
    method: str = opt(
        "ibot", "Pretraining objective: a registered method, one module each (trainer/methods/<method>.py).")
    run: RunConfig = opt(RunConfig(), "Run directory, seed, precision, kernels.")
    model: ModelConfig = opt(ModelConfig(), "Backbone.")
    data: DataConfig = opt(DataConfig(), "Shards, multi-crop augmentation and masks.")
    optim: OptimConfig = opt(OptimConfig(), "Optimizer and its schedules.")
    schedule: ScheduleConfig = opt(ScheduleConfig(), "Length of training.")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(), "Checkpoint cadence and retention.")
    log: LogConfig = opt(LogConfig(), "Metrics cadence and sinks.")
    teacher: TeacherConfig = opt(TeacherConfig(), "Frozen teachers.")
    eval: EvalConfig = opt(EvalConfig(), "kNN evaluation.")
    # ... and one section per registered method's `config_section` (ibot, maskalign, beit, dvae, itpn:
    # trainer/methods/<method>.py), attributes like the fields above: `method_sections()` lists them.

    def __post_init__(self) -> None:
        for key, section in method_sections().items():
            if key not in self.__dict__:
                setattr(self, key, section())

    def validate(self) -> None:
        from models.archs import ARCHS
        from trainer.methods import METHODS, method_class

        p = self.model.patch_size
        for name in ("global_crops", "local_crops"):
            crop = getattr(self.data, name)
            if crop.number:
                require(crop.size % p == 0, f"data.{name}.size",
                        f"{crop.size} is not a multiple of model.patch_size ({p})")
        grid = (self.data.global_crops.size // p) ** 2
        try:
            method = method_class(self.method)
        except ValueError as e:
            raise Invalid("method", str(e)) from None
        family = ARCHS[self.model.arch].family if self.model.arch in ARCHS else None
        wanted = method.family or "vit"  # (a tokenizer has no backbone: model.arch keeps a ViT's name)
        if family is not None and family not in (wanted, *method.other_families):
            archs = ", ".join(name for name, a in ARCHS.items() if a.family in (wanted, *method.other_families))
            others = ", ".join(name for name, m in METHODS.items() if family in (m.family, *m.other_families))
            require(False, "model.arch", f"{self.model.arch!r} is a {family} architecture: method {self.method} trains "
                    f"a {wanted} ({archs}); methods that train a {family}: {others}")
        method.validate(self)
        for name in ("blur_p", "solarize_p"):
            require(len(getattr(self.data.augment, name)) == self.data.global_crops.number, f"data.augment.{name}",
                    f"needs one probability per global crop ({self.data.global_crops.number})")
        g = self.run.spike_guard
        if g.enabled:
            require(g.nonfinite_steps <= self.optim.max_consecutive_skips, "run.spike_guard.nonfinite_steps",
                    f"{g.nonfinite_steps} exceeds optim.max_consecutive_skips ({self.optim.max_consecutive_skips}), "
                    "which stops the run first")
        if self.data.mask.patches is not None:
            require(self.data.mask.patches < grid, "data.mask.patches",
                    f"{self.data.mask.patches} is not fewer than the {grid} patches of a global crop")
        if self.data.mask.kind == "block" and self.data.mask.ratio[1] > 0:
            require((self.data.mask.min_block_patches or 1) <= grid, "data.mask.min_block_patches",
                    f"{self.data.mask.min_block_patches} exceeds the {grid} patches of a global crop")


def method_names() -> list[str]:
    """Every registered method's name."""
    from trainer.methods import METHODS

    return list(METHODS)


def method_sections() -> dict[str, type]:
    """The registered methods' config sections, top-level key -> dataclass (trainer/methods/base.py)."""
    from trainer.methods import config_sections

    return config_sections()
