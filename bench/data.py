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
scripts/bench_data.py is the command line.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.convert import convert_to_shards
from data.masking import MaskSampler
from data.pipeline import ShardLoader
from data.shards import expand_shards
from data.transforms import MultiCrop, normalize_batch

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


def measure(work_dir: Path, images: int = 768, workers: int = 2, batch_size: int = 32, batches: int = 16,
            repeats: int = 3, local_crops: int = 10) -> dict:
    """Images/s of the baseline and of ours (colour work in the workers, and on the consumer's device),
    `batches` timed batches each, alternated `repeats` times (medians), on images written once into
    `work_dir` -> the rates, their ratios to the baseline and the consumer's CPU cost per image."""
    torch.set_num_threads(1)
    folder, shards = work_dir / "folder", work_dir / "shards"
    if not folder.is_dir():
        make_image_folder(folder, images)
    if not (shards / "manifest.json").is_file():
        convert_to_shards(folder, shards, samples_per_shard=64, workers=workers, say=lambda line: None)

    mc = MultiCrop(n_local=local_crops)  # iBOT defaults: 2 x 224 (0.32-1), N x 96 (0.05-0.32)
    deferred = MultiCrop(n_local=local_crops, photometric="device", resize="torch")  # resize torch: opt-in
    masks = MaskSampler((14, 14), "block", (0.1, 0.5), 0.5)
    urls = expand_shards(str(shards))

    def loader(augment):
        return ShardLoader(urls, augment=augment, mask_sampler=masks, batch_size=batch_size,
                           num_workers=workers, shuffle_buffer=256)

    def consume(batch):
        return batch["labels"].numel()

    from torchvision.datasets import ImageFolder

    base = torch.utils.data.DataLoader(ImageFolder(str(folder), transform=Baseline(mc)), batch_size=batch_size,
                                       shuffle=True, num_workers=workers, drop_last=True, persistent_workers=True)
    iters = {"baseline": _cycle(base), "ours": iter(loader(mc)), "ours_colour_on_device": iter(loader(deferred))}
    rates = {k: [] for k in iters}
    for _ in range(repeats):  # alternate, so drift in machine load hits every side
        for name, it in iters.items():
            rates[name].append(timed(it, batches, consume if name != "baseline" else lambda b: b[1].numel()))
    # What the consumer then does with a deferred batch (colour work + normalisation, data/photometric.py):
    # on a GPU a few batched kernels; timed here on this CPU, one thread, for scale.
    batch = next(iters["ours_colour_on_device"])
    t0 = time.perf_counter()
    normalize_batch(batch, MEAN, STD)
    consumer_ms = (time.perf_counter() - t0) * 1e3 / batch["labels"].numel()
    med = {k: float(np.median(v)) for k, v in rates.items()}
    w = max(1, workers)
    return {
        "benchmark": f"data loader, iBOT multi-crop (2x224 + {local_crops}x96)",
        **{f"{k}_images_per_s": round(v, 1) for k, v in med.items()},
        **{f"{k}_per_worker": round(v / w, 1) for k, v in med.items()},
        "ratio": round(med["ours"] / med["baseline"], 3),
        "ratio_colour_on_device": round(med["ours_colour_on_device"] / med["baseline"], 3),
        "consumer_cpu_ms_per_image_colour_on_device": round(consumer_ms, 1),
        "workers": workers, "batch_size": batch_size, "timed_batches": batches, "repeats": repeats,
        "torch_threads_per_process": torch.get_num_threads(),
        "all_rates": {k: [round(r, 1) for r in v] for k, v in rates.items()},
    }


def report(result: dict) -> list[str]:
    w = max(1, result["workers"])
    return [f"baseline (torchvision ImageFolder + DataLoader) {result['baseline_images_per_s']:7.1f} images/s "
            f"({result['baseline_images_per_s'] / w:.1f} per worker)",
            f"ours, colour work in the workers (PIL)          {result['ours_images_per_s']:7.1f} images/s: "
            f"{result['ratio']:.2f}x",
            f"ours, colour work on the device, torch resize   {result['ours_colour_on_device_images_per_s']:7.1f} "
            f"images/s: {result['ratio_colour_on_device']:.2f}x (target >= 2)",
            f"  the consumer's share of that, on this CPU (one thread): "
            f"{result['consumer_cpu_ms_per_image_colour_on_device']:.1f} ms per image "
            "(a GPU runs it as batched kernels)"]


def _cycle(loader):
    while True:
        yield from loader

