"""Kernel benchmarks: the Triton kernels against PyTorch, measured in the same run (bench/kernels.py).

Attention forward + backward at ViT-L/H/g and BEiT-L shapes against each SDPA back end; packed
multi-crop against one SDPA call per resolution; softmax-CE (and its fused prototype projection)
against the plain PyTorch expression, with peak memory. Printed: time, TFLOP/s and the ratio
baseline_time / triton_time (> 1: Triton faster). The JSON (device, versions, command, every
number) goes to --out.

    python scripts/bench_kernels.py --out bench/results/kernels_h100.json      # on a GPU
    TRITON_INTERPRET=1 python scripts/bench_kernels.py --quick --out /tmp/k.json  # CPU: code path only
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import record, write  # noqa: E402
from bench.kernels import measure  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU / interpreter: checks the code path)")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    result = measure(args.quick, args.dtype, args.repeats, args.warmup)
    out = write(args.out, {**record("scripts/bench_kernels.py", argv, "triton"), **result})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
