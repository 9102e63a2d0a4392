"""iTPN's exported file: HiViT with its feature pyramid (models/pyramid.py HiViTFPN) in one
safetensors file whose metadata carries the architecture record (the method's `export_spec().arch`),
so `load_itpn` rebuilds it strictly (transformers has no HiViT class). scripts/convert_to_hf.py
writes it (export/convert.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
