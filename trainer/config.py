"""The run configuration: typed sections, YAML loading, `key.sub=value` overrides, validation.

Every field carries its own help text. A config is read with `yaml.safe_load`, merged with its
`base:` file (if any) and the command-line overrides, then checked; any problem stops the run
before a process group exists, as one line naming where the value came from, the dotted key and
what is allowed, e.g. ``configs/x.yaml: data.mask.ratio: 1.5 is outside [0, 1)``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "defaults.yaml"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A bad configuration value; `str()` is the one line shown to the user."""

    def __init__(self, source: str, key: str, problem: str):
        self.source, self.key, self.problem = source, key, problem
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")


class _Invalid(Exception):
    """Raised by `validate()` methods with a key relative to their section."""

    def __init__(self, key: str, problem: str):
        super().__init__(key, problem)
        self.key, self.problem = key, problem


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise _Invalid(key, problem)


def _at_least(section: Any, lo: float, *names: str, strict: bool = False) -> None:
    """Each named field must be >= lo (> lo with strict)."""
    for name in names:
        value = getattr(section, name)
        _require(value > lo if strict else value >= lo, name, f"{value} must be {'>' if strict else '>='} {lo}")


def _check_prob(value: float, key: str) -> None:
    _require(0.0 <= value <= 1.0, key, f"{value} is outside [0, 1]")


def _check_range(pair: tuple[float, float], key: str, lo: float, hi: float, hi_open: bool = False) -> None:
    a, b = pair
    upper = f"{hi})" if hi_open else f"{hi}]"
    for v in pair:
        _require(lo <= v and (v < hi if hi_open else v <= hi), key, f"{v} is outside [{lo}, {upper}")
    _require(a <= b, key, f"[{a}, {b}] is not an interval (first must be <= second)")


def opt(default: Any, help: str) -> Any:
    """A config field with its help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _copy(value: Any) -> Any:
    return copy.deepcopy(value)


# --------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    output_dir: str = opt("runs/default", "Run directory: checkpoints, metrics.jsonl, TensorBoard events, log.")
    seed: int = opt(0, "Global seed; data order, augmentations and masks are pure functions of it.")
    precision: Literal["bf16", "fp16", "fp32"] = opt("bf16", "Training precision of the student.")
    kernels: Literal["auto", "triton", "torch"] = opt(
        "auto", "Attention / softmax-CE implementations: 'torch' (PyTorch references), 'triton' (Triton kernels "
                "where written; a CUDA GPU, or TRITON_INTERPRET=1 on the CPU) or 'auto' (the kernels on a CUDA GPU "
                "where a start-up self-check against the references passes, the references elsewhere).")

    def validate(self) -> None:
        _require(bool(self.output_dir.strip()), "output_dir", "must not be empty")
        if self.kernels == "triton":
            from models.kernels import triton_available

            ok, why = triton_available()
            _require(ok, "kernels", f"'triton' cannot run here: {why}; use 'torch' or 'auto'")
        _at_least(self, 0, "seed")


@dataclass
class ModelConfig:
    arch: str = opt("vit_small", "Backbone name from the model registry (vit_tiny, vit_small ... vit_giant2).")
    patch_size: int = opt(16, "Patch size in pixels; crop sizes must be multiples of it.")
    drop_path: float = opt(0.1, "Stochastic depth rate of the last block (linear over depth).")
    layer_scale: float | None = opt(None, "LayerScale init value (e.g. 1e-5 for giant models); null: off.")
    grad_checkpointing: int = opt(0, "Recompute every k-th block in backward (1: every block; 0: off).")
    sharded_init: bool = opt(False, "Build the model under deepspeed.zero.Init (no rank holds all weights; "
                                    "use for ViT-H and larger under ZeRO-3).")

    def validate(self) -> None:
        from models.vit import VIT_ARCHS

        _require(self.arch in VIT_ARCHS, "arch", f"{self.arch!r} is not one of {', '.join(VIT_ARCHS)}")
        _at_least(self, 0, "patch_size", strict=True)
        _require(0.0 <= self.drop_path < 1.0, "drop_path", f"{self.drop_path} is outside [0, 1)")
        _at_least(self, 0, "grad_checkpointing")


@dataclass
class CropConfig:
    number: int = opt(2, "How many crops of this kind per image.")
    size: int = opt(224, "Output side in pixels (square).")
    scale: tuple[float, float] = opt((0.32, 1.0), "RandomResizedCrop area range, as fractions of the image.")

    def validate(self) -> None:
        _at_least(self, 0, "number")
        _at_least(self, 0, "size", strict=True)
        _check_range(self.scale, "scale", 0.0, 1.0)
        _require(self.scale[1] > 0, "scale", "upper bound must be > 0")


@dataclass
class AugmentConfig:
    flip_p: float = opt(0.5, "Horizontal flip probability.")
    color_jitter_p: float = opt(0.8, "Probability of applying colour jitter.")
    color_jitter: tuple[float, float, float, float] = opt(
        (0.4, 0.4, 0.2, 0.1), "Colour jitter strengths: brightness, contrast, saturation, hue."
    )
    grayscale_p: float = opt(0.2, "Random grayscale probability.")
    blur_p: list[float] = opt([1.0, 0.1], "Gaussian blur probability of each global crop (iBOT: 1.0, 0.1).")
    local_blur_p: float = opt(0.5, "Gaussian blur probability of each local crop.")
    blur_sigma: tuple[float, float] = opt((0.1, 2.0), "Gaussian blur radius range.")
    solarize_p: list[float] = opt([0.0, 0.2], "Solarisation probability of each global crop (iBOT: 0.0, 0.2).")
    mean: tuple[float, float, float] = opt(IMAGENET_MEAN, "Normalisation mean (RGB).")
    std: tuple[float, float, float] = opt(IMAGENET_STD, "Normalisation std (RGB).")

    def validate(self) -> None:
        for name in ("flip_p", "color_jitter_p", "grayscale_p", "local_blur_p"):
            _check_prob(getattr(self, name), name)
        for name in ("blur_p", "solarize_p"):
            for v in getattr(self, name):
                _check_prob(v, name)
        b, c, s, h = self.color_jitter
        _require(min(b, c, s) >= 0, "color_jitter", "brightness, contrast, saturation must be >= 0")
        _require(0 <= h <= 0.5, "color_jitter", f"hue {h} is outside [0, 0.5]")
        _check_range(self.blur_sigma, "blur_sigma", 0.0, 100.0)
        _require(all(s > 0 for s in self.std), "std", "every entry must be > 0")


@dataclass
class MaskConfig:
    kind: Literal["block", "random"] = opt("block", "BEiT blockwise masks or uniformly random patches.")
    ratio: tuple[float, float] = opt(
        (0.1, 0.5), "Masked fraction of a global view's patches, drawn uniformly per view from this range."
    )
    prob: float = opt(0.5, "Probability that a global view is masked at all (iBOT: 0.5).")
    min_block_patches: int = opt(16, "Smallest block, in patches (BEiT: 16).")
    min_aspect: float = opt(0.3, "Block aspect ratios are drawn log-uniformly from [min_aspect, 1/min_aspect].")

    def validate(self) -> None:
        _check_range(self.ratio, "ratio", 0.0, 1.0, hi_open=True)
        _check_prob(self.prob, "prob")
        _at_least(self, 1, "min_block_patches")
        _require(0 < self.min_aspect <= 1, "min_aspect", f"{self.min_aspect} is outside (0, 1]")


@dataclass
class DataConfig:
    train_shards: str = opt(
        "builtin:digits",
        "WebDataset shards: a brace pattern, a directory of .tar files, a list file (.txt), a pipe: or "
        "s3:// URL, or builtin:digits (the embedded data set, written to cache_dir on first use).",
    )
    val_shards: str | None = opt(None, "Labelled shards for kNN evaluation; builtin:digits has its own split.")
    batch_size: int = opt(64, "Images per rank per micro-step.")
    num_workers: int = opt(8, "Loader processes per rank; 0 reads in the training process.")
    shuffle_buffer: int = opt(2000, "Samples held per loader process for shuffling (raw bytes, not decoded).")
    shard_retries: int = opt(2, "Extra attempts to open a shard before it is skipped and counted.")
    max_failed_fraction: float = opt(
        0.05, "Stop the run when more than this fraction of the samples read on a rank cannot be used (corrupt or "
              "missing images; judged after 200 samples). Each failure is skipped, counted and logged either way.")
    global_crops: CropConfig = opt(CropConfig(2, 224, (0.32, 1.0)), "Global crops (teacher and student).")
    local_crops: CropConfig = opt(CropConfig(10, 96, (0.05, 0.32)), "Local crops (student only, never masked).")
    augment: AugmentConfig = opt(AugmentConfig(), "Photometric augmentations (DINO/iBOT recipe).")
    mask: MaskConfig = opt(MaskConfig(), "Patch masks of the global crops.")
    s3_command: str = opt("aws s3 cp --quiet {url} -", "Shell command streaming an s3:// URL to stdout.")
    cache_dir: str = opt("~/.cache/mimscale", "Where builtin data sets are written.")

    def validate(self) -> None:
        _require(bool(self.train_shards.strip()), "train_shards", "must not be empty")
        _at_least(self, 1, "batch_size")
        _at_least(self, 0, "num_workers")
        _at_least(self, 1, "shuffle_buffer")
        _at_least(self, 0, "shard_retries")
        _check_prob(self.max_failed_fraction, "max_failed_fraction")
        _require(self.global_crops.number >= 1, "global_crops.number", f"{self.global_crops.number} must be >= 1")
        _require("{url}" in self.s3_command, "s3_command", "must contain {url}")
        if self.local_crops.number > 0:
            _require(self.local_crops.size < self.global_crops.size, "local_crops.size",
                     f"{self.local_crops.size} must be smaller than global_crops.size "
                     f"({self.global_crops.size})")



@dataclass
class OptimConfig:
    lr: float = opt(5e-4, "Peak learning rate for the whole global batch (no implicit scaling).")
    min_lr: float = opt(1e-6, "Learning rate at the end of the cosine.")
    warmup_steps: int = opt(1000, "Linear learning-rate warm-up, in optimizer steps.")
    weight_decay: tuple[float, float] = opt((0.04, 0.4), "Weight decay at the start and end (cosine).")
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas.")
    eps: float = opt(1e-8, "AdamW epsilon.")
    clip_grad: float = opt(3.0, "Global gradient-norm clipping; 0 disables it.")
    grad_accum: int = opt(1, "Micro-steps per optimizer step.")
    layer_decay: float = opt(1.0, "Layer-wise lr decay factor (1.0: off).")
    max_consecutive_skips: int = opt(
        10, "Optimizer steps skipped for a non-finite loss or gradient norm (on any rank) are counted; this many "
            "in a row stop the run, naming the step and the newest checkpoint. fp16 loss-scale overflows count too.")

    def validate(self) -> None:
        _at_least(self, 0, "lr", strict=True)
        _require(0 <= self.min_lr <= self.lr, "min_lr", f"{self.min_lr} is outside [0, lr={self.lr}]")
        _at_least(self, 0, "warmup_steps")
        _require(all(w >= 0 for w in self.weight_decay), "weight_decay", "must be >= 0")
        _check_range(self.betas, "betas", 0.0, 1.0, hi_open=True)
        _at_least(self, 0, "eps", strict=True)
        _at_least(self, 0, "clip_grad")
        _at_least(self, 1, "grad_accum")
        _require(0 < self.layer_decay <= 1, "layer_decay", f"{self.layer_decay} is outside (0, 1]")
        _at_least(self, 1, "max_consecutive_skips")


@dataclass
class ScheduleConfig:
    steps: int = opt(100_000, "Optimizer steps to train for.")

    def validate(self) -> None:
        _at_least(self, 1, "steps")


@dataclass
class CheckpointConfig:
    every_steps: int = opt(1000, "Save every N optimizer steps (and at the end).")
    keep: int = opt(3, "Newest checkpoints kept; older ones are deleted after a successful save.")

    def validate(self) -> None:
        _at_least(self, 1, "every_steps")
        _at_least(self, 1, "keep")


@dataclass
class LogConfig:
    every_steps: int = opt(20, "Print and record metrics every N optimizer steps.")
    tensorboard: bool = opt(True, "Write TensorBoard event files into the run directory.")

    def validate(self) -> None:
        _at_least(self, 1, "every_steps")


@dataclass
class IBOTConfig:
    out_dim: int = opt(8192, "Prototypes K of the [CLS] head (8192 for ViT-S/B, 65536 for large models).")
    patch_out_dim: int = opt(8192, "Prototypes of the patch head when it is not shared.")
    shared_head: bool = opt(True, "One projection head for [CLS] and patch tokens (iBOT's default).")
    head_hidden_dim: int = opt(2048, "Hidden width of the 3-layer head MLP.")
    head_bottleneck_dim: int = opt(256, "Bottleneck before the prototypes.")
    norm_last_layer: bool = opt(True, "Fix the prototype norms to 1 (more stable; False for ViT-S in iBOT).")
    student_temp: float = opt(0.1, "Student softmax temperature.")
    teacher_temp: tuple[float, float] = opt((0.04, 0.07), "Teacher temperature: warm-up start and final value.")
    teacher_temp_warmup_steps: int = opt(37_500, "Steps of linear teacher-temperature warm-up (30 epochs of IN-1k).")
    center_momentum: float = opt(0.9, "Momentum of the teacher output centers ([CLS] and patch).")
    ema_momentum: tuple[float, float] = opt((0.996, 1.0), "Teacher EMA momentum: start and end of a cosine.")
    cls_weight: float = opt(1.0, "Weight of L_CLS in the optimised loss.")
    mim_weight: float = opt(1.0, "Weight of L_MIM in the optimised loss.")
    freeze_last_layer_steps: int = opt(1250, "Prototype layer gets lr 0 for these first steps (one epoch).")
    clip_weight: float = opt(1.0, "method ibot_clip: weight of the frozen-teacher feature distillation term.")
    clip_loss: Literal["cosine", "smooth_l1"] = opt(
        "cosine", "method ibot_clip: distance between predicted and (normalised) teacher features.")

    def validate(self) -> None:
        _at_least(self, 1, "out_dim", "patch_out_dim", "head_hidden_dim", "head_bottleneck_dim")
        _at_least(self, 0, "student_temp", strict=True)
        _require(all(t > 0 for t in self.teacher_temp), "teacher_temp", "must be > 0")
        _require(0 <= self.center_momentum < 1, "center_momentum", f"{self.center_momentum} is outside [0, 1)")
        _check_range(self.ema_momentum, "ema_momentum", 0.0, 1.0)
        _at_least(self, 0, "teacher_temp_warmup_steps", "freeze_last_layer_steps")
        _require(self.cls_weight >= 0 and self.mim_weight >= 0, "cls_weight", "loss weights must be >= 0")
        _at_least(self, 0, "clip_weight")


@dataclass
class FrozenTeacherConfig:
    arch: str = opt("ViT-L-14", "An open_clip image tower (ViT-B-16, ViT-L-14, ViT-H-14, ViT-g-14; add -quickgelu "
                                "for OpenAI's weights), clip_vit_tiny (CPU tests), or any timm ViT name (a DINO "
                                "teacher: vit_base_patch16_224.dino).")
    weights: str | None = opt(None, "Local weights file: open_clip .pt/.bin (whole CLIP or its visual tower), a "
                                    "timm/DINO state dict, or .safetensors. Never downloaded.")
    blocks: list[int] = opt([], "Teacher blocks whose outputs are targets (0-based; negative counts from the end). "
                                "Empty: the method's default (maskalign: all; ibot_clip: the last).")
    mean: tuple[float, float, float] | None = opt(None, "Teacher input normalisation mean; null: the arch's own.")
    std: tuple[float, float, float] | None = opt(None, "Teacher input normalisation std; null: the arch's own.")


@dataclass
class TeacherConfig:
    clip: FrozenTeacherConfig = opt(FrozenTeacherConfig(), "The frozen teacher of maskalign and ibot_clip.")


@dataclass
class MaskAlignConfig:
    mask_ratio: float = opt(0.7, "Fraction r of patches the student never sees (it encodes the other 1 - r).")
    masking: Literal["attentive", "random"] = opt(
        "attentive", "attentive: keep the patches the teacher's last [CLS] attention ranks highest; random: uniform.")
    student_blocks: list[int] = opt([], "Student blocks aligned to the teacher (0-based, negative from the end); "
                                        "empty: all.")
    dynamic: bool = opt(True, "Learn the S x T level-mixing matrix W (false: fixed layer-wise alignment).")
    adapter_hidden_dim: int = opt(0, "Hidden width of each 2-layer adapter; 0: the teacher's width.")
    loss_beta: float = opt(1.0, "Smooth-L1 transition point (the paper's loss: 1).")

    def validate(self) -> None:
        _require(0.0 < self.mask_ratio < 1.0, "mask_ratio", f"{self.mask_ratio} is outside (0, 1)")
        _at_least(self, 0, "adapter_hidden_dim")
        _at_least(self, 0, "loss_beta", strict=True)


@dataclass
class EvalConfig:
    knn_k: int = opt(20, "Neighbours of the weighted kNN (DINO: 20).")
    knn_temp: float = opt(0.07, "Temperature of the kNN vote weights.")
    knn_at_end: bool = opt(True, "Run kNN on val_shards after training (and on the untrained network first).")
    batch_size: int = opt(128, "Images per rank per feature-extraction batch.")

    def validate(self) -> None:
        _at_least(self, 1, "knn_k")
        _at_least(self, 0, "knn_temp", strict=True)
        _at_least(self, 1, "batch_size")


@dataclass
class Config:
    method: Literal["ibot", "maskalign", "ibot_clip"] = opt(
        "ibot", "Pretraining objective (trainer/methods/<method>.py).")
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
            keep = max(1, round(grid * (1 - self.maskalign.mask_ratio)))
            _require(keep < grid, "maskalign.mask_ratio",
                     f"{self.maskalign.mask_ratio} leaves all {grid} patches of a global crop visible")
            _check_blocks(self.maskalign.student_blocks, _student_depth(self.model.arch), "maskalign.student_blocks")
        if self.method in ("maskalign", "ibot_clip"):
            self._validate_frozen_teacher()
        if self.data.mask.kind == "block" and self.data.mask.ratio[1] > 0:
            _require(self.data.mask.min_block_patches <= grid, "data.mask.min_block_patches",
                     f"{self.data.mask.min_block_patches} exceeds the {grid} patches of a global crop")


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
        _require(path.is_file(), "teacher.clip.weights", f"{path}: file not found{hint}")
        _check_blocks(t.blocks, teacher_depth(t.arch), "teacher.clip.blocks")


def _student_depth(arch: str) -> int:
    from models.vit import VIT_ARCHS

    return VIT_ARCHS[arch][1]


def _check_blocks(blocks: list[int], depth: int, key: str) -> None:
    for b in blocks:
        _require(-depth <= b < depth, key, f"block {b} does not exist (depth {depth})")
    _require(len({b % depth for b in blocks}) == len(blocks), key, f"{blocks} names a block twice")


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (default: configs/defaults.yaml), apply `key.sub=value` overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    source = _display(path)
    raw, origins = _read_yaml(path, source, seen=())
    for item in overrides or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("command line", item, "overrides look like key.sub=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError("command line", key, f"cannot parse value {text!r}: {e}") from None
        _set_dotted(raw, key, value)
        origins[key] = "command line"
    return build_config(raw, source, origins)


def build_config(raw: dict, source: str = "<dict>", origins: dict[str, str] | None = None) -> Config:
    """Turn a plain nested dict into a validated `Config`."""
    origins = origins or {}
    cfg = _build(Config, raw, "", source, origins)
    for prefix, section in _sections(cfg):
        if not hasattr(section, "validate"):
            continue
        try:
            section.validate()
        except _Invalid as e:
            key = f"{prefix}.{e.key}" if prefix else e.key
            raise ConfigError(_origin(origins, key, source), key, e.problem) from None
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON dumps and checkpoints."""
    return _plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Every leaf key with its help text and default: `launch.py --help-config` prints this."""
    rows = []
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key + ".")
        else:
            rows.append((key, f.metadata.get("help", ""), getattr(default, f.name)))
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read_yaml(path: Path, source: str, seen: tuple) -> tuple[dict, dict[str, str]]:
    if not path.is_file():
        raise ConfigError(source, "", "config file not found")
    if path.resolve() in seen:
        raise ConfigError(source, "base", "circular base: chain")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(source, "", f"not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(source, "", f"top level must be a mapping, got {type(raw).__name__}")
    origins = {key: source for key in _leaf_keys(raw)}
    base = raw.pop("base", None)
    if base is None:
        return raw, origins
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    merged, base_origins = _read_yaml(base_path, _display(base_path), seen + (path.resolve(),))
    _merge(merged, raw)
    base_origins.update(origins)
    return merged, base_origins


def _leaf_keys(raw: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in raw.items():
        key = f"{prefix}{k}"
        keys += _leaf_keys(v, key + ".") if isinstance(v, dict) else [key]
    return keys


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _origin(origins: dict[str, str], key: str, default: str) -> str:
    # The exact key, else the nearest set parent (a whole section given at once), else the main file.
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return default


def _sections(cfg: Any, prefix: str = ""):
    """Yield (dotted prefix, dataclass instance), innermost sections first, the root last."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _sections(value, f"{prefix}{f.name}.")
    yield prefix.rstrip("."), cfg


def _build(cls: type, raw: Any, prefix: str, source: str, origins: dict[str, str]) -> Any:
    where = prefix.rstrip(".")
    if not isinstance(raw, dict):
        raise ConfigError(_origin(origins, where, source), where, f"expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; known keys: {', '.join(names)}"
            raise ConfigError(_origin(origins, full, source), full, f"unknown key{hint}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, full + ".", source, origins)
        else:
            try:
                kwargs[key] = _coerce(value, typ)
            except _Invalid as e:
                raise ConfigError(_origin(origins, full, source), full, e.problem) from None
    return cls(**kwargs)


def _type_name(typ: Any) -> str:
    origin = typing.get_origin(typ)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(typ))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(typ))
    if origin is tuple:
        return f"a list of {len(typing.get_args(typ))} numbers"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(typ)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(typ, str(typ))


def _coerce(value: Any, typ: Any) -> Any:
    """Check `value` against the annotation and return it in that type, or raise _Invalid."""
    origin = typing.get_origin(typ)
    bad = _Invalid("", f"{value!r} is not {_type_name(typ)}")
    if origin is Literal:
        if value not in typing.get_args(typ):
            raise _Invalid("", f"{value!r} is not {_type_name(typ)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(typ):
            try:
                return _coerce(value, arg)
            except _Invalid:
                continue
        raise bad
    if origin is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, typing.get_args(typ)[0]) for v in value]
    if typ is type(None):
        if value is not None:
            raise bad
        return None
    if typ is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if typ is float:
        # PyYAML reads `1e-3` (no dot) as a string; accept any string float() reads.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"config type {typ} not supported")  # a schema bug, not user input
