"""The memory planner's activation estimate against measured peaks, on this device.

    python scripts/bench_plan.py                      # CPU: ViT-S/16 at 112 px
    python scripts/bench_plan.py --cases vit_large:224:32:0 vit_large:224:32:1 --out bench/results/plan_gpu.json

A case is arch:image size:batch:checkpoint every k (0: none). Each runs one forward + backward of the
backbone in bf16 (gradients handed off as they complete, as ZeRO-3's reduce-scatter does: the
planner counts them in their own rows) and compares the planner's estimate for the same shapes
(trainer/plan: saved tensors, the backward's working set, one recomputed block) with two measured
peaks (trainer/plan/measured.py): the tensors the operators return, which is what the planner
models and the same on every machine, and what the allocator saw (torch.cuda.max_memory_allocated
on a GPU, torch.profiler's memory timeline on the CPU, where the kernels' scratch buffers make it
depend on the CPU and the thread count). Prints estimate / measured per case; the JSON has the
device, versions and command.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import RESULTS, record, write  # noqa: E402
from trainer.plan.measured import backbone_case  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["vit_small:112:16:0", "vit_small:112:16:1", "vit_small:112:16:2"],
                   help="arch:image size:batch:checkpoint every k")
    p.add_argument("--out", help="JSON path (default: bench/results/plan_vs_measured_<cpu|gpu>.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rows = [backbone_case(c, device) for c in args.cases]
    print(f"{'case':24} {'estimate':>10} {'tensors':>10} {'ratio':>6} {'allocator':>10} {'ratio':>6}  (MiB)")
    for r in rows:
        est, got, alloc = (r[k] / 2**20 for k in ("estimate_bytes", "tensor_peak_bytes", "allocator_peak_bytes"))
        print(f"{r['case']:24} {est:10.1f} {got:10.1f} {1 + r['error']:6.3f} {alloc:10.1f} "
              f"{1 + r['allocator_error']:6.3f}")
    about = record("scripts/bench_plan.py", argv)
    if device.type == "cpu":
        about["device"] += f", ATen {torch.backends.cpu.get_cpu_capability()}"
    path = write(args.out or RESULTS / f"plan_vs_measured_{device.type}.json", {
        **about, "threads": torch.get_num_threads(), "cases": rows,
        "measures": {"tensor_peak": "bytes of the tensors the operators return (TorchDispatchMode)",
                     "allocator_peak": "torch.cuda.max_memory_allocated" if device.type == "cuda" else
                     "torch.profiler memory timeline"}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
