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
from .linear_grid import BLOCKS, grid_features, log_regression, score_grid, split_held_out, train_grid

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


def block_features(backbone, urls: list[str], batch_size: int, rank: int, world: int, device: torch.device,
                   transform=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(DINOv2 grid features [N, (t + 1) C] of the last t = min(4, depth) blocks, labels) of every image
    of `urls` (centre crops, or `transform`'s), on rank 0 (evaluation/linear_grid.py)."""

    def feats(x: torch.Tensor) -> torch.Tensor:
        return grid_features(backbone.block_tokens(x, min(BLOCKS, backbone.depth)))

    def prepare(images: torch.Tensor) -> torch.Tensor:
        return normalize(images.to(device), backbone.mean, backbone.std)

    size = backbone.image_size
    return extract_features(feats, labelled_batches(urls, size, batch_size, rank, world, transform=transform), prepare,
                            torch.zeros(1, 3, size, size, dtype=torch.uint8), device=device, progress=True,
                            everywhere=False)


def linear_grid(backbone, train: str, val: str, rank: int, world: int, device: torch.device, batch_size: int,
                views: int, epochs: int, hflip: float = 0.5, seed: int = 0) -> dict | None:
    """DINOv2's linear grid (evaluation/linear_grid.py): `views` augmented crops of each train image,
    the held-out tenth and val as centre crops."""
    from torchvision import transforms as T

    size = backbone.image_size
    crop = T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(hflip)])
    urls = expand_shards(train)
    plain, y = block_features(backbone, urls, batch_size, rank, world, device)
    torch.manual_seed(seed + rank)  # the crops: torchvision draws from torch's generator
    augmented = [block_features(backbone, urls, batch_size, rank, world, device, crop) for _ in range(views)]
    f_val, y_val = block_features(backbone, expand_shards(val), batch_size, rank, world, device)
    if rank != 0:
        return None
    fit, held = split_held_out(len(y))
    fit_set = set(fit.tolist())
    # the fit part's crops (the held-out images' crops are left out: they would leak into the choice)
    keep = torch.tensor([i in fit_set for i in range(len(y))])
    x_fit = torch.cat([a[keep] for a, _ in augmented])
    y_fit = torch.cat([b[keep] for _, b in augmented])
    num_classes = int(max(y.max(), y_val.max())) + 1
    layers = train_grid(x_fit, y_fit, num_classes, min(BLOCKS, backbone.depth), epochs=epochs, seed=seed)
    return {**score_grid(layers, plain[held], y[held], f_val, y_val),
            "train_images": len(y), "val_images": len(y_val)}


def evaluate(backbone, protocol: str, train: str, val: str, pool: str, rank: int, world: int, device: torch.device,
             batch_size: int = 128, ks: tuple[int, ...] = (20,), temperature: float = 0.07,
             epochs: int = 100, views: int = 4, max_iter: int = 1000) -> dict | None:
    """Run `protocol` ("knn", "linear", "linear-grid" or "logreg") -> on rank 0 {"rows": (name, top-1,
    top-5) table rows, "record": what is appended to the results file, "train_images", "val_images",
    "extract_s"}; None on the other ranks (a collective: every rank calls it)."""
    t0 = time.perf_counter()
    if protocol == "linear-grid":
        grid = linear_grid(backbone, train, val, rank, world, device, batch_size, views, epochs)
        if grid is None:
            return None
        n, avg, lr, held, top1, top5 = grid["chosen"]
        vn, vavg, vlr, _, vtop1, vtop5 = grid["best_on_val"]
        rows = [("protocol", "top-1 %", "top-5 %"),
                (f"linear grid: last {n} block(s) [CLS]{' + avg' if avg else ''}, lr {lr:g} (chosen on 10% of train, "
                 f"{held:.2f}% there)", f"{top1:.2f}", f"{top5:.2f}"),
                (f"  DINOv2's choice, best on val: last {vn} [CLS]{' + avg' if vavg else ''}, lr {vlr:g}",
                 f"{vtop1:.2f}", f"{vtop5:.2f}")]
        record = {"eval": protocol, "features": "DINOv2 grid", "train": train, "val": val, "linear_grid_top1": top1,
                  "linear_grid_top5": top5, "linear_grid_blocks": n, "linear_grid_avgpool": avg, "linear_grid_lr": lr,
                  "linear_grid_best_on_val_top1": vtop1, "linear_grid_views": views, "linear_grid_epochs": epochs}
        return {"rows": rows, "record": record, "train_images": grid["train_images"],
                "val_images": grid["val_images"], "extract_s": time.perf_counter() - t0}
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
    elif protocol == "logreg":
        t1 = time.perf_counter()
        result = log_regression(f_train, y_train, f_val, y_val, max_iter=max_iter)
        rows.append((f"logistic regression (C {result['C']:.3g}, picked on 10% of train)", f"{result['top1']:.2f}",
                     f"{result['top5']:.2f}"))
        record = {"logreg_top1": result["top1"], "logreg_top5": result["top5"], "logreg_C": result["C"],
                  "logreg_fit_s": round(time.perf_counter() - t1, 2)}
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
