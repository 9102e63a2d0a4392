"""Pictures of a backbone and of a run (evaluation/pictures.py).

    python scripts/visualize.py attention runs/x                 # last block's [CLS] attention per head
    python scripts/visualize.py clusters out/vit-hf --k 5        # k-means of patch features (any backbone)
    python scripts/visualize.py masks --out m.png --config configs/ibot_vit_tiny.yaml data.batch_size=8
                                                                 # training views and their masks (overrides last)
    python scripts/visualize.py curves runs/x                    # metrics.jsonl as one PNG

Images: `--images a.jpg b.png ...`, else scikit-learn's two sample photos (or, for a run trained
on digits, its first held-out images), resized and centre-cropped to the backbone's resolution.
Each command prints the path of the PNG it wrote.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import pictures  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("attention", "clusters"):
        p = sub.add_parser(name)
        p.add_argument("backbone", help="run directory, checkpoint" + (", exported transformers dir or timm file"
                                                                       if name == "clusters" else ""))
        p.add_argument("--images", nargs="+")
        p.add_argument("--weights", choices=["auto", "teacher", "student"], default="auto")
        p.add_argument("--out")
        if name == "clusters":
            p.add_argument("--k", type=int, default=5)
    p = sub.add_parser("masks")
    p.add_argument("--config")
    p.add_argument("--views", type=int, default=6)
    p.add_argument("--out", default="masks.png")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("curves")
    p.add_argument("run")
    p.add_argument("--out")
    args = parser.parse_args(argv)

    if args.what == "curves":
        path, panels = pictures.curves_figure(Path(args.run) / "metrics.jsonl", Path(args.out or
                                                                                    Path(args.run) / "curves.png"))
        print(f"{path} ({', '.join(panels)})")
        return 0
    if args.what == "masks":
        from trainer.cli import training_views

        views, masks, mean, std, title = training_views(args.config, args.overrides, args.views)
        print(pictures.masks_figure(views, masks, mean, std, title, Path(args.out)))
        return 0
    from export.backbones import load_backbone

    try:
        backbone = load_backbone(args.backbone, args.weights)
    except (ValueError, FileNotFoundError) as e:
        print(f"visualize: {e}", file=sys.stderr)
        return 2
    x = pictures.sample_images(args.images, backbone)
    if args.what == "attention":
        if backbone.kind != "mimscale":
            print("visualize: attention maps need a run directory or checkpoint (the exported files are the same "
                  "weights)", file=sys.stderr)
            return 2
        if not backbone.num_prefix_tokens:
            print(f"visualize: {args.backbone} is a backbone without a [CLS] token (method {backbone.method}), so "
                  "there is no [CLS] attention to draw; use `visualize.py clusters`", file=sys.stderr)
            return 2
        path = pictures.attention_figure(backbone.model, x, backbone.mean, backbone.std,
                                         Path(args.out or "attention.png"))
    else:
        path = pictures.clusters_figure(backbone.features(x)["patch"], x, backbone.mean, backbone.std, args.k,
                                        Path(args.out or "clusters.png"))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
