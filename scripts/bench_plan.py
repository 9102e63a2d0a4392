"""The memory planner's activation estimate against a measured peak, on this device.

    python scripts/bench_plan.py                      # CPU: ViT-S/16 at 112 px (torch.profiler's memory timeline)
    python scripts/bench_plan.py --cases vit_large:224:32:0 vit_large:224:32:1 --out bench/results/plan_gpu.json

A case is arch:image size:batch:checkpoint every k (0: none). Each runs one forward + backward of the
backbone in bf16 (gradients handed off as they complete, as ZeRO-3's reduce-scatter does: the
planner counts them in their own rows) and compares the peak memory above what existed before (on
a GPU torch.cuda.max_memory_allocated, on the CPU the profiler's memory timeline) with the
planner's estimate for the same shapes (trainer/plan: saved tensors, the backward's working set,
one recomputed block). Prints estimate / measured per case; the JSON has the device, versions and
command.
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

from models.vit import VIT_ARCHS, build_vit  # noqa: E402
from trainer.plan import workload  # noqa: E402
from trainer.plan.memory import peak_bytes, recompute_bytes  # noqa: E402


def drop_gradients(model: torch.nn.Module) -> None:
    """Free each gradient as soon as it is complete (ZeRO-3 hands them to its reduce-scatter)."""
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))


def estimate(arch: str, size: int, batch: int, every: int) -> int:
    """The planner's activation bytes for a bare backbone's forward + backward (as memory.activations)."""
    with torch.device("meta"):
        m = build_vit(arch, img_size=size).to(torch.bfloat16)
    x = torch.empty(batch, 3, size, size, device="meta", dtype=torch.bfloat16)
    m.set_grad_checkpointing(bool(every), every=every or 1)
    cost = workload.measure(arch, lambda: m.forward_features(x), True, m)
    m.set_grad_checkpointing(False)
    full = workload.measure(arch, lambda: m.forward_features(x), True, m).saved
    return int(peak_bytes(cost.saved, cost.working, recompute_bytes(full, VIT_ARCHS[arch][1], every)))


def cpu_peak(fn) -> int:
    """Peak bytes allocated above what existed before `fn`: torch.profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def cuda_peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measured(arch: str, size: int, batch: int, every: int, device: torch.device) -> int:
    torch.manual_seed(0)
    with torch.device(device):
        m = build_vit(arch, img_size=size).to(torch.bfloat16)
    m.set_grad_checkpointing(bool(every), every=every or 1)
    drop_gradients(m)
    x = torch.randn(batch, 3, size, size, device=device).to(torch.bfloat16)

    def step():
        out = m.forward_features(x)
        (out["patch"].float().square().mean() + out["cls"].float().mean()).backward()

    step()  # warm-up: first-call allocations (kernels' workspaces)
    return cuda_peak(step) if device.type == "cuda" else cpu_peak(step)


def run_case(case: str, device: torch.device) -> dict:
    arch, size, batch, every = case.split(":")
    size, batch, every = int(size), int(batch), int(every)
    est, got = estimate(arch, size, batch, every), measured(arch, size, batch, every, device)
    return {"case": case, "arch": arch, "image_size": size, "batch": batch, "checkpoint_every": every,
            "estimate_bytes": est, "measured_bytes": got, "error": est / got - 1}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["vit_small:112:16:0", "vit_small:112:16:1", "vit_small:112:16:2"],
                   help="arch:image size:batch:checkpoint every k")
    p.add_argument("--out", help="JSON path (default: bench/results/plan_vs_measured_<cpu|gpu>.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rows = [run_case(c, device) for c in args.cases]
    for r in rows:
        est, got = r["estimate_bytes"] / 2**20, r["measured_bytes"] / 2**20
        print(f"{r['case']:24} estimate {est:9.1f} MiB  measured {got:9.1f} MiB  ratio {1 + r['error']:.3f}")
    what = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU: {platform.machine()}"
    out = {"device": what, "measure": "torch.cuda.max_memory_allocated" if device.type == "cuda" else
           "torch.profiler memory timeline", "cases": rows,
           "versions": {"python": platform.python_version(), "torch": torch.__version__},
           "command": shlex.join(["python", "scripts/bench_plan.py", *(argv if argv is not None else sys.argv[1:])])}
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"plan_vs_measured_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
