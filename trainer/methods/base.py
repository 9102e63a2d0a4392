"""What the shared code asks a method: the one interface between a method's module and the rest.

A method is an `nn.Module` subclass of `Method`, registered under its name (`@register("name")` in
`trainer/methods/__init__.py`), that holds its networks as submodules (`student` always, a
ModuleDict with its `backbone`; `teacher` for an EMA teacher of the same shape; its frozen networks
under the names `frozen_files` gives) and answers, on the class (from a config, before anything is
built) or on the built module:

- building and training: `from_config(cfg)`, `forward(batch, values) -> {term: unweighted loss}`,
  `loss_weights` (the loop does the weighting), `no_weight_decay()` (parameter names outside weight
  decay), `eval_features(images)` (what kNN measures) and `held_out_metrics(...)` (its own measures
  on the held-out images), the last two optional;
- the config: `validate(cfg)` (its own checks, raising `Invalid(dotted key, problem)`), its frozen
  networks' weight files (`frozen_files`) and which of them stay whole outside the engine
  (`replicated_frozen`), its schedules and its EMA teacher's momentum, the kernels' loss widths;
- the planner and the FLOP count: `plan_calls` (each pass of a micro-batch) and `loss_logits` (the
  score matrices its loss holds);
- export and evaluation: what kind of network it trains (`family`, `product`), which parts are the
  exported backbone, whether its EMA teacher is exportable, whether the backbone's mask token is
  trained, which pooled feature evaluates it, and what the exporter needs from the run's config
  beyond the tensors (`export_spec`);
- the data: how the loader reads the training shards (`train_data`: its views, its subset);
- the run's end: the lines that report its held-out measures (`summary_lines`), and whether the
  run's pictures are drawn for it.

Everything has a default that fits a ViT method with no EMA teacher and no frozen network, so a new
method overrides only what differs (docs/adding-a-method.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

FROZEN_TEACHER = "clip_teacher"  # the attribute of the shared frozen teacher (section teacher.clip, build.py)


@dataclass(frozen=True)
class ExportSpec:
    """What export needs from a run's config beyond the tensors it reads (Method.export_spec)."""

    # how the backbone is written: "transformers" (a ViTModel / Dinov2Model / BeitModel directory and a
    # timm file, export/hf.py), "itpn" (HiViT + pyramid in one file rebuilt from `arch`, export/itpn.py) or
    # "classifier" (backbone, fc_norm and head as an image classifier, export/classifier.py)
    format: str = "transformers"
    layer_scale_init: float = 1.0  # layer-scale init in a transformers config (the file's gammas replace it)
    vocab_size: int | None = None  # the visual-token vocabulary a BEiT-style transformers config names
    arch: Any = None  # the record that rebuilds a network its tensors do not describe (HiViT + pyramid, a dVAE)
    about: str = ""  # what the model card says about how it was pretrained, beside the method's name


def meta_images(n: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """A batch of `n` square images on the meta device: what the planner's passes run on."""
    return torch.empty(n, 3, size, size, device="meta", dtype=dtype)


class Method(nn.Module):
    name: ClassVar[str] = ""  # set by register()
    # the network it trains: "vit" (models/vit.py), "hivit" (models/hivit.py), or "" for a tokenizer
    family: ClassVar[str] = "vit"
    other_families: ClassVar[tuple[str, ...]] = ()  # further families it can train (finetune: HiViT too)
    product: ClassVar[str] = "backbone"  # or "tokenizer" (BEiT's dVAE): what export writes out
    exported_by: ClassVar[str] = "scripts/convert_to_hf.py"
    # export: the student's parts that make the exported network ((): its `backbone`, unprefixed)
    export_parts: ClassVar[tuple[str, ...]] = ()
    # why the EMA teacher cannot be exported (None: it can, and `auto` picks it where it exists)
    teacher_not_exported: ClassVar[str | None] = None
    uses_mask_token: ClassVar[bool] = False  # its student learns the backbone's mask token
    # what evaluates the backbone: "cls" (the [CLS] token) or "avg" (the mean patch token)
    knn_pool: ClassVar[str] = "cls"
    knn_features: ClassVar[str] = "teacher [CLS]"  # in words, for the run's summary line
    draws_run_pictures: ClassVar[bool] = True  # the loss/kNN pictures at the end of a run
    fp32_buffers: ClassVar[tuple[str, ...]] = ()  # buffers kept fp32 when the engine casts the module
    # its config section: (top-level key, dataclass of `opt` fields, with an optional `validate()`);
    # every registered section exists in every config, with its defaults unless set
    config_section: ClassVar[tuple[str, type] | None] = None
    logged_schedules: ClassVar[tuple[str, ...]] = ()  # its scheduled values, logged beside the losses
    # parameters whose name holds a key have their lr multiplied by the scheduled value it names
    lr_factors: ClassVar[dict[str, str]] = {}
    loss_weights: dict[str, float]  # set in __init__: {term: weight}; the loop weights forward's terms
    # optional: (images [B, 3, S, S], normalised) -> [B, C], the features kNN measures (None: no kNN)
    eval_features: Callable[[torch.Tensor], torch.Tensor] | None = None
    # optional, where eval_features reads an EMA teacher: the same features of the student, measured and
    # printed beside the teacher's (a teacher that lags its student shows)
    student_eval_features: Callable[[torch.Tensor], torch.Tensor] | None = None
    # optional: (image batches, run directory, step, crop size) -> {name: value} measured on the held-out
    # split, with the same names + "_random_init" for the untrained network (the dVAE's PSNR, iTPN's pixel loss)
    held_out_metrics: Callable[[Iterable[torch.Tensor], Path, int, int], dict[str, float]] | None = None
    held_out_labels: ClassVar[bool] = False  # held_out_metrics gets (images, labels) pairs instead of images
    # a held-out measure (one of held_out_metrics') the run keeps its best checkpoint by, and whether
    # higher is better: that checkpoint survives checkpoint.keep beside the newest (checkpoints/best)
    best_by: ClassVar[tuple[str, bool] | None] = None

    # ------------------------------------------------------------------ from the config

    @classmethod
    def from_config(cls, cfg) -> Method:
        """The method module for a run's config, its networks built and initialised (weights of frozen
        networks are loaded by the engine afterwards)."""
        raise TypeError(f"method {cls.name} does not say how it is built (from_config)")

    @classmethod
    def validate(cls, cfg) -> None:
        """The method's own checks of a whole config; raise `trainer.config.checks.Invalid`."""

    @classmethod
    def frozen_files(cls, cfg) -> dict[str, str]:
        """Frozen networks, attribute -> weights file: each has `load_weights(path) -> sha256`,
        `read_weights(path) -> state` and `weights_sha256`; the engine loads them, checkpoints keep
        only the hash."""
        return {}

    @classmethod
    def replicated_frozen(cls, cfg) -> tuple[str, ...]:
        """Its frozen networks kept whole on every rank, outside the DeepSpeed engine (never gathered):
        the shared frozen teacher (`clip_teacher`) when `teacher.clip.replicate` is set."""
        return tuple(n for n in cls.frozen_files(cfg) if n == FROZEN_TEACHER and cfg.teacher.clip.replicate)

    @classmethod
    def schedules(cls, cfg):
        """Its values beyond the optimizer's, as a function of the optimizer step -> {name: value}
        (pure: nothing to save); `forward` gets them in `values`."""
        return lambda step: {}

    @classmethod
    def train_data(cls, cfg, run_dir: Path, rank: int) -> dict:
        """How the loader reads the training shards, as `data.pipeline.build_train_loader` keywords:
        `augment` (the views of an image; default: the multi-crop of `data.*`) and `keys` (the only
        samples read; default: all). Called on every rank before the first step."""
        return {}

    @classmethod
    def held_out_resize(cls, cfg) -> int | None:
        """The shorter side its held-out images are resized to before the centre crop at the crop size
        (None: the crop size itself, as kNN evaluates)."""
        return None

    @classmethod
    def ema_momentum(cls, cfg) -> tuple[float, float] | None:
        """The EMA teacher's momentum, start and end of a cosine over the run; a method with a `teacher`
        must say it (None: no EMA teacher, and no momentum is scheduled or logged)."""
        return None

    @classmethod
    def loss_classes(cls, cfg) -> dict[str, tuple[int, ...]]:
        """The widths the kernels' self-check runs its losses at: {"softmax_ce": (K, ...), "hard_ce": ...}."""
        return {}

    @classmethod
    def masks_to_draw(cls, cfg, views, loader_masks):
        """(masks [n, h, w], title) that `scripts/visualize.py masks` draws over loader views: the
        loader's own masks, unless the method chooses its masked patches itself."""
        return loader_masks, f"{cfg.method}: block masks of the loader"

    def no_weight_decay(self) -> set[str]:
        """Names (as `named_parameters` gives them) kept out of weight decay beyond the usual biases and
        norms: a method's own tensors, such as MaskAlign's W."""
        return set()

    # ------------------------------------------------------------------ export and the run's end

    @classmethod
    def export_spec(cls, cfg) -> ExportSpec:
        """What export/ needs from the run's config (a checkpoint's, read by attribute) beyond the tensors."""
        return ExportSpec(layer_scale_init=float(cfg.model.layer_scale or 1.0))

    @classmethod
    def summary_lines(cls, cfg, summary: dict, run_dir: Path) -> list[str]:
        """What the end of a run prints about its held-out measures, each beside what it is compared
        with (`summary`: the run's, with the untrained network's as `<name>_random_init`)."""
        if summary.get("knn") is None:
            return []
        from evaluation.knn import percent

        student = f"   student: {percent(summary['knn_student'])}" if summary.get("knn_student") is not None else ""
        return [f"kNN top-1 (k={cfg.eval.knn_k}, T={cfg.eval.knn_temp}, {cls.knn_features}, held-out split): "
                f"{percent(summary.get('knn'))}   random init: {percent(summary.get('knn_random_init'))}   "
                f"raw pixels: {percent(summary.get('knn_raw_pixels'))}{student}"]

    # ------------------------------------------------------------------ the planner

    def plan_calls(self, cfg, s, dtype) -> list:
        """The passes of one micro-batch on the meta device, teachers first, as
        trainer.plan.workload.Call tuples; `s`: its Shapes."""
        raise ValueError(f"method {self.name} does not describe its passes (plan_calls): the memory planner "
                         "and the FLOP count cannot size it")

    def loss_logits(self, cfg, s) -> list[tuple[int, int, int, bool]]:
        """(rows, width, K, soft) of each score matrix inside the loss that the passes do not count:
        soft ones (softmax-CE against a teacher) may be fused; hard ones are fp32 logits and their
        log-softmax."""
        return []


METHODS: dict[str, type[Method]] = {}


def register(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        if not issubclass(cls, Method):
            raise TypeError(f"method {name}: {cls.__name__} must subclass trainer.methods.base.Method")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def config_sections() -> dict[str, type]:
    """Every registered method's config section, top-level key -> dataclass (methods may share one:
    ibot_clip uses iBOT's)."""
    out: dict[str, type] = {}
    for name, cls in METHODS.items():
        if cls.config_section is not None:
            key, section = cls.config_section
            if out.get(key, section) is not section:
                raise TypeError(f"method {name}: config section {key!r} is already another method's")
            out[key] = section
    return out


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None
