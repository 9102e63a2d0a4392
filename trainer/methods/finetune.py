"""Fine-tuning: a classifier on labelled shards, from a pretrained backbone or from scratch, on the
same engine, launchers, checkpoints and fault handling as pretraining.

The protocol is the one BEiT's `run_class_finetuning.py` (microsoft/unilm beit/) set and MAE, iBOT,
MaskAlign and iTPN fine-tune with: AdamW with layer-wise lr decay (`optim.layer_decay`, BEiT's
layer ids: trainer/engine.py `layer_id`), drop path (`model.drop_path`), warm-up then cosine
(`optim.*`), RandAugment and random erasing (timm's), Mixup / CutMix with label smoothing (timm's
`Mixup`, against soft targets), a linear head over the average-pooled patch tokens through a new
`fc_norm` (BEiT, MAE, MaskAlign) or over the [CLS] token (iBOT's --use_cls), its weights scaled by
`head_init_scale` at init. The held-out split is evaluated (top-1 / top-5) every
`eval.knn_every_steps` and at the end; the best checkpoint is kept beside the newest
(`checkpoints/best`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_

from data.digits import resolve_builtin
from data.labels import LabelError, balanced_subset, check_labels, class_counts, read_key_list
from data.shards import expand_shards
from data.transforms import ClassifyCrop, normalize
from models.archs import get_arch
from models.hf_names import KINDS, from_hf_state
from models.hivit import build_hivit
from models.kernels import get_attention
from models.vit import vit_options
from trainer.config.checks import check_single_view
from trainer.config.fields import Invalid, at_least, check_prob, checking_files, opt, require

from .base import ExportSpec, Method, meta_images, register
from .build import build_student, kernels

log = logging.getLogger(__name__)

BEIT = "microsoft/unilm beit/run_class_finetuning.py"


@dataclass
class FinetuneConfig:
    """Defaults are BEiT's run_class_finetuning.py (microsoft/unilm beit/), which MAE, iBOT, MaskAlign
    and iTPN kept, unless the help says otherwise."""

    init: str = opt("none", "What the backbone starts from: a pretraining run directory (its newest complete "
                            "checkpoint), a checkpoint directory or checkpoints/latest, a transformers directory "
                            "(ViT, DINOv2 or BEiT, exported here or not), a timm file written by "
                            "scripts/convert_to_hf.py (timm_model.safetensors), an iTPN file it wrote "
                            "(itpn.safetensors: HiViT, the pyramid left out), or none (from scratch: the "
                            "baseline every table needs).")
    weights: Literal["auto", "teacher", "student"] = opt(
        "auto", "Which network of a pretraining checkpoint: auto is its EMA teacher where the method has one (what "
                "iBOT and DINO release and fine-tune), else the student.")
    num_classes: int = opt(1000, "Classes of the labelled shards (labels are integers in [0, num_classes)).")
    pool: Literal["avg", "cls"] = opt(
        "avg", f"The head's input: the mean patch token through a new fc_norm, the pretrained final norm left out "
               f"({BEIT} --use_mean_pooling, MAE, MaskAlign, iTPN), or the [CLS] token after the final norm "
               "(bytedance/ibot run_class_finetuning.py --use_cls).")
    head_init_scale: float = opt(0.001, f"The head's weights and bias are scaled by this after a N(0, 0.02) init "
                                        f"({BEIT} --init_scale).")
    mixup: float = opt(0.8, f"Mixup alpha; 0: off ({BEIT} --mixup).")
    cutmix: float = opt(1.0, f"CutMix alpha; 0: off ({BEIT} --cutmix).")
    mixup_prob: float = opt(1.0, f"Probability that a batch is mixed at all ({BEIT} --mixup_prob).")
    mixup_switch_prob: float = opt(0.5, f"Probability of CutMix rather than Mixup when both are on "
                                        f"({BEIT} --mixup_switch_prob).")
    smoothing: float = opt(0.1, f"Label smoothing of the targets ({BEIT} --smoothing).")
    auto_augment: str = opt("rand-m9-mstd0.5-inc1", f"timm's RandAugment policy; an empty string: colour jitter "
                                                    f"instead ({BEIT} --aa).")
    color_jitter: float = opt(0.4, f"Colour jitter, used only without auto_augment ({BEIT} --color_jitter).")
    reprob: float = opt(0.25, f"Random-erasing probability per image, per-pixel noise ({BEIT} --reprob, "
                              "--remode pixel, --recount 1).")
    label_fraction: float = opt(1.0, "Train on this fraction of the labelled images, the same fraction of each "
                                     "class, chosen with run.seed (written to the run as labelled_keys.txt): the "
                                     "semi-supervised protocol of iBOT (1% / 10%) on shards that have no list.")
    label_list: str | None = opt(None, "A file of the only training images to use, one key per line (the "
                                       "iBOT / SimCLRv2 1% and 10% ImageNet lists: file names, extensions and "
                                       "directories ignored); replaces label_fraction.")
    eval_crop_pct: float = opt(0.875, f"Held-out images are resized to crop size / eval_crop_pct (shorter side, "
                                      f"bicubic), then centre-cropped ({BEIT} --crop_pct 224/256, timm's eval "
                                      "transform); the export's image processor does the same.")
    model_ema: bool = opt(False, f"Keep an exponential moving average of the whole classifier beside it, evaluated "
                                 f"with it (top1_ema) and exported by scripts/convert_to_hf.py --weights teacher "
                                 f"({BEIT} --model_ema; timm's ModelEma). Shard-local fp32, as iBOT's teacher.")
    model_ema_decay: float = opt(0.9999, f"Its decay per optimizer step ({BEIT} --model_ema_decay).")
    rel_pos_bias_per_block: bool = opt(
        True, f"A shared relative position bias (BEiT's pretraining) is copied into every block and each block "
              f"fine-tunes its own ({BEIT} --rel_pos_bias); false: the blocks keep sharing it.")

    def validate(self) -> None:
        at_least(self, 2, "num_classes")
        at_least(self, 0, "mixup", "cutmix", "smoothing", "head_init_scale")
        for key in ("mixup_prob", "mixup_switch_prob", "reprob"):
            check_prob(getattr(self, key), key)
        require(0 < self.label_fraction <= 1, "label_fraction", f"{self.label_fraction} is outside (0, 1]")
        # timm ignores a part of the policy it does not know: a typo would silently change the augmentation
        require(self.auto_augment == "" or re.fullmatch(r"rand(-(m|n|mstd|mmax|w|inc|p)[\d.]+)*", self.auto_augment)
                is not None, "auto_augment", f"{self.auto_augment!r} is not a RandAugment policy timm reads fully "
                                             "(rand-m9-mstd0.5-inc1: rand, then m, n, mstd, mmax, w, inc, p with "
                                             "numbers; or '' for none)")
        require(self.smoothing < 1, "smoothing", f"{self.smoothing} must be < 1")
        require(0 <= self.model_ema_decay < 1, "model_ema_decay", f"{self.model_ema_decay} is outside [0, 1)")
        require(0 < self.eval_crop_pct <= 1, "eval_crop_pct", f"{self.eval_crop_pct} is outside (0, 1]")


# ---------------------------------------------------------------------------------------- the init


def init_kind(path: str) -> str:
    """'none', 'timm' (a .safetensors file), 'transformers' (a directory with config.json) or 'run'."""
    if path.strip().lower() in ("none", ""):
        return "none"
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".safetensors":
        return "timm"
    if p.is_dir() and (p / "config.json").is_file():
        return "transformers"
    return "run"


def init_record(path: str) -> dict:
    """What an init says about itself without reading its tensors: {arch, patch, width, depth,
    method, summary} (arch/method None where it does not say)."""
    kind = init_kind(path)
    p = Path(path).expanduser()
    if kind == "timm":
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
            proj = f.get_slice("patch_embed.proj.weight").get_shape() if "patch_embed.proj.weight" in keys else None
        hivit = meta.get("itpn_arch") or meta.get("hivit_arch")  # export/itpn.py: iTPN's file, a HiViT classifier
        if hivit is not None:
            arch = json.loads(hivit)
            a = get_arch(arch["arch"])
            return {"arch": arch["arch"], "patch": arch["patch_size"], "width": a.width, "depth": a.depth,
                    "family": a.family, "method": json.loads(meta.get("method", "null")),
                    "summary": {"knn": (json.loads(meta.get("knn", "{}")) or {}).get("knn")}}
        if proj is None:
            raise ValueError(f"{p} holds no ViT (no patch_embed.proj.weight): not a timm file of convert_to_hf.py")
        depth = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
        return {"arch": None, "patch": proj[-1], "width": proj[0], "depth": depth, "method": meta.get("method"),
                "summary": {"knn": json.loads(meta.get("knn", "{}")).get("knn")}}
    if kind == "transformers":
        config = json.loads((p / "config.json").read_text())
        if config.get("model_type") not in KINDS:
            raise ValueError(f"{p}: a transformers {config.get('model_type')!r} model; fine-tuning starts from "
                             f"{', '.join(KINDS)} backbones")
        from safetensors import safe_open

        shapes = {}
        for f in sorted(p.glob("model*.safetensors")):
            with safe_open(str(f), "pt") as g:
                shapes.update({k: g.get_slice(k).get_shape() for k in g.keys()})
        # the names mapped on meta tensors: a layout this version cannot read stops here, before the run
        from_hf_state({k: torch.empty(s, device="meta") for k, s in shapes.items()}, config["model_type"])
        info = config.get("mimscale", {})
        return {"arch": None, "patch": config["patch_size"], "width": config["hidden_size"],
                "depth": config["num_hidden_layers"], "method": info.get("method"),
                "summary": {"knn": info.get("knn", {}).get("knn")}}
    # (trainer.weights imports the method registry, which imports this module: imported when used)
    from trainer.weights import checkpoint_method, resolve_checkpoint

    ckpt = resolve_checkpoint(p)
    part = torch.load(ckpt / "rank00000.pt", map_location="cpu", weights_only=True, mmap=True)
    config = json.loads(part["config"])
    method = checkpoint_method(ckpt, config)
    arch = get_arch(config["model"]["arch"])
    return {"arch": config["model"]["arch"], "patch": config["model"]["patch_size"], "width": arch.width,
            "depth": arch.depth, "method": method.name, "family": arch.family, "product": method.product,
            "summary": part.get("summary", {}), "checkpoint": str(ckpt)}


def read_init(path: str, which: str) -> dict[str, torch.Tensor]:
    """The init's backbone tensors, fp32, in our (= timm's) names."""
    from safetensors.torch import load_file

    if init_kind(path) == "timm":
        state = load_file(str(Path(path).expanduser()))
        if any(k.startswith("backbone.") for k in state):  # iTPN's file (its pyramid left out), a HiViT classifier
            return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        return {k: v for k, v in state.items() if not k.startswith("head.")}
    if init_kind(path) == "transformers":  # model.safetensors, or the shards its index names
        p = Path(path).expanduser()
        files = sorted(p.glob("model*.safetensors"))
        if not files:
            raise ValueError(f"{p} holds no model*.safetensors (a transformers directory saved with safetensors)")
        state = {k: v.float() for f in files for k, v in load_file(str(f)).items()}
        log.info("fine-tuning from the transformers directory %s (%d files)", p, len(files))
        return from_hf_state(state, json.loads((p / "config.json").read_text())["model_type"])
    from trainer.weights import read_backbone

    backbone = read_backbone(path, which)
    log.info("fine-tuning from %s (%s, step %d)", backbone.checkpoint, backbone.which, backbone.step)
    if "backbone" in backbone.method.export_parts:  # a fine-tuned classifier (BEiT's 22k -> 1k): its backbone
        return {k[len("backbone."):]: v for k, v in backbone.state.items() if k.startswith("backbone.")}
    return backbone.state


def adapt(state: dict[str, torch.Tensor], model: nn.Module, pool: str) -> dict[str, torch.Tensor]:
    """A pretrained backbone's tensors as `model` (the fine-tuned backbone) holds them: the final
    norm dropped under average pooling (fc_norm is new), a shared relative position bias copied
    into every block, position tables resampled to the fine-tuning grid."""
    state = dict(state)
    if pool == "avg":
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    shared = state.get("rel_pos_bias.relative_position_bias_table")
    if shared is not None and model.rel_pos_bias is None:
        state.pop("rel_pos_bias.relative_position_bias_table")
        for i in range(len(model.blocks)):
            state[f"blocks.{i}.attn.rel_pos.relative_position_bias_table"] = shared.clone()
    grid = tuple(model.grid) if hasattr(model, "grid") else tuple(model.patch_embed.grid_size)  # HiViT / ViT
    for key, prefix in (("pos_embed", 1), ("absolute_pos_embed", 0)):  # ViT (with [CLS]) / HiViT (without)
        ours = getattr(model, key, None)
        if key in state and ours is not None and state[key].shape != ours.shape:
            old = int((state[key].shape[1] - prefix) ** 0.5)
            state[key] = resample_abs_pos_embed(state[key], grid, (old, old), num_prefix_tokens=prefix)
    for key, table in list(state.items()):
        if key.endswith("relative_position_bias_table"):
            state[key] = resize_rel_table(table, grid)
    return state


def resize_rel_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """BEiT's relative position table [(2h-1)(2w-1) + 3, H] for another grid: the offset part
    resized bicubically (BEiT interpolates it with scipy on a geometric grid; bicubic on the
    uniform one is a deviation), the three [CLS] entries kept."""
    n = (2 * grid[0] - 1) * (2 * grid[1] - 1)
    if table.shape[0] == n + 3:
        return table
    side = int(round((table.shape[0] - 3) ** 0.5))
    offsets = table[:-3].T.reshape(1, -1, side, side)
    resized = F.interpolate(offsets.float(), size=(2 * grid[0] - 1, 2 * grid[1] - 1), mode="bicubic",
                            align_corners=False)
    return torch.cat([resized.reshape(table.shape[1], n).T.to(table.dtype), table[-3:]])


# ---------------------------------------------------------------------------------------- the network


class Classifier(nn.ModuleDict):
    """{backbone, fc_norm (average pooling) or nothing, head}: pooled features -> class logits."""

    def __init__(self, backbone: nn.Module, num_classes: int, pool: str, head_init_scale: float,
                 init_state: dict[str, torch.Tensor] | None):
        width = backbone.embed_dim
        parts = {"backbone": backbone, "head": nn.Linear(width, num_classes)}
        if pool == "avg":
            backbone.norm = nn.Identity()  # BEiT / MAE: the pretrained final norm goes, fc_norm is new
            parts["fc_norm"] = nn.LayerNorm(width, eps=1e-6)
        backbone.global_pool = "avg" if pool == "avg" else "token"
        super().__init__(parts)
        self.pool, self.head_init_scale, self.init_state = pool, head_init_scale, init_state
        if not hasattr(self["head"].weight, "ds_id"):  # built whole: now (partitioned, zero.Init: by the engine)
            for _, step in self.partitioned_init_steps():
                step()
            self.init_state = None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        # through the backbone's forward (its pooled feature), so ZeRO-3's hooks gather its own
        # parameters ([CLS], positions) as they do for a call of the module
        pooled = self["backbone"](images)
        return self["fc_norm"](pooled) if self.pool == "avg" else pooled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self["head"](self.features(images))

    def partitioned_init_steps(self) -> list:
        """The head's scaled init and the pretrained tensors, as steps the engine runs on gathered
        parameters when the network was built partitioned (model.sharded_init)."""
        head = self["head"]

        @torch.no_grad()
        def init_head() -> None:
            w = torch.empty(head.weight.shape, dtype=torch.float32, device=head.weight.device)
            head.weight.data.copy_(trunc_normal_(w, std=0.02) * self.head_init_scale)
            head.bias.data.zero_()

        steps = [([head.weight, head.bias], init_head)]
        if self.init_state is None:
            return steps
        params = dict(self["backbone"].named_parameters())
        unexpected = sorted(set(self.init_state) - set(params))
        missing = sorted(n for n in set(params) - set(self.init_state) if n != "mask_token")
        if unexpected or missing:
            raise ValueError(f"finetune.init: its tensors do not fit model.arch: unexpected {unexpected[:4]}, missing "
                             f"{missing[:4]}")

        def copy(param: nn.Parameter, value: torch.Tensor):
            @torch.no_grad()
            def step() -> None:
                if tuple(param.shape) != tuple(value.shape):
                    raise ValueError(f"finetune.init: a tensor of shape {tuple(value.shape)} for one of "
                                     f"{tuple(param.shape)}")
                param.data.copy_(value)
            return step

        return steps + [([params[n]], copy(params[n], v)) for n, v in self.init_state.items()]


@register("finetune")
class Finetune(Method):
    config_section = ("finetune", FinetuneConfig)
    draws_run_pictures = False
    other_families = ("hivit",)  # iTPN's HiViT, fine-tuned without its pyramid
    held_out_labels = True
    best_by = ("top1", True)
    export_parts = ("backbone", "fc_norm", "head")  # the exported network is the whole classifier

    def __init__(self, student: Classifier, cfg, ema: Classifier | None = None):
        super().__init__()
        self.student = student
        if ema is not None:  # finetune.model_ema: the engine keeps it the student's moving average (trainer/ema.py)
            self.teacher = ema
            self.teacher.requires_grad_(False)
        f = cfg.finetune
        self.num_classes, self.smoothing, self.seed = f.num_classes, f.smoothing, cfg.run.seed
        self.mean, self.std = tuple(cfg.data.augment.mean), tuple(cfg.data.augment.std)
        self.mixup = None
        if f.mixup > 0 or f.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob,
                               switch_prob=f.mixup_switch_prob, mode="batch", label_smoothing=f.smoothing,
                               num_classes=f.num_classes)
        self.reprob = f.reprob
        self.loss_weights = {"ce": 1.0}

    @classmethod
    def validate(cls, cfg) -> None:
        check_single_view(cfg)
        f = cfg.finetune
        require(get_arch(cfg.model.arch).family != "hivit" or f.pool == "avg", "finetune.pool",
                f"{f.pool}: {cfg.model.arch} (HiViT) has no [CLS] token; iTPN fine-tunes the mean token (avg)")
        require(not (f.mixup or f.cutmix) or cfg.data.batch_size % 2 == 0, "data.batch_size",
                f"{cfg.data.batch_size}: Mixup / CutMix pair each image with the batch's reversed order, so the batch "
                "must be even")
        if f.label_list is not None:
            require(not checking_files() or Path(f.label_list).expanduser().is_file(), "finetune.label_list",
                    f"{f.label_list} does not exist")
        if init_kind(f.init) != "none":
            require(not checking_files() or Path(f.init).expanduser().exists(), "finetune.init",
                    f"{f.init} does not exist")
        if not checking_files():
            return
        if init_kind(f.init) != "none":
            try:
                rec = init_record(f.init)
            except ValueError as e:  # trainer.weights.ExportError too
                raise Invalid("finetune.init", str(e)) from None
            ours = get_arch(cfg.model.arch)
            if rec.get("product", "backbone") != "backbone" or rec.get("family", "vit") != ours.family:
                what = rec["product"] if rec.get("product", "backbone") != "backbone" else f"{rec['family']} backbone"
                raise Invalid("finetune.init", f"{f.init} is a {rec['method']} run, which trains a {what}, not a "
                                               f"{ours.family} backbone (model.arch: {cfg.model.arch})")
            theirs = (rec["arch"], rec["patch"], rec["width"], rec["depth"])
            if (rec["patch"], rec["width"], rec["depth"]) != (cfg.model.patch_size, ours.width, ours.depth):
                raise Invalid("finetune.init", f"{f.init} is {rec['arch'] or 'a ViT'}/{theirs[1]} (width {theirs[2]}, "
                                               f"depth {theirs[3]}), this run's model is {cfg.model.arch}/"
                                               f"{cfg.model.patch_size} (width {ours.width}, depth {ours.depth})")
        train, val = resolve_builtin(cfg.data.train_shards, cfg.data.val_shards, cfg.data.cache_dir)
        split = "data.train_shards"
        try:  # the first shard of each split, its first images: a cheap look before anything is written
            check_labels(first_shard(train), f.num_classes, "finetune.num_classes", limit=64)
            if val:
                split = "data.val_shards"
                check_labels(first_shard(val), f.num_classes, "finetune.num_classes", limit=64)
            split = "data.train_shards"
            if f.label_list is not None or f.label_fraction < 1:
                labelled_keys(cfg, train)
        except LabelError as e:
            key = {"range": "finetune.num_classes", "list": "finetune.label_list"}.get(e.kind, split)
            raise Invalid(key, f"{split}: {e}" if e.kind == "range" else str(e)) from None

    @classmethod
    def from_config(cls, cfg) -> Finetune:
        f = cfg.finetune
        state = read_init(f.init, f.weights) if init_kind(f.init) != "none" else None
        options = {"init": "timm"}
        if state is not None and get_arch(cfg.model.arch).family == "vit":
            options.update(vit_options(state))
            if options["rel_pos_bias"] == "shared" and f.rel_pos_bias_per_block:
                options["rel_pos_bias"] = "per_block"
            options["layer_scale"] = 1.0 if "blocks.0.ls1.gamma" in state else None

        def build() -> nn.Module:
            if get_arch(cfg.model.arch).family == "hivit":  # iTPN: HiViT alone, its pyramid is for dense tasks
                m = cfg.model
                layer_scale = (1.0 if "blocks.0.ls2.gamma" in state else None) if state is not None else m.layer_scale
                # from scratch: positions trunc-normal 0.02, as iTPN's fine-tuning model (modeling_finetune.py)
                return build_hivit(m.arch, img_size=cfg.data.global_crops.size, patch_size=m.patch_size,
                                   drop_path_rate=m.drop_path, layer_scale=layer_scale, pos_embed="learned",
                                   attn_fn=get_attention(kernels(cfg)))
            return build_student(cfg, **options)

        backbone = build()
        if state is not None:
            state = adapt(state, backbone, f.pool)
        student = Classifier(backbone, f.num_classes, f.pool, f.head_init_scale, state)
        # finetune.model_ema: the same network, built anew (partitioned too under model.sharded_init); the
        # engine copies the student into it before the first step
        ema = Classifier(build(), f.num_classes, f.pool, f.head_init_scale, None) if f.model_ema else None
        return cls(student, cfg, ema)

    @classmethod
    def held_out_resize(cls, cfg) -> int | None:
        crop_pct = getattr(cfg.finetune, "eval_crop_pct", 1.0)  # (a run from before the key: uncropped)
        return int(cfg.data.global_crops.size / crop_pct)  # BEiT: int(input_size / crop_pct)

    @classmethod
    def ema_momentum(cls, cfg) -> tuple[float, float] | None:
        d = cfg.finetune.model_ema_decay
        return (d, d) if cfg.finetune.model_ema else None

    def train(self, mode: bool = True) -> Finetune:
        super().train(mode)
        if hasattr(self, "teacher"):
            self.teacher.eval()  # always: a no_grad module in train mode upsets ZeRO-3 (DeepSpeed #4922)
        return self

    @classmethod
    def train_data(cls, cfg, run_dir: Path, rank: int) -> dict:
        f, c = cfg.finetune, cfg.data.global_crops
        augment = ClassifyCrop(c.size, tuple(c.scale), cfg.data.augment.flip_p, f.auto_augment or None, f.color_jitter,
                               cfg.data.augment.mean)
        if f.label_list is None and f.label_fraction >= 1:
            return {"augment": augment}
        keys, labels = labelled_keys(cfg, cfg.data.train_shards)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "labelled_keys.txt").write_text("\n".join(keys) + "\n")
            log.info("training on %d labelled images (%s), per class %s; the list is in %s", len(keys),
                     f.label_list or f"finetune.label_fraction={f.label_fraction}, seed {cfg.run.seed}",
                     class_counts(labels, keys), run_dir / "labelled_keys.txt")
        return {"augment": augment, "keys": frozenset(keys)}

    def plan_calls(self, cfg, s, dt) -> list:
        return [("student + head", lambda: self.student(meta_images(s.b, s.global_size, dt)), True, self.student)]

    def forward(self, batch: dict[str, torch.Tensor], values: dict[str, float]) -> dict[str, torch.Tensor]:
        """batch: `global_crops` [1, B, 3, H, W] normalised, `labels` [B]."""
        images, labels = batch["global_crops"][0], batch["labels"]
        ok = ((labels >= 0) & (labels < self.num_classes)).all()
        problem = f"data.train_shards: a label outside [0, {self.num_classes}) (-1: a sample without `.cls`)"
        if labels.device.type == "cpu":
            if not ok:
                raise ValueError(problem)
        else:  # no host wait per step: a device-side assert
            torch._assert_async(ok, problem)
        # timm draws Mixup's lambda and boxes from NumPy's global generator and random erasing's boxes
        # from Python's: both seeded by the micro-step here (and put back), so a resumed run mixes and
        # erases as the uninterrupted one did; erasing's noise comes from torch's, which checkpoints keep
        with host_generators(self.seed, int(values.get("micro_step", 0))):
            if self.mixup is not None:
                images, target = self.mixup(images, labels)  # in place: the batch is this step's own
            else:
                off = self.smoothing / self.num_classes
                target = torch.full((len(labels), self.num_classes), off, device=labels.device)
                target.scatter_(1, labels[:, None], 1 - self.smoothing + off)
            if self.reprob > 0:
                images = random_erase(images, self.reprob)
        logits = self.student(images).float()
        ce = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return {"ce": ce, "train_top1": (logits.argmax(-1) == labels).float().mean().detach()}

    def held_out_metrics(self, batches, run_dir: Path, step: int, size: int) -> dict[str, float]:
        """Top-1 / top-5 (%) on the held-out split, over every rank's share."""
        dtype = next(iter(self.student["head"].parameters())).dtype
        networks = [self.student, *([self.teacher] if hasattr(self, "teacher") else [])]
        counts = None
        for images, labels in batches:
            x = normalize(images, self.mean, self.std, dtype)
            batch = []
            for net in networks:
                logits = net(x).float()
                hit = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels[:, None]
                batch += [hit[:, 0].sum(), hit.any(-1).sum()]
            batch = torch.stack([*batch, torch.tensor(len(labels), device=labels.device)]).double()
            counts = batch if counts is None else counts + batch
        if counts is None:
            counts = torch.zeros(2 * len(networks) + 1, dtype=torch.float64, device=next(self.parameters()).device)
        if dist.is_initialized():
            dist.all_reduce(counts)
        n = max(counts[-1].item(), 1)
        out = {"top1": 100 * counts[0].item() / n, "top5": 100 * counts[1].item() / n}
        if len(networks) > 1:
            out.update(top1_ema=100 * counts[2].item() / n, top5_ema=100 * counts[3].item() / n)
        return out

    @classmethod
    def export_spec(cls, cfg) -> ExportSpec:
        """A classifier (export/classifier.py): ViT/BEiT/DINOv2 ...ForImageClassification and timm with a head."""
        f = cfg.finetune
        labelled = (f.label_list or (f"{100 * f.label_fraction:g}% of the labels" if f.label_fraction < 1 else
                                     "all labels"))
        return ExportSpec(format="classifier", layer_scale_init=float(cfg.model.layer_scale or 1.0),
                          arch={"pool": f.pool, "init": f.init, "weights": f.weights, "labelled": labelled},
                          about=f"fine-tuned from {f.init}")

    @classmethod
    def summary_lines(cls, cfg, summary: dict, run_dir: Path) -> list[str]:
        if summary.get("top1") is None:
            return []
        f = cfg.finetune
        labelled = (f"{f.label_list}" if f.label_list else
                    f"{100 * f.label_fraction:g}% of the labels" if f.label_fraction < 1 else "all labels")
        start = summary.get("top1_random_init", float("nan"))
        line = (f"fine-tuned top-1 (held-out split): {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}%  "
                f"(best {summary.get('best_top1', summary['top1']):.2f}% at step {summary.get('best_top1_step')}, "
                f"checkpoints/best; {labelled}; before fine-tuning: {start:.2f}%, chance {100 / f.num_classes:.2f}%)")
        lines = [line]
        if summary.get("top1_ema") is not None:
            lines.append(f"its moving average (finetune.model_ema, decay {f.model_ema_decay}): top-1 "
                         f"{summary['top1_ema']:.2f}%  top-5 {summary['top5_ema']:.2f}% (convert_to_hf.py --weights "
                         "teacher exports it)")
        if init_kind(f.init) == "none":
            lines.append("init: none (from scratch): the baseline a pretrained init is compared with")
        else:
            try:
                knn = init_record(f.init)["summary"].get("knn")
            except (ValueError, OSError):
                knn = None
            lines.append(f"init: {f.init}; its kNN top-1 on its held-out split: "
                         f"{'n/a' if knn is None else f'{knn:.2f}%'} (compare with a finetune.init=none run of this "
                         "config: what pretraining bought)")
        return lines


@contextlib.contextmanager
def host_generators(seed: int, step: int):
    """Python's and NumPy's global generators seeded by (seed, step) for the block, then put back."""
    saved = random.getstate(), np.random.get_state()
    random.seed(seed * 1_000_003 + step)
    np.random.seed([seed, step])
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


def random_erase(images: torch.Tensor, prob: float) -> torch.Tensor:
    """timm's RandomErasing (per-pixel normal noise, one box of 2%-1/3 of the area, aspect 0.3-3.3) on a
    normalised batch, on its device."""
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(prob, mode="pixel", max_count=1, device=images.device)(images)  # in place


def first_shard(spec: str) -> list[str]:
    """The first shard `spec` names, where it can be read here (a local file that is not there is the
    loader's to report, as it reports any shard it cannot open)."""
    urls = expand_shards(spec)[:1]
    return [u for u in urls if "://" in u or u.startswith("pipe:") or Path(u).is_file()]


def labelled_keys(cfg, train_shards: str) -> tuple[list[str], dict[str, int]]:
    """The training images fine-tuning may use (label_list, or a class-balanced label_fraction) and
    every training image's label."""
    f = cfg.finetune
    labels = check_labels(expand_shards(train_shards), f.num_classes, "finetune.num_classes")
    if f.label_list is not None:
        return read_key_list(f.label_list, labels), labels
    return balanced_subset(labels, f.label_fraction, cfg.run.seed), labels
