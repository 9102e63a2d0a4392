"""Write a pretrained backbone from a checkpoint to one safetensors file (timm's key layout).

    python scripts/export_backbone.py runs/x/checkpoints/step00100000 vit.safetensors
    python scripts/export_backbone.py runs/x/checkpoints/latest student.safetensors --which student

Only the backbone is written: projection heads, MaskAlign's alignment modules (adapters and W),
iBOT+CLIP's distillation adapter and the frozen teachers exist only for pretraining and are left
out. The student comes from DeepSpeed's consolidated fp32 weights (zero_to_fp32); the EMA teacher
from our fp32 shadow slices (`rankNNNNN.pt`), reassembled in ZeRO-3's partition order. The file
loads with `load_state_dict(strict=True)` into `models.vit.build_vit(arch)` (the run's
`config.yaml` names the arch) and into the matching timm ViT (mask_token aside).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

BACKBONE = "backbone."


def resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.name == "latest" and path.is_file():
        path = path.parent / path.read_text().strip()
    if not (path / "COMPLETE").is_file():
        raise SystemExit(f"export_backbone: {path} is not a complete checkpoint (no COMPLETE marker)")
    from trainer.checkpoint import UntrustedFileError, check_weights_only

    try:  # DeepSpeed's zero_to_fp32 unpickles with weights_only=False: vet every file first
        for f in sorted(path.glob("*.pt")):
            check_weights_only(f)
    except UntrustedFileError as e:
        raise SystemExit(f"export_backbone: {e}") from None
    return path


def student_backbone(ckpt: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    prefix = "student." + BACKBONE
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def teacher_backbone(ckpt: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The EMA teacher's fp32 shadow: per-rank flat slices (ZeRO-3) or whole tensors (ZeRO-0/1/2)."""
    parts = [torch.load(p, map_location="cpu", weights_only=True) for p in sorted(ckpt.glob("rank*.pt"))]
    if not parts or "ema" not in parts[0]:
        raise SystemExit(f"export_backbone: {ckpt} has no EMA teacher (this method has none): use --which student")
    names = parts[0]["ema"]["names"]
    out = {}
    for i, name in enumerate(names):
        if not name.startswith(BACKBONE):
            continue
        key = name[len(BACKBONE):]
        slices = [p["ema"]["shadow"][i].flatten() for p in parts]
        n = math.prod(shapes[key])
        whole = slices[0] if slices[0].numel() == n else torch.cat(slices)[:n]  # ZeRO-3 pads the last slice
        out[key] = whole.reshape(shapes[key]).clone()
    return out


def export(ckpt: str | Path, which: str = "auto") -> tuple[dict[str, torch.Tensor], dict]:
    """-> (backbone state dict, the run's config). which: teacher, student, or auto (the EMA teacher
    where the method has one, else the student)."""
    ckpt = resolve(ckpt)
    student = student_backbone(ckpt)
    if which == "auto":
        which = "teacher" if "ema" in torch.load(ckpt / "rank00000.pt", map_location="cpu", weights_only=True) \
            else "student"
    state = student if which == "student" else teacher_backbone(ckpt, {k: v.shape for k, v in student.items()})
    config = json.loads(torch.load(ckpt / "rank00000.pt", map_location="cpu", weights_only=True)["config"])
    return state, config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory (stepNNNNNNNN) or the run's checkpoints/latest")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--which", choices=["auto", "teacher", "student"], default="auto",
                        help="the EMA teacher (what iBOT evaluates), the student, or auto: the teacher where "
                             "the method has one (ibot, ibot_clip), else the student (maskalign)")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    state, config = export(args.checkpoint, args.which)
    meta = {"arch": config["model"]["arch"], "patch_size": str(config["model"]["patch_size"]),
            "method": config["method"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
    print(f"wrote {out}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.1f}M parameters")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
