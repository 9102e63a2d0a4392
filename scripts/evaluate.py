"""Evaluate a frozen backbone: weighted kNN (DINO's protocol) or a linear probe on cached features.

    python scripts/evaluate.py knn runs/x                               # the run's own train/val shards
    python scripts/evaluate.py linear out/vit-l16-ibot --train 'in1k/train-{0000..1023}.tar' \\
        --val 'in1k/val-{00..63}.tar' --pool cls+avg
    torchrun --nproc_per_node 8 scripts/evaluate.py knn runs/x          # each rank its share of the shards

The backbone: a run directory, a checkpoint, an exported `transformers` directory or timm file
(scripts/convert_to_hf.py). Data: WebDataset shards with labels (`cls`), or `builtin:digits`.
Images are resized (shorter side, bicubic) and centre-cropped to the backbone's resolution and
normalised with its training normalisation; each rank reads every world-size-th shard, and the
features are gathered once, to rank 0, which runs the protocol. Results are printed as one table and appended to the
run's metrics.jsonl (or to eval_results.jsonl beside an exported model).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from data.digits import resolve_builtin  # noqa: E402
from data.pipeline import labelled_batches  # noqa: E402
from data.shards import expand_shards  # noqa: E402
from data.transforms import normalize  # noqa: E402
from evaluation.features import extract_features  # noqa: E402
from evaluation.knn import DINO_KS, knn_classify, percent  # noqa: E402
from evaluation.linear import linear_probe  # noqa: E402
from export.backbones import LoadedBackbone, load_backbone  # noqa: E402

log = logging.getLogger("evaluate")


def data_splits(args: argparse.Namespace, backbone: LoadedBackbone) -> tuple[str, str]:
    train, val = args.train, args.val
    if train is None:  # the run's own splits
        if backbone.run_config is None:
            raise SystemExit("evaluate: --train and --val are needed for an exported model")
        train, val = backbone.run_config["data"]["train_shards"], val or backbone.run_config["data"]["val_shards"]
    from trainer.config.sections import DataConfig

    train, val = resolve_builtin(train, val, DataConfig().cache_dir)
    if not val:
        raise SystemExit(f"evaluate: no validation shards for {train}; pass --val")
    return train, val


def features(backbone: LoadedBackbone, urls: list[str], pool: str, batch_size: int, rank: int, world: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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


def table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths), *lines[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol", choices=["knn", "linear"])
    parser.add_argument("backbone", help="run directory, checkpoint, exported transformers directory or timm file")
    parser.add_argument("--weights", choices=["auto", "teacher", "student"], default="auto",
                        help="for a run or checkpoint: which backbone (auto: the EMA teacher where there is one)")
    parser.add_argument("--train", help="labelled train shards or builtin:digits (default: the run's)")
    parser.add_argument("--val", help="labelled val shards (default: the run's, or builtin:digits' own split)")
    parser.add_argument("--ks", type=int, nargs="+", default=list(DINO_KS), help="kNN: neighbour counts")
    parser.add_argument("--temperature", type=float, default=0.07, help="kNN: vote temperature")
    parser.add_argument("--pool", choices=["auto", "cls", "avg", "cls+avg"], default="auto",
                        help="the feature: the [CLS] token, the mean patch token, or both concatenated (iBOT's "
                             "linear protocol for ViT-S/B); auto: what the method's own kNN measures (avg for "
                             "MaskAlign, BEiT and iTPN, whose [CLS] is untrained or absent; cls otherwise)")
    parser.add_argument("--epochs", type=int, default=100, help="linear: epochs over the cached features")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward during extraction")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if world > 1:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        backbone = load_backbone(args.backbone, args.weights)
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    backbone.model.to(device)
    train, val = data_splits(args, backbone)
    pool = args.pool if args.pool != "auto" else backbone.default_pool
    t0 = time.perf_counter()
    f_train, y_train = features(backbone, expand_shards(train), pool, args.batch_size, rank, world, device)
    f_val, y_val = features(backbone, expand_shards(val), pool, args.batch_size, rank, world, device)
    extract_s = time.perf_counter() - t0
    if rank == 0:
        what = {"cls": "[CLS]", "avg": "mean patch token", "cls+avg": "[CLS] + mean patch token"}[pool]
        rows = [("protocol", "top-1 %", "top-5 %")]
        if args.protocol == "knn":
            result = knn_classify(f_train, y_train, f_val, y_val, ks=tuple(args.ks), temperature=args.temperature)
            rows += [(f"kNN k={k} T={args.temperature}", f"{r['top1']:.2f}", f"{r['top5']:.2f}")
                     for k, r in result.items()]
            record = {f"knn_k{k}_top1": r["top1"] for k, r in result.items()} | {
                f"knn_k{k}_top5": r["top5"] for k, r in result.items()}
        else:
            t1 = time.perf_counter()
            result = linear_probe(f_train.to(device), y_train.to(device), f_val.to(device), y_val.to(device),
                                  epochs=args.epochs)
            rows.append((f"linear (lr {result['lr']}, picked on 10% of train)", f"{result['top1']:.2f}",
                         f"{result['top5']:.2f}"))
            record = {"linear_top1": result["top1"], "linear_top5": result["top5"], "linear_lr": result["lr"],
                      "linear_fit_s": round(time.perf_counter() - t1, 2)}
        print(f"{backbone.source}: {what} features, {len(y_train)} train / {len(y_val)} val images, "
              f"extracted in {extract_s:.0f} s on {world} rank(s)")
        print(table(rows))
        r = backbone.run_knn or {}
        if r:
            print(f"compare with the run's own kNN on its held-out split: trained {percent(r.get('knn'))}, random "
                  f"init {percent(r.get('knn_random_init'))}, raw pixels {percent(r.get('knn_raw_pixels'))}")
        else:
            print("no kNN of an untrained network or of raw pixels was recorded with this backbone to compare with")
        record = {"eval": args.protocol, "features": what, "train": train, "val": val, **record}
        if backbone.step is not None:
            record = {"step": backbone.step, **record}
        backbone.results_file.parent.mkdir(parents=True, exist_ok=True)
        with open(backbone.results_file, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        print(f"appended to {backbone.results_file}")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
