"""iTPN's exported file: HiViT with its feature pyramid (models/pyramid.py HiViTFPN) in one
safetensors file whose metadata carries the architecture record (the method's `export_spec().arch`),
so `load_itpn` rebuilds it strictly (transformers has no HiViT class). A fine-tuned HiViT is written
the same way, as a classifier (`load_hivit_classifier`). scripts/convert_to_hf.py writes both
(export/convert.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from models.hivit import HiViT, build_hivit
from models.pyramid import HiViTFPN, build_itpn


def save_itpn(state: dict[str, torch.Tensor], arch: dict, path: str | Path, extra: dict | None = None) -> Path:
    """One safetensors file: a `HiViTFPN` state (backbone.*, pyramid.*), the architecture record and
    `extra` (JSON values) in its metadata."""
    from safetensors.torch import save_file

    meta = {"format": "mimscale-itpn", "itpn_arch": json.dumps(arch),
            **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=meta)
    return path


def load_itpn(path: str | Path) -> tuple[HiViTFPN, dict]:
    """-> (the model, rebuilt from the file's metadata and loaded strictly, in eval mode; the metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "mimscale-itpn":
        raise ValueError(f"{path} is not an iTPN export (no format=mimscale-itpn in its metadata)")
    model = build_itpn(json.loads(meta["itpn_arch"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), {k: json.loads(v) for k, v in meta.items() if k != "format"}


CLASSIFIER_FILE = "hivit_classifier.safetensors"


class HiViTClassifier(nn.Module):
    """iTPN's classification model (itpn_clip/modeling_finetune.py): HiViT without the pyramid, its
    mean stride-16 token through `fc_norm`, a linear head; the layout of a finetune run's student."""

    def __init__(self, backbone: HiViT, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc_norm = nn.LayerNorm(backbone.embed_dim, eps=1e-6)
        self.head = nn.Linear(backbone.embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(self.backbone(x)))


def save_hivit_classifier(state: dict[str, torch.Tensor], arch: dict, path: str | Path, extra: dict) -> Path:
    """backbone.*, fc_norm.*, head.* in one safetensors file, with the record that rebuilds the HiViT
    (`arch`: arch, image_size, patch_size, layer_scale) and `extra` (JSON values: labels, ...)."""
    from safetensors.torch import save_file

    meta = {"format": "mimscale-hivit-classifier", "hivit_arch": json.dumps(arch),
            **{k: json.dumps(v) for k, v in extra.items()}}
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=meta)
    return Path(path)


def load_hivit_classifier(path: str | Path) -> tuple[HiViTClassifier, dict]:
    """-> (the classifier, rebuilt from the file's metadata and loaded strictly, in eval mode; the metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "mimscale-hivit-classifier":
        raise ValueError(f"{path} is not a HiViT classifier export (no format=mimscale-hivit-classifier)")
    arch = json.loads(meta["hivit_arch"])
    state = load_file(str(path))
    backbone = build_hivit(arch["arch"], img_size=arch["image_size"], patch_size=arch["patch_size"],
                           layer_scale=arch.get("layer_scale"), pos_embed="learned")
    model = HiViTClassifier(backbone, state["head.weight"].shape[0])
    model.load_state_dict(state, strict=True)
    return model.eval(), {k: json.loads(v) for k, v in meta.items() if k != "format"}
