"""An ImageFolder tree or a `path<TAB>label` list converted into WebDataset tar shards
(scripts/make_shards.py is the command line).

ImageFolder: one sub-directory per class (ImageNet-22K's `nXXXXXXXX/`), classes indexed in sorted
order. List file: `path<TAB>label` per line; integer labels are kept, names are indexed in sorted
order; relative paths are read from the list's directory.

Each sample holds `jpg` (JPEG files are copied byte for byte; other formats are re-encoded at
quality 95), `cls` (class index) and `json` (source path, class name). Samples are shuffled with
`--seed` before sharding, so every shard mixes classes. Output: `<prefix>-NNNNNN.tar`,
`classes.json`, and `manifest.json` (per-shard counts, totals, unreadable sources).

Shards are written atomically; an interrupted conversion run again with the same arguments
keeps the shards already written and writes only the rest.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .shards import write_manifest, write_shard

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}


class SourceError(ValueError):
    """The source names no images, or a list file line is malformed; nothing was written."""


def scan_image_folder(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise SourceError(f"{root}: no class sub-directories (expected an ImageFolder tree)")
    items = []
    for idx, name in enumerate(classes):
        for dirpath, _, files in os.walk(root / name):
            items += [(os.path.join(dirpath, f), idx) for f in sorted(files)
                      if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    return items, classes


def read_list(path: Path) -> tuple[list[tuple[str, int]], list[str]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2:
            raise SourceError(f"{path}:{n}: expected 'path<TAB>label', got {line!r}")
        file, label = parts
        rows.append((file if os.path.isabs(file) else str(path.parent / file), label.strip()))
    if all(label.lstrip("-").isdigit() for _, label in rows):
        labels = [int(label) for _, label in rows]
        classes = [str(i) for i in range(max(labels) + 1)] if labels else []
        return [(f, int(label)) for f, label in rows], classes
    classes = sorted({label for _, label in rows})
    index = {c: i for i, c in enumerate(classes)}
    return [(f, index[label]) for f, label in rows], classes


def encode(path: str) -> bytes:
    """JPEG bytes of an image file; JPEGs are copied untouched."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:3] == b"\xff\xd8\xff":
        return raw
    with Image.open(io.BytesIO(raw)) as img:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_one(task: tuple[Path, int, list[tuple[int, str, int]], list[str]]) -> dict:
    out, shard_index, items, classes = task
    skipped: list[str] = []

    def samples():
        for index, path, label in items:
            try:
                jpg = encode(path)
            except Exception as e:  # noqa: BLE001 - an unreadable source is skipped and reported
                skipped.append(f"{path}: {type(e).__name__}")
                continue
            yield {"__key__": f"s{index:09d}", "jpg": jpg, "cls": label,
                   "json": {"path": path, "class": classes[label] if label < len(classes) else str(label)}}

    count = write_shard(out, samples())
    return {"name": out.name, "count": count, "skipped": skipped}


def count_members(path: Path) -> int:
    with tarfile.open(path) as tar:
        return len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isreg()})


def convert_to_shards(source: Path, out: Path, samples_per_shard: int = 1000, workers: int = 1,
                      prefix: str = "shard", seed: int = 0, shuffle: bool = True, say=print) -> dict:
    """Write `source` (an ImageFolder root or a list file) as shards in `out`, resuming: shards already
    there are kept. -> the manifest's summary: {"manifest", "samples", "shards", "unreadable"}."""
    if source.is_dir():
        items, classes = scan_image_folder(source)
    elif source.is_file():
        items, classes = read_list(source)
    else:
        raise SourceError(f"{source}: no such directory or list file")
    if not items:
        raise SourceError(f"{source}: no images found")
    order = list(range(len(items)))
    if shuffle:
        random.Random(seed).shuffle(order)
    out.mkdir(parents=True, exist_ok=True)
    n = samples_per_shard
    tasks, done = [], []
    for s, start in enumerate(range(0, len(order), n)):
        path = out / f"{prefix}-{s:06d}.tar"
        if path.is_file():  # written atomically: present means complete
            count = count_members(path)
            # sources skipped when it was written: known by number only
            lost = [f"(unnamed: an earlier run skipped it in {path.name})"] * (len(order[start : start + n]) - count)
            done.append({"name": path.name, "count": count, "skipped": lost})
            continue
        tasks.append((path, s, [(i, *items[i]) for i in order[start : start + n]], classes))
    say(f"{len(items)} images, {len(classes)} classes -> {len(done) + len(tasks)} shards ({len(done)} already written)")
    results = list(done)
    with Pool(min(workers, max(1, len(tasks)))) as pool:
        for result in tqdm(pool.imap_unordered(write_one, tasks), total=len(tasks), unit="shard"):
            results.append(result)
        # Let the workers take their sentinels and exit: leaving the block terminates the pool, which
        # can find a worker waiting for the queue's lock and, where SIGTERM is ignored (an sbatch
        # script, a process after launch.main), joins it for ever.
        pool.close()
        pool.join()
    results.sort(key=lambda r: r["name"])
    skipped = [s for r in results for s in r.pop("skipped")]
    manifest = write_manifest(out, results, classes, {
        "source": str(source.resolve()), "seed": seed, "shuffled": shuffle, "samples_per_shard": n,
        "unreadable": skipped})
    return {"manifest": manifest, "samples": sum(r["count"] for r in results), "shards": len(results),
            "unreadable": skipped}
