"""Evaluate a frozen backbone: weighted kNN (DINO's protocol), a linear probe on cached features,
DINOv2's linear grid or its logistic regression (evaluation/protocols.py, evaluation/linear_grid.py).

    python scripts/evaluate.py knn runs/x                               # the run's own train/val shards
    python scripts/evaluate.py linear out/vit-l16-ibot --train 'in1k/train-{0000..1023}.tar' \\
        --val 'in1k/val-{00..63}.tar' --pool cls+avg
    torchrun --nproc_per_node 8 scripts/evaluate.py knn runs/x          # each rank its share of the shards
    python scripts/evaluate.py linear-grid runs/x --views 4             # DINOv2: lrs x 1/4 blocks x [CLS](+avg)
    python scripts/evaluate.py logreg runs/x                            # DINOv2 / iBOT: logistic regression

The backbone: a run directory, a checkpoint, an exported `transformers` directory or timm file
(scripts/convert_to_hf.py). Data: WebDataset shards with labels (`cls`), or `builtin:digits`.
Results are printed as one table, beside the run's own kNN at random init and on raw pixels where
recorded, and appended to the run's metrics.jsonl (or to eval_results.jsonl beside an exported model).
"""

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from evaluation.knn import DINO_KS, percent  # noqa: E402
from evaluation.protocols import POOLS, append_result, evaluate, splits, table  # noqa: E402
from export.backbones import load_backbone  # noqa: E402
from trainer.config.sections import DataConfig  # noqa: E402
from trainer.distributed import leave_distributed  # noqa: E402
from trainer.tracking import send_results  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol", choices=["knn", "linear", "linear-grid", "logreg"],
                        help="knn: DINO's weighted kNN; linear: a probe on cached features; linear-grid: DINOv2's "
                             "grid of learning rates x last 1 / 4 blocks x [CLS] / + mean patch on augmented crops; "
                             "logreg: DINOv2's logistic regression (evaluation/linear_grid.py)")
    parser.add_argument("backbone", help="run directory, checkpoint, exported transformers directory or timm file")
    parser.add_argument("--weights", choices=["auto", "teacher", "student"], default="auto",
                        help="for a run or checkpoint: which backbone (auto: the EMA teacher where there is one; "
                             "student: the network the teacher averages, which the run's kNN also measures)")
    parser.add_argument("--train", help="labelled train shards or builtin:digits (default: the run's)")
    parser.add_argument("--val", help="labelled val shards (default: the run's, or builtin:digits' own split)")
    parser.add_argument("--ks", type=int, nargs="+", default=list(DINO_KS), help="kNN: neighbour counts")
    parser.add_argument("--temperature", type=float, default=0.07, help="kNN: vote temperature")
    parser.add_argument("--pool", choices=["auto", *POOLS], default="auto",
                        help="the feature: the [CLS] token, the mean patch token, or both concatenated (iBOT's "
                             "linear protocol for ViT-S/B); auto: what the method's own kNN measures (avg for "
                             "MaskAlign, BEiT and iTPN, whose [CLS] is untrained or absent; cls otherwise)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="linear: epochs over the cached features (default 100); linear-grid: over the cached "
                             "crops (default 10, DINOv2's number of epochs)")
    parser.add_argument("--views", type=int, default=4, help="linear-grid: augmented crops cut of each train image")
    parser.add_argument("--max-iter", type=int, default=1000,
                        help="logreg: lbfgs iterations per fit (DINOv2's --max-train-iters, 1,000)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward during extraction")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if world > 1:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        backbone = load_backbone(args.backbone, args.weights)
        train, val = splits(args.train, args.val, backbone.run_config, DataConfig().cache_dir)
    except (ValueError, FileNotFoundError) as e:  # EvaluationError too
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    backbone.model.to(device)
    pool = args.pool if args.pool != "auto" else backbone.default_pool
    epochs = args.epochs or (10 if args.protocol == "linear-grid" else 100)
    done = evaluate(backbone, args.protocol, train, val, pool, rank, world, device, args.batch_size, tuple(args.ks),
                    args.temperature, epochs, args.views, args.max_iter)
    if done is not None:  # rank 0
        what = "DINOv2 grid (last 4 blocks' [CLS] + mean patch)" if args.protocol == "linear-grid" else POOLS[pool]
        print(f"{backbone.source}: {what} features, {done['train_images']} train / {done['val_images']} val "
              f"images, extracted in {done['extract_s']:.0f} s on {world} rank(s)")
        print(table(done["rows"]))
        r = backbone.run_knn or {}
        if r:
            student = f", its student {percent(r['knn_student'])}" if r.get("knn_student") is not None else ""
            print(f"compare with the run's own kNN on its held-out split: trained {percent(r.get('knn'))}{student}, "
                  f"random init {percent(r.get('knn_random_init'))}, raw pixels {percent(r.get('knn_raw_pixels'))}")
        else:
            print("no kNN of an untrained network or of raw pixels was recorded with this backbone to compare with")
        print(f"appended to {append_result(backbone.results_file, done['record'], backbone.step)}")
        if backbone.kind == "mimscale":  # and to the run's W&B / MLflow run, where it had one
            sent = send_results(backbone.results_file.parent, backbone.step, done["record"])
            if sent:
                print(f"sent to the run's {' and '.join(sent)} run")
    leave_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
