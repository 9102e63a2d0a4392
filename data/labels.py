"""Which training images carry a label: every sample's class read off the shards, a seeded
class-balanced fraction of them (iBOT / SimCLRv2's semi-supervised protocol), or a list of keys.

Reading the labels of a local shard reads the tar headers and the small `.cls` members only (the
images are seeked over); a remote shard is streamed whole.
"""

from __future__ import annotations

import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from .shards import IMAGE_KEYS, read_shard


class LabelError(ValueError):
    """Labels that cannot train a classifier; the message names the shard or file and says why.
    `kind`: "unlabelled" (no usable `.cls`), "range" (outside the classes), "list" (the key list)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _parse(raw: bytes | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def shard_labels(url: str, limit: int | None = None) -> dict[str, int | None]:
    """{sample key: its label, None without a usable `cls`} of one shard's samples that have an
    image, in tar order (the first `limit` of them)."""
    images, labels = [], {}
    if "://" not in url and not url.startswith("pipe:") and Path(url).is_file():
        with tarfile.open(url) as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name)
                if key is None:
                    continue
                ext = ext.lower()
                if ext in IMAGE_KEYS:
                    images.append(key)
                elif ext == "cls":
                    labels[key] = _parse(tar.extractfile(member).read())
                if limit is not None and len(images) >= limit and key != images[-1]:
                    break
    else:
        for raw in read_shard(url, Counter()):
            if any(k in raw for k in IMAGE_KEYS):
                images.append(raw["__key__"])
                labels[raw["__key__"]] = _parse(raw.get("cls"))
            if limit is not None and len(images) >= limit:
                break
    return {k: labels.get(k) for k in images[:limit]}


def check_labels(urls: list[str], num_classes: int, source: str, limit: int | None = None) -> dict[str, int]:
    """Every sample of `urls` (each shard's first `limit`) must have a label in [0, num_classes):
    -> {key: label}; a LabelError naming the first shard that breaks it (`source`: where
    num_classes was set, for the message)."""
    out: dict[str, int] = {}
    for url in urls:
        labels = shard_labels(url, limit)
        missing = [k for k, v in labels.items() if v is None]
        if missing:
            raise LabelError("unlabelled", f"{url}: {len(missing)} of its {len(labels)} images have no label (a `.cls` "
                             f"member holding an integer), e.g. {missing[0]}: fine-tuning needs labelled shards "
                             "(scripts/make_shards.py writes them from an ImageFolder)")
        wrong = {k: v for k, v in labels.items() if not 0 <= v < num_classes}
        if wrong:
            key, value = next(iter(wrong.items()))
            raise LabelError("range", f"{url}: label {value} of {key} is outside [0, {num_classes}) "
                             f"({source}); {len(wrong)} such images in this shard")
        out.update(labels)
    return out


def balanced_subset(labels: dict[str, int], fraction: float, seed: int) -> list[str]:
    """The same `fraction` of each class (at least one image per class), chosen with `seed`: a pure
    function of the labels, the fraction and the seed, whatever the shard order."""
    by_class: dict[int, list[str]] = defaultdict(list)
    for key, label in labels.items():
        by_class[label].append(key)
    chosen = []
    for label, keys in sorted(by_class.items()):
        keys.sort()
        rng = np.random.default_rng([seed, label])
        n = max(1, round(fraction * len(keys)))
        chosen += [keys[i] for i in sorted(rng.choice(len(keys), size=n, replace=False))]
    return sorted(chosen)


def read_key_list(path: str | Path, known: dict[str, int]) -> list[str]:
    """A file of sample keys (one per line, `#` comments; a key may carry its image's extension or a
    directory, as the iBOT / SimCLRv2 1% and 10% ImageNet lists do): every one must be a training image."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LabelError("list", f"{path} does not exist")
    keys = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name = line.rsplit("/", 1)[-1]
            keys.append(name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1].lower() in IMAGE_KEYS else name)
    if not keys:
        raise LabelError("list", f"{path} names no images")
    missing = [k for k in keys if k not in known]
    if missing:
        raise LabelError("list", f"{path} names {len(missing)} images that are not in the training shards, e.g. "
                         f"{missing[0]}")
    return sorted(set(keys))


def class_counts(labels: dict[str, int], keys: list[str]) -> dict[int, int]:
    return dict(sorted(Counter(labels[k] for k in keys).items()))
