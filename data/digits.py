"""The embedded default data set: scikit-learn's digits as WebDataset shards.

1,797 real 8x8 grayscale scans of handwritten digits (10 classes), upsampled to `size` x `size`
RGB JPEGs and split into a training and a held-out validation part (stratified, fixed seed). They
are written once under `<cache_dir>/digits-<size>/{train,val}/` and reused; a `DONE` marker
naming the recipe is written last, so an interrupted first run (or a changed recipe) simply
writes them again.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .shards import write_manifest, write_shard

BUILTIN = "builtin:digits"
VAL_PER_CLASS = 30  # 300 of the 1,797 images held out for kNN
SAMPLES_PER_SHARD = 100


def digits_shards(cache_dir: str | Path, size: int = 64) -> dict[str, Path]:
    """Write the shards if needed; return {"train": dir, "val": dir}."""
    root = Path(cache_dir).expanduser() / f"digits-{size}"
    dirs = {split: root / split for split in ("train", "val")}
    recipe = {"size": size, "val_per_class": VAL_PER_CLASS, "samples_per_shard": SAMPLES_PER_SHARD}
    done = root / "DONE"
    if done.is_file() and json.loads(done.read_text() or "{}") == recipe:
        return dirs
    from sklearn.datasets import load_digits  # only needed on first use

    digits = load_digits()
    rng = np.random.default_rng(0)
    val_idx = []
    for c in range(10):  # stratified split, the same on every machine
        idx = np.flatnonzero(digits.target == c)
        val_idx += list(rng.choice(idx, size=VAL_PER_CLASS, replace=False))
    is_val = np.zeros(len(digits.target), dtype=bool)
    is_val[val_idx] = True
    for split, wanted in (("train", ~is_val), ("val", is_val)):
        indices = np.flatnonzero(wanted)
        shards = []
        for s, start in enumerate(range(0, len(indices), SAMPLES_PER_SHARD)):
            chunk = indices[start : start + SAMPLES_PER_SHARD]
            name = f"digits-{split}-{s:04d}.tar"
            samples = (_sample(digits.images[i], int(digits.target[i]), int(i), size) for i in chunk)
            shards.append({"name": name, "count": write_shard(dirs[split] / name, samples)})
        write_manifest(dirs[split], shards, [str(c) for c in range(10)],
                       {"source": "sklearn.datasets.load_digits", "split": split})
    done.write_text(json.dumps(recipe))
    return dirs


def _sample(image: np.ndarray, label: int, index: int, size: int) -> dict:
    pixels = (image * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return {"__key__": f"digit{index:04d}", "jpg": buf.getvalue(), "cls": label,
            "json": {"source": f"sklearn.datasets.load_digits[{index}]", "label": label}}


def resolve_builtin(train_shards: str, val_shards: str | None, cache_dir: str) -> tuple[str, str | None]:
    """Replace `builtin:digits` by the cached shard directories (writing them on first use)."""
    if train_shards.strip() != BUILTIN:
        return train_shards, val_shards
    dirs = digits_shards(cache_dir)
    return str(dirs["train"]), (val_shards if val_shards else str(dirs["val"]))
