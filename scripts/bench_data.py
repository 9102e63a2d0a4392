"""Loader throughput: our shard pipeline against torchvision's ImageFolder + DataLoader (bench/data.py).

Both sides decode the same JPEGs with PIL and run the same iBOT multi-crop augmentation with the same
number of worker processes; the baseline normalises each crop in the worker as DINO/iBOT do, ours
ships uint8 crops and block masks, measured with the colour work in the workers and on the device.
Printed: images/s of each, per worker, and the ratios to the baseline (target >= 2 for the second).

    python scripts/bench_data.py --images 768 --workers 2 --batch-size 32 --json bench/results/data_loader_cpu.json
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record, write  # noqa: E402
from bench.data import measure, report  # noqa: E402


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
    result = measure(args.work_dir, args.images, args.workers, args.batch_size, args.batches, args.repeats,
                     args.local_crops)
    print("\n".join(report(result)))
    if args.json:
        write(args.json, {**result, **record("scripts/bench_data.py", argv, "PIL")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
