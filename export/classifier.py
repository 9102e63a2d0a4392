"""A fine-tuning run (method finetune) as an image classifier: a `transformers` directory that
`pipeline("image-classification")` loads, with `id2label`, and a timm file with its classifier.

Which `transformers` class holds which head (our head reads one of two features, `finetune.pool`):
- [CLS] after the final norm (iBOT's --use_cls) on a plain ViT: `ViTForImageClassification`, whose
  classifier reads exactly that token.
- [CLS] on a ViT with layer-scale: `Dinov2ForImageClassification`. Its classifier reads [CLS] and
  the mean patch token side by side, so our head's weights fill the [CLS] half and the other half
  is zeros: the same logits. (ViT-g/14 and G/14, whose MLP is not a whole multiple of their width,
  stay `ViTForImageClassification` with the gammas folded, as the backbone export does.)
- the mean patch token through `fc_norm` (BEiT, MAE, MaskAlign), or any BEiT backbone:
  `BeitForImageClassification` with `use_mean_pooling` (its pooler is that LayerNorm over the
  mean of the patch tokens, with no final norm before it) or without it ([CLS]). A plain ViT goes
  there too: absolute positions and no relative bias are BeitConfig options, and the key bias it
  drops changes no logit (export/hf.py).

The timm file is timm's `VisionTransformer` (or `Beit`) with `num_classes` and `global_pool`
"avg" (timm then uses `fc_norm` and no final norm, our layout) or "token".
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

import export.hf as hf
from export.backbones import from_backbone, relative_error
from trainer.weights import Backbone, ExportError

HF_PREFIX = {"ViTForImageClassification": "vit.", "Dinov2ForImageClassification": "dinov2.",
             "Dinov2WithRegistersForImageClassification": "dinov2_with_registers.",
             "BeitForImageClassification": "beit."}


@dataclasses.dataclass
class Parts:
    """A fine-tuning checkpoint split: its backbone (a `Backbone` of our ViT's names, as pretraining
    exports are), the head's input (`pool`), fc_norm (average pooling) and the head."""

    backbone: Backbone
    source: Backbone  # the whole checkpoint (backbone.*, fc_norm.*, head.*)
    pool: str  # "avg" | "cls"
    fc_norm: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    labels: list[str]

    @property
    def num_classes(self) -> int:
        return self.head["weight"].shape[0]


def split(b: Backbone, labels: list[str] | None = None) -> Parts:
    """`b.state` holds backbone.*, fc_norm.* and head.* (Method.export_parts of finetune)."""

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in b.state.items() if k.startswith(prefix)}

    head = part("head.")
    if "weight" not in head:
        raise ExportError(f"{b.checkpoint}: a {b.config['method']} checkpoint without a classifier head")
    backbone = part("backbone.")
    n = head["weight"].shape[0]
    if labels is None:
        labels = [str(i) for i in range(n)]
    if len(labels) != n:
        raise ExportError(f"--labels names {len(labels)} classes, the head has {n}")
    pool = b.spec.arch["pool"]  # (the method's record: trainer/methods/finetune.py export_spec)
    return Parts(dataclasses.replace(b, state=backbone), b, pool, part("fc_norm."), head, list(labels))


def read_labels(path: str | Path) -> list[str]:
    """A label file: one class name per line, in class order (blank lines are errors: a name per class)."""
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as e:
        raise ExportError(f"--labels {path}: {e.strerror or e}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or any(not line.strip() for line in lines):
        raise ExportError(f"{path}: one class name per line, none blank")
    return [line.strip() for line in lines]


# ---------------------------------------------------------------- transformers


def hf_classifier(p: Parts):
    """(transformers class, its config) for this classifier, id2label set."""
    from transformers import BeitForImageClassification, Dinov2ForImageClassification, ViTForImageClassification

    d = hf.shapes(p.backbone)
    if p.pool == "avg" or hf.is_beit(d):
        cls, config = BeitForImageClassification, hf.beit_config(p.backbone, d)
        config.use_mean_pooling = p.pool == "avg"
        config.use_mask_token = False
    else:
        base, config, _ = hf.hf_model_and_config(p.backbone)
        import transformers

        cls = {"Dinov2Model": Dinov2ForImageClassification, "ViTModel": ViTForImageClassification}.get(
            base.__name__) or getattr(transformers, base.__name__.replace("Model", "ForImageClassification"))
        if hasattr(config, "use_mask_token"):
            config.use_mask_token = False
    config.num_labels = p.num_classes
    config.id2label = dict(enumerate(p.labels))
    config.label2id = {name: i for i, name in enumerate(p.labels)}
    return cls, config


def hf_state(p: Parts, cls: type, expected: dict[str, torch.Size], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our tensors under `cls`'s names (`expected`: its state dict's names and shapes)."""
    prefix = HF_PREFIX[cls.__name__]
    kind = {"Dinov2ForImageClassification": "dinov2", "Dinov2WithRegistersForImageClassification": "dinov2",
            "BeitForImageClassification": "beit"}.get(cls.__name__, "vit")
    state = p.backbone.state
    if kind == "beit":
        state = hf.qv_biases(state, zeros=True)
    elif kind == "dinov2":
        state = hf.with_layer_scale(state)
    elif p.backbone.layer_scale and kind == "vit":
        state = hf.fold_layer_scale(state)
    base = {k[len(prefix):]: v for k, v in expected.items() if k.startswith(prefix) and ".pooler." not in f".{k}"}
    out = {prefix + k: v for k, v in hf.to_hf_state(state, base, kind, dtype).items()}
    weight, bias = p.head["weight"], p.head["bias"]
    if kind == "dinov2":  # its classifier reads [CLS, mean patch]: the second half stays zero
        weight = torch.cat([weight, torch.zeros_like(weight)], dim=1)
    out["classifier.weight"], out["classifier.bias"] = weight.to(dtype), bias.to(dtype)
    if p.pool == "avg":
        for name in ("weight", "bias"):
            out[f"{prefix}pooler.layernorm.{name}"] = p.fc_norm[name].to(dtype)
    missing, unexpected = set(expected) - set(out), set(out) - set(expected)
    if missing or unexpected:
        raise ExportError(f"{cls.__name__}: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
    return out


def save_hf_classifier(p: Parts, out: Path, dtype: torch.dtype) -> type:
    cls, config = hf_classifier(p)
    b = p.backbone
    config.mimscale = {"method": b.config["method"], "step": b.step, "checkpoint": str(b.checkpoint),
                       "top1": held_out_top1(b), "init": b.spec.arch["init"]}
    with torch.device("meta"):
        model = cls(config)
    state = hf_state(p, cls, {k: v.shape for k, v in model.state_dict().items()}, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(dtype)
    model.save_pretrained(out)
    return cls


def held_out_top1(b: Backbone) -> float | None:
    """The run's own held-out top-1 of this checkpoint's weights (the classifier's, or its moving
    average's for the teacher: finetune.model_ema), where it measured them."""
    s = b.summary
    if s.get("held_out_step") == b.step:
        return s.get("top1_ema" if b.which == "teacher" else "top1")
    if s.get("best_top1_step") == b.step and b.which == "student":
        return s.get("best_top1")
    return None


# ---------------------------------------------------------------- timm


def timm_classifier(p: Parts) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(timm name, create_model kwargs with num_classes and global_pool, state)."""
    name, kwargs = hf.timm_call(p.backbone)
    kwargs.update(num_classes=p.num_classes, global_pool="avg" if p.pool == "avg" else "token")
    if p.pool == "avg":
        kwargs["fc_norm"] = True
    if hf.is_beit(hf.shapes(p.backbone)):
        kwargs.pop("fc_norm", None)  # timm's Beit takes its fc_norm from global_pool
    return name, kwargs, {**hf.timm_state(p.backbone, torch.float32), **{f"head.{k}": v for k, v in p.head.items()},
                          **{f"fc_norm.{k}": v for k, v in p.fc_norm.items()}}


def load_timm_classifier(file: str | Path):
    """The timm classifier a `timm_model.safetensors` of a fine-tuning export holds (strictly)."""
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
    model = timm.create_model(meta["timm_name"], pretrained=False, **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(load_file(str(file)), strict=True)
    return model.eval()


def timm_classifier_snippet(name: str, kwargs: dict, file: str) -> str:
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={file!r}, "
            f"custom_load=False, num_classes={kwargs['num_classes']}){extra})")


# ---------------------------------------------------------------- ours, for the check


class OurClassifier(nn.Module):
    """The fine-tuned network as the run computed it: our ViT, fc_norm (average pooling), the head."""

    def __init__(self, p: Parts):
        super().__init__()
        self.backbone = from_backbone(p.source).model
        if p.pool == "avg":
            self.backbone.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(p.fc_norm["weight"].shape[0], eps=1e-6)
            self.fc_norm.load_state_dict(p.fc_norm)
        else:
            self.fc_norm = nn.Identity()
        self.head = nn.Linear(*reversed(p.head["weight"].shape))
        self.head.load_state_dict(p.head)
        self.pool = p.pool

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_features(x)
        pooled = out["patch"].mean(dim=1) if self.pool == "avg" else out["cls"]
        return self.head(self.fc_norm(pooled))


def model_card(p: Parts, hf_class: str, timm_line: str, out: Path, command: str, errors: dict) -> str:
    b, c = p.backbone, p.backbone.config
    f = b.spec.arch
    top1 = held_out_top1(b)
    labelled = f["labelled"]
    check_line = ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) if errors else "skipped (--no-check)"
    start = b.summary.get("top1_random_init")
    head_input = "the mean patch token through fc_norm" if p.pool == "avg" else "the [CLS] token"
    more = " ..." if p.num_classes > 5 else ""
    return f"""---
library_name: transformers
tags: [vision, image-classification, mimscale, finetune]
pipeline_tag: image-classification
---

# {c['model']['arch']}/{c['model']['patch_size']} fine-tuned with mimscale: {p.num_classes} classes

- **Classifier**: `{hf_class}`, the head on {head_input}; labels {p.labels[:5]}{more}.
- **Weights**: {'the moving average (finetune.model_ema)' if b.which == 'teacher' else 'the fine-tuned network'}.
- **Started from**: `{f['init']}` ({f['weights']} weights; `none` is from scratch).
- **Fine-tuned**: step {b.step} of {c['schedule']['steps']} on `{c['data']['train_shards']}`, {labelled}.
- **Held-out top-1 of these weights** (`{c['data'].get('val_shards')}`): {'n/a' if top1 is None else f'{top1:.2f}%'};
  before fine-tuning {'n/a' if start is None else f'{start:.2f}%'}, chance {100 / p.num_classes:.2f}%.
- **Produced by**: `{b.command or 'not recorded'}`; **converted by**: `{command}`.
- **Export check** (relative logit error against mimscale's network on two photos): {check_line}.

## Use

```python
from transformers import pipeline
classify = pipeline("image-classification", model="{out}")
classify(image)  # [{{"label": ..., "score": ...}}, ...]
```

With timm: `{timm_line}`.
"""


def check_classifier(p: Parts, out: Path, timm_file: Path, pixels: torch.Tensor, tolerance: float) -> dict:
    """Logits of what was written (transformers, timm) against ours on `pixels`; raises past `tolerance`."""
    from transformers import AutoModelForImageClassification

    reference = OurClassifier(p).eval()(pixels)
    hf = AutoModelForImageClassification.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = {"transformers": hf(pixel_values=pixels).logits, "timm": load_timm_classifier(timm_file).float()(pixels)}
    errors = {k: relative_error(reference, v) for k, v in got.items()}
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    if bad or not all(math.isfinite(v) for v in errors.values()):
        raise ExportError(f"check failed: the exported logits differ from ours by {bad or errors} (relative; "
                          f"tolerance {tolerance}); nothing was written")
    return errors
