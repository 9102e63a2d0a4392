"""Where a training step's time goes, for a few steps of one configuration (bench/step.py).

    python scripts/bench_step.py --config configs/ibot_vit_tiny.yaml --steps 12
    python scripts/bench_step.py --config configs/ibot_l16_in22k.yaml --steps 20 \
        --launcher "deepspeed --num_gpus 8" data.train_shards=/data/shards/in22k/shard-{000000..000063}.tar
    python scripts/bench_step.py --config configs/ibot_vit_tiny.yaml --syncs --out bench/results/syncs_x.json
    python scripts/bench_step.py --config configs/ibot_vit_tiny.yaml --compile blocks   # eager vs compiled
    python scripts/bench_step.py --config configs/ibot_l16_in22k.yaml --steps 30 --warmup 5 --compile blocks \
        --launcher "deepspeed --num_gpus 8" data.train_shards=...                        # the GPU comparison

Medians of each phase (data, forward, backward, optimizer, EMA) with its share of the step, images/s,
model FLOPs, TFLOP/s and MFU on a known GPU, and the peak memory against the planner's estimate;
`--syncs` counts the host-device synchronisations per optimizer step instead, by the line that
does them; `--compile MODE` runs the steps eager and then compiled (run.compile) and prints them side by
side, with the compile time (once) and the graph and break counts. The JSON (device, versions, command,
every per-step record) goes to --out (default bench/results/step_<config>[_compile_<mode>]_<cpu|gpu>.json).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import RESULTS, on_gpu, record, write  # noqa: E402
from bench.step import BenchError, compare_compile, count_syncs, report, report_compile, time_steps  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps to run (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians (default 2)")
    p.add_argument("--ds_config", default="zero3.json")
    p.add_argument("--launcher", default="", help='e.g. "deepspeed --num_gpus 8" or "torchrun --nproc_per_node 2" '
                                                  "(default: one process)")
    p.add_argument("--out", help="JSON path (default: bench/results/step_<config>_<cpu|gpu>.json)")
    p.add_argument("--syncs", action="store_true",
                   help="count the host-device synchronisations per optimizer step instead (trainer/syncs.py)")
    p.add_argument("--compile", choices=("blocks", "model"),
                   help="run the steps eager, then with run.compile=MODE, and compare them")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_intermixed_args(argv)
    about = record("scripts/bench_step.py", argv, "deepspeed", "triton")
    if args.syncs:
        result = count_syncs(["--config", args.config, *args.overrides])
        print(f"{args.config}: host syncs per optimizer step (outside logging steps): {result['ours']:g} in "
              f"mimscale, {result['deepspeed']:g} in DeepSpeed's step")
        for site, n in result["sites"].items():
            print(f"  {n:5g}  {site}")
        if args.out:
            write(args.out, {"config": args.config, "overrides": args.overrides, **result, **about})
        return 0
    kind = "gpu" if on_gpu() else "cpu"
    stem = Path(args.config).stem + (f"_compile_{args.compile}" if args.compile else "")
    try:
        if args.compile:  # the same steps eager, then compiled
            result = compare_compile(args.config, args.steps, args.warmup, args.compile, args.ds_config,
                                     args.launcher, args.overrides)
        else:
            result = time_steps(args.config, args.steps, args.warmup, args.ds_config, args.launcher, args.overrides)
    except BenchError as e:
        print(f"bench_step: {e}", file=sys.stderr)
        return 1
    result = {**result, **about}
    print("\n".join((report_compile if args.compile else report)(result)))
    path = write(args.out or RESULTS / f"step_{stem}_{kind}.json", result)
    print(f"wrote {path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
