"""Loader throughput: our shard pipeline against torchvision's ImageFolder + DataLoader.

Both sides decode the same JPEGs with PIL and run the same iBOT multi-crop augmentation (2 x 224
global + N x 96 local crops, flip, jitter, grayscale, blur, solarisation) with the same number of
worker processes. The baseline does what the DINO/iBOT code does: ToTensor + Normalize per crop in
the worker, default collate. Ours draws the block masks too and ships uint8 crops, normalised by
the training process on its device; measured twice: with the colour work in the workers (PIL,
data.augment.photometric worker) and with it left to the consumer's device (photometric device and
resize torch, opt-in: the workers decode, crop with torch's uint8 antialiased bicubic
and flip, and ship each crop's drawn parameters).
Printed: images/s of each, per worker, the ratios to the baseline (target >= 2 for the second), and
what the consumer's share costs on this CPU, for scale (on a GPU, a few batched kernels).

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
        g, loc = self.mc(img)[:2]
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
    deferred = MultiCrop(n_local=args.local_crops, photometric="device", resize="torch")  # resize torch: opt-in
    masks = MaskSampler((14, 14), "block", (0.1, 0.5), 0.5)
    urls = expand_shards(str(shards))

    def loader(augment):
        return ShardLoader(urls, augment=augment, mask_sampler=masks, batch_size=args.batch_size,
                           num_workers=args.workers, shuffle_buffer=256)

    def consume(batch):
        return batch["labels"].numel()

    from torchvision.datasets import ImageFolder

    base = torch.utils.data.DataLoader(ImageFolder(str(folder), transform=Baseline(mc)), batch_size=args.batch_size,
                                       shuffle=True, num_workers=args.workers, drop_last=True,
                                       persistent_workers=True)
    iters = {"baseline": _cycle(base), "ours": iter(loader(mc)), "ours_colour_on_device": iter(loader(deferred))}
    rates = {k: [] for k in iters}
    for _ in range(args.repeats):  # alternate, so drift in machine load hits every side
        for name, it in iters.items():
            rates[name].append(timed(it, args.batches, consume if name != "baseline" else lambda b: b[1].numel()))
    # What the consumer then does with a deferred batch (colour work + normalisation, data/photometric.py):
    # on a GPU a few batched kernels; timed here on this CPU, one thread, for scale.
    batch = next(iters["ours_colour_on_device"])
    t0 = time.perf_counter()
    normalize_batch(batch, MEAN, STD)
    consumer_ms = (time.perf_counter() - t0) * 1e3 / batch["labels"].numel()
    med = {k: float(np.median(v)) for k, v in rates.items()}
    w = max(1, args.workers)
    result = {
        "benchmark": f"data loader, iBOT multi-crop (2x224 + {args.local_crops}x96)",
        **{f"{k}_images_per_s": round(v, 1) for k, v in med.items()},
        **{f"{k}_per_worker": round(v / w, 1) for k, v in med.items()},
        "ratio": round(med["ours"] / med["baseline"], 3),
        "ratio_colour_on_device": round(med["ours_colour_on_device"] / med["baseline"], 3),
        "consumer_cpu_ms_per_image_colour_on_device": round(consumer_ms, 1),
        "workers": args.workers, "batch_size": args.batch_size,
        "timed_batches": args.batches, "repeats": args.repeats,
        "all_rates": {k: [round(r, 1) for r in v] for k, v in rates.items()},
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch thread(s) per process",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "pillow": Image.__version__},
        "command": "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + sys.argv[1:]),
    }
    print(f"baseline (torchvision ImageFolder + DataLoader) {med['baseline']:7.1f} images/s "
          f"({med['baseline'] / w:.1f} per worker)")
    print(f"ours, colour work in the workers (PIL)          {med['ours']:7.1f} images/s: {result['ratio']:.2f}x")
    print(f"ours, colour work on the device, torch resize   {med['ours_colour_on_device']:7.1f} images/s: "
          f"{result['ratio_colour_on_device']:.2f}x (target >= 2)")
    print(f"  the consumer's share of that, on this CPU (one thread): {consumer_ms:.1f} ms per image "
          "(a GPU runs it as batched kernels)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _cycle(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    sys.exit(main())
