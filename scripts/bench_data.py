"""Loader throughput: our shard pipeline against torchvision's ImageFolder + DataLoader.

Both sides decode the same JPEGs with PIL and run the same iBOT multi-crop augmentation (2 x 224
global + N x 96 local crops, flip, jitter, grayscale, blur, solarisation) with the same number of
worker processes. The baseline does what the DINO/iBOT code does: ToTensor + Normalize per crop in
the worker, default collate. Ours also draws the block masks and ships uint8 crops, which the
training process normalises on its device. Printed: images/s of each, per worker, and the ratio
ours / baseline (target >= 1.0) for what the loader delivers; and, separately, ours with that
normalisation done on this CPU in the consumer (on a GPU it is one fused op per batch, here it
competes with the workers for the same cores).

The images are real photographs (scikit-learn's two sample images), cut into ImageNet-sized JPEGs
(about 500 x 375, quality 90), written once into an ImageFolder tree and into shards.

    python scripts/bench_data.py --images 768 --workers 2 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.masking import MaskSampler  # noqa: E402
from data.pipeline import ShardLoader  # noqa: E402
from data.shards import expand_shards  # noqa: E402
from data.transforms import MultiCrop, normalize_batch  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_image_folder(root: Path, n: int, classes: int = 8) -> None:
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p) for p in load_sample_images().images]  # 427 x 640 each
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = int(rng.integers(300, 427)), int(rng.integers(400, 640))
        top, left = int(rng.integers(0, 427 - h + 1)), int(rng.integers(0, 640 - w + 1))
        img = Image.fromarray(photo[top : top + h, left : left + w]).resize((500, 375), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        d = root / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:06d}.JPEG", quality=90)


class Baseline:
    """DINO's DataAugmentationDINO: the same crops, each ToTensor + Normalize in the worker."""

    def __init__(self, mc: MultiCrop):
        from torchvision import transforms as T

        self.mc = mc
        self.to_float = T.Compose([T.ConvertImageDtype(torch.float32), T.Normalize(MEAN, STD)])

    def __call__(self, img):
        g, loc = self.mc(img)
        return [self.to_float(t) for t in g + loc]


def timed(batches, n: int, consume) -> float:
    it = iter(batches)
    consume(next(it))  # workers started, first batch out: start the clock
    start, images = time.perf_counter(), 0
    for _ in range(n):
        images += consume(next(it))
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=768)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=16, help="timed batches per side (after the first)")
    p.add_argument("--repeats", type=int, default=3, help="alternate the two sides this often; medians")
    p.add_argument("--local-crops", type=int, default=10)
    p.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "tmp" / "data")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    folder, shards = args.work_dir / "folder", args.work_dir / "shards"
    if not folder.is_dir():
        make_image_folder(folder, args.images)
    if not (shards / "manifest.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_shards.py"), str(folder), str(shards),
                        "--samples-per-shard", "64", "--workers", str(args.workers)], check=True)

    mc = MultiCrop(n_local=args.local_crops)  # iBOT defaults: 2 x 224 (0.32-1), N x 96 (0.05-0.32)
    masks = MaskSampler((14, 14), "block", (0.1, 0.5), 0.5)
    urls = expand_shards(str(shards))
    ours = ShardLoader(urls, augment=mc, mask_sampler=masks, batch_size=args.batch_size,
                       num_workers=args.workers, shuffle_buffer=256)

    def consume_ours(batch):
        return batch["labels"].numel()

    def consume_ours_normalized(batch):
        return normalize_batch(batch, MEAN, STD)["labels"].numel()

    from torchvision.datasets import ImageFolder

    base = torch.utils.data.DataLoader(ImageFolder(str(folder), transform=Baseline(mc)), batch_size=args.batch_size,
                                       shuffle=True, num_workers=args.workers, drop_last=True,
                                       persistent_workers=True)
    base_iter = _cycle(base)

    def consume_base(batch):
        crops, labels = batch
        return labels.numel()

    ours_iter = iter(ours)
    rates = {"ours": [], "ours_cpu_normalize": [], "baseline": []}
    for _ in range(args.repeats):  # alternate, so drift in machine load hits every side
        rates["baseline"].append(timed(base_iter, args.batches, consume_base))
        rates["ours"].append(timed(ours_iter, args.batches, consume_ours))
        rates["ours_cpu_normalize"].append(timed(ours_iter, args.batches, consume_ours_normalized))
    ours_rate, base_rate = float(np.median(rates["ours"])), float(np.median(rates["baseline"]))
    norm_rate = float(np.median(rates["ours_cpu_normalize"]))
    ratio = ours_rate / base_rate
    result = {
        "benchmark": f"data loader, iBOT multi-crop (2x224 + {args.local_crops}x96)",
        "ours_images_per_s": round(ours_rate, 1), "baseline_images_per_s": round(base_rate, 1),
        "ours_per_worker": round(ours_rate / max(1, args.workers), 1),
        "baseline_per_worker": round(base_rate / max(1, args.workers), 1),
        "ratio": round(ratio, 3),
        "ours_cpu_normalize_images_per_s": round(norm_rate, 1),
        "ratio_with_cpu_normalize": round(norm_rate / base_rate, 3),
        "workers": args.workers, "batch_size": args.batch_size,
        "timed_batches": args.batches, "repeats": args.repeats,
        "all_rates": {k: [round(r, 1) for r in v] for k, v in rates.items()},
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch thread(s) per process",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "pillow": Image.__version__},
        "command": "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + sys.argv[1:]),
    }
    print(f"ours     {ours_rate:8.1f} images/s ({result['ours_per_worker']:.1f} per worker)")
    print(f"baseline {base_rate:8.1f} images/s ({result['baseline_per_worker']:.1f} per worker)")
    print(f"ratio ours/baseline: {ratio:.2f}  (target >= 1.0)")
    print(f"ours + normalising on this CPU in the consumer: {norm_rate:.1f} images/s, "
          f"ratio {norm_rate / base_rate:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _cycle(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    sys.exit(main())
