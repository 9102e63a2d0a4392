"""Save a tiny, randomly initialised CLIP model in open_clip's own format (models/teachers.py
`tiny_clip`): the frozen teacher of the CPU configs (configs/maskalign_vit_tiny.yaml,
configs/ibot_clip_vit_tiny.yaml).

    python scripts/make_tiny_clip.py                       # ~/.cache/mimscale/clip_vit_tiny.safetensors
    python scripts/make_tiny_clip.py /tmp/tiny_clip.pt     # .pt/.bin: torch.save; .safetensors otherwise
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.teachers import save_clip, tiny_clip  # noqa: E402

DEFAULT = "~/.cache/mimscale/clip_vit_tiny.safetensors"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=DEFAULT, help=f"output file (default {DEFAULT})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {save_clip(tiny_clip(args.seed), args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
