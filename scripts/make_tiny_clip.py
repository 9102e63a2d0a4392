"""Save a tiny, randomly initialised CLIP model in open_clip's own format.

It is the frozen teacher of the CPU configs (configs/maskalign_vit_tiny.yaml,
configs/ibot_clip_vit_tiny.yaml) and of the tests: a real open_clip checkpoint (image and text
towers, open_clip's key names), only small, so the loading path is the one a ViT-L/14 file takes.

    python scripts/make_tiny_clip.py                       # ~/.cache/mimscale/clip_vit_tiny.safetensors
    python scripts/make_tiny_clip.py /tmp/tiny_clip.pt     # .pt/.bin: torch.save; .safetensors otherwise
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.teachers import TINY_CLIP_VISION  # noqa: E402

DEFAULT = "~/.cache/mimscale/clip_vit_tiny.safetensors"


def tiny_clip(seed: int = 0) -> torch.nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    return CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(**TINY_CLIP_VISION),
                text_cfg=CLIPTextCfg(context_length=16, vocab_size=1000, width=32, heads=2, layers=1))


def save(model: torch.nn.Module, path: str | Path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix in (".pt", ".bin", ".pth"):
        torch.save(state, tmp)
    else:
        from safetensors.torch import save_file

        save_file(state, str(tmp))
    tmp.replace(path)  # atomic: a half-written teacher never exists under the final name
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=DEFAULT, help=f"output file (default {DEFAULT})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = save(tiny_clip(args.seed), args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
