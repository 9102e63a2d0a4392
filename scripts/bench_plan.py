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

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.plan.measured import backbone_case  # noqa: E402


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


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
    what = (torch.cuda.get_device_name() if device.type == "cuda" else
            f"CPU: {platform.machine()}, {cpu_name()}, ATen {torch.backends.cpu.get_cpu_capability()}")
    out = {"device": what, "threads": torch.get_num_threads(),
           "measures": {"tensor_peak": "bytes of the tensors the operators return (TorchDispatchMode)",
                        "allocator_peak": "torch.cuda.max_memory_allocated" if device.type == "cuda" else
                        "torch.profiler memory timeline"}, "cases": rows,
           "versions": {"python": platform.python_version(), "torch": torch.__version__},
           "command": shlex.join(["python", "scripts/bench_plan.py", *(argv if argv is not None else sys.argv[1:])])}
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"plan_vs_measured_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
