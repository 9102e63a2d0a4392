"""The two frozen-feature protocols on any backbone: weighted kNN (DINO's) and a linear probe on
cached features (scripts/evaluate.py is the command line).

A backbone here is anything with `features(images) -> {"cls", "patch"}`, its `image_size`, `mean`
and `std` (export.backbones.LoadedBackbone reads every kind this project writes). Images are
resized (shorter side, bicubic) and centre-cropped to its resolution and normalised with its
training normalisation; each rank reads every world-size-th shard, and the features are gathered
once, to rank 0, which runs the protocol.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from data.digits import resolve_builtin
from data.pipeline import labelled_batches
from data.shards import expand_shards
from data.transforms import normalize

from .features import extract_features
from .knn import knn_classify
from .linear import linear_probe

POOLS = {"cls": "[CLS]", "avg": "mean patch token", "cls+avg": "[CLS] + mean patch token"}


class EvaluationError(ValueError):
    """The data to evaluate on cannot be found; the message says what to pass."""


def splits(train: str | None, val: str | None, run_config: dict | None, cache_dir: str) -> tuple[str, str]:
    """The labelled train and val shards: the ones given, else the run's own (builtin ones written to
    the run's cache directory, or `cache_dir`)."""
    if train is None:
        if run_config is None:
            raise EvaluationError("--train and --val are needed for an exported model")
        data = run_config["data"]
        train, val, cache_dir = data["train_shards"], val or data["val_shards"], data.get("cache_dir", cache_dir)
    train, val = resolve_builtin(train, val, cache_dir)
    if not val:
        raise EvaluationError(f"no validation shards for {train}; pass --val")
    return train, val


def pooled_features(backbone, urls: list[str], pool: str, batch_size: int, rank: int, world: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every image of `urls`, on rank 0 (`pool`: cls, avg or cls+avg)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def feats(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = backbone.features(x)
        parts = {"cls": [out["cls"]], "avg": [out["patch"].mean(1)]}
        return torch.cat([t for name in pool.split("+") for t in parts[name]], dim=1)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        return normalize(images.to(device), backbone.mean, backbone.std)

    size = backbone.image_size
    return extract_features(feats, labelled_batches(urls, size, batch_size, rank, world), prepare,
                            torch.zeros(1, 3, size, size, dtype=torch.uint8), device=device, progress=True,
                            everywhere=False)


def evaluate(backbone, protocol: str, train: str, val: str, pool: str, rank: int, world: int, device: torch.device,
             batch_size: int = 128, ks: tuple[int, ...] = (20,), temperature: float = 0.07,
             epochs: int = 100) -> dict | None:
    """Run `protocol` ("knn" or "linear") -> on rank 0 {"rows": (name, top-1, top-5) table rows,
    "record": what is appended to the results file, "train_images", "val_images", "extract_s"};
    None on the other ranks (a collective: every rank calls it)."""
    t0 = time.perf_counter()
    f_train, y_train = pooled_features(backbone, expand_shards(train), pool, batch_size, rank, world, device)
    f_val, y_val = pooled_features(backbone, expand_shards(val), pool, batch_size, rank, world, device)
    extract_s = time.perf_counter() - t0
    if rank != 0:
        return None
    rows = [("protocol", "top-1 %", "top-5 %")]
    if protocol == "knn":
        result = knn_classify(f_train, y_train, f_val, y_val, ks=tuple(ks), temperature=temperature)
        rows += [(f"kNN k={k} T={temperature}", f"{r['top1']:.2f}", f"{r['top5']:.2f}") for k, r in result.items()]
        record = {f"knn_k{k}_top1": r["top1"] for k, r in result.items()} | {
            f"knn_k{k}_top5": r["top5"] for k, r in result.items()}
    else:
        t1 = time.perf_counter()
        result = linear_probe(f_train.to(device), y_train.to(device), f_val.to(device), y_val.to(device),
                              epochs=epochs)
        rows.append((f"linear (lr {result['lr']}, picked on 10% of train)", f"{result['top1']:.2f}",
                     f"{result['top5']:.2f}"))
        record = {"linear_top1": result["top1"], "linear_top5": result["top5"], "linear_lr": result["lr"],
                  "linear_fit_s": round(time.perf_counter() - t1, 2)}
    record = {"eval": protocol, "features": POOLS[pool], "train": train, "val": val, **record}
    return {"rows": rows, "record": record, "train_images": len(y_train), "val_images": len(y_val),
            "extract_s": extract_s}


def append_result(path: Path, record: dict, step: int | None = None) -> Path:
    """One line of `record` (with the time and the backbone's step) appended to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": round(time.time(), 3), **({"step": step} if step is not None else {}),
                            **record}) + "\n")
    return path


def table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths), *lines[1:]])
