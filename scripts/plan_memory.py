"""Does a config fit on my GPUs? Per-GPU memory of a run, before anything is allocated.

    python scripts/plan_memory.py --config configs/ibot_g14_in22k.yaml --gpus 64 --gpu-mem 80
    python scripts/plan_memory.py --config C --gpus 8 --gpu-mem 40 --ds_config zero3_offload.json data.batch_size=32
    python scripts/plan_memory.py --config C --gpus 64 --json plan.json

The model is built on the meta device (no memory, no weights files read), one micro-batch runs
through it there, and trainer/plan/memory.py adds DeepSpeed's states for the ZeRO stage of
--ds_config. Prints the table, whether it fits (and the margin), and the largest micro-batch
that does; exit code 0 when it fits, 1 when it does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import ConfigError, files_unchecked, load_config  # noqa: E402
from trainer.ds_config import build_ds_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="experiment YAML (default: configs/defaults.yaml)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks) the run will use")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory of each GPU in GiB (default 80)")
    p.add_argument("--ds_config", default="zero3.json", help="DeepSpeed JSON (a bare name is looked up in ds_configs/)")
    p.add_argument("--micro-batch", type=int, help="plan this micro-batch instead of data.batch_size")
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON here")
    p.add_argument("--flops", action="store_true", help="also print the model FLOPs of one optimizer step")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_intermixed_args(argv)
    if args.gpus < 1 or args.gpu_mem <= 0:
        print("plan_memory: --gpus must be >= 1 and --gpu-mem > 0", file=sys.stderr)
        return 2
    try:
        with files_unchecked():  # plan anywhere: the weights files need not be on this machine
            cfg = load_config(args.config, args.overrides)
        ds = build_ds_config(args.ds_config, cfg, args.gpus)
    except ConfigError as e:
        print(f"plan_memory: config error: {e}", file=sys.stderr)
        return 2
    from trainer.plan import workload
    from trainer.plan.memory import GiB, plan

    method = workload.build_meta(cfg)
    result = plan(cfg, ds, args.gpus, args.gpu_mem * GiB, args.micro_batch, method=method,
                  name=args.config or "configs/defaults.yaml")
    print(result.table())
    print(result.verdict())
    out = result.to_dict()
    if args.flops:
        from trainer.plan.flops import step_flops

        flops = step_flops(cfg, method)
        print(f"model FLOPs per optimizer step and GPU: {flops['total'] / 1e12:.2f} TFLOP ("
              + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in flops.items() if k != "total") + ")")
        out["flops_per_step_per_gpu"] = flops
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
