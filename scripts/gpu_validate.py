"""One command that says whether this GPU machine runs mimscale right, in about ten minutes
(bench/gpu_validate.py; docs/gpu.md says what each line of its table means).

    python scripts/gpu_validate.py                 # on one H100/H200 (2 visible GPUs: also 2 ranks)
    python scripts/gpu_validate.py --cpu-smoke     # the same code path at tiny shapes on the CPU (CI)

Sections: env (versions, nvidia-smi, the Triton cache's file system), kernels (each Triton kernel
against an fp32 reference at production shapes, within 2x PyTorch's own bf16 error; the start-up
self-check, also inside zero.Init; the deferred colour work against PIL), speed (each kernel against
SDPA's back ends and the naive loss), plan (the planner against the allocator at ViT-L shapes),
train (ibot_l16 with triton and torch kernels, BEiT-L and ibot_h14 smokes, 2 ranks where 2 GPUs
are visible). The JSON goes to bench/results/gpu_validation_<device>.json with the device, versions
and command; exit 1 when a row failed.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1), for CI")
    p.add_argument("--out", help="JSON path (default bench/results/gpu_validation_<device>.json)")
    p.add_argument("--skip", nargs="*", default=[], choices=["kernels", "speed", "plan", "train"])
    args = p.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
    import torch

    from bench import RESULTS, record, write
    from bench.gpu_validate import device_label, table, validate

    size = "cpu" if args.cpu_smoke else "gpu"
    if size == "gpu" and not torch.cuda.is_available():
        print("gpu_validate: no CUDA device here; --cpu-smoke runs the same code at tiny shapes on the CPU",
              file=sys.stderr)
        return 2
    rows, seconds = validate(size, tuple(args.skip))
    print("\n".join(table(rows)))
    failed = [r["name"] for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} passed in {seconds:.0f} s"
          + (f"; failed: {failed}" if failed else ""))
    label = device_label(size)
    path = write(args.out or RESULTS / f"gpu_validation_{label}.json",
                 {**record("scripts/gpu_validate.py", argv, "triton", "deepspeed"), "device_name": label,
                  "seconds": seconds, "rows": rows, "failed": failed})
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
