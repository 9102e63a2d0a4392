"""Kernel benchmarks: the Triton kernels against PyTorch, measured in the same run.

Attention, forward + backward, at the ViT shapes of the design (B=64, 16 heads): ViT-L/16 (d=64,
L=197 and 257), ViT-H/14 (d=80, L=257), ViT-g/14 (d=88, L=257), and BEiT-L/16 (L=197) with its
fp32 relative position bias [H, L, L] (its gradient included; SDPA gets it as a float mask),
against scaled_dot_product_attention with each of its flash / memory-efficient backends that
accepts the shape. Packed multi-crop: per image 2 x 257 + 10 x 37 tokens, one variable-length kernel call
against one SDPA call per resolution. Softmax-CE (DINO/iBOT loss), forward + backward, rows=8192,
K=65536 and 8192, against the plain PyTorch expression, both also giving the teacher center's
column sums: time and peak memory; and the variant with the prototype projection fused in
(bottleneck 256) against matmul + the plain expression.

Printed: time, TFLOP/s (attention) and the ratio baseline_time / triton_time (> 1: Triton faster;
targets: >= 1.0 per attention shape, >= 1.3 packed, >= 2 for softmax-CE, with >= 4x lower peak
memory). scripts/bench_kernels.py is the command line.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from models.kernels.attention import attention_varlen_reference
from models.kernels.attention_triton import flash_attention, flash_attention_varlen
from models.kernels.softmax_ce import (
    fused_linear_softmax_ce,
    fused_linear_softmax_ce_reference,
    softmax_ce_reference,
    softmax_ce_triton,
)
from trainer.plan.measured import allocator_peak

Say = Callable[[str], None]

FULL = {
    "attention": [("ViT-L/16", 64, 16, 197, 64), ("ViT-L/16", 64, 16, 257, 64), ("ViT-H/14", 64, 16, 257, 80),
                  ("ViT-g/14", 64, 16, 257, 88), ("BEiT-L/16 bias", 64, 16, 197, 64, True)],
    "packed": [("ViT-L/16 multi-crop", 64, 16, 64, [257, 257] + [37] * 10)],
    "softmax_ce": [(8192, 65536), (8192, 8192)],
}
QUICK = {  # the same code at sizes Triton's CPU interpreter gets through in seconds
    "attention": [("tiny", 1, 2, 37, 64), ("tiny", 1, 2, 37, 88), ("tiny bias", 1, 2, 37, 64, True)],
    "packed": [("tiny multi-crop", 1, 2, 64, [33, 33, 10, 10])],
    "softmax_ce": [(8, 300)],
}


def timed(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn, device: torch.device) -> int | None:
    return allocator_peak(fn, device) if device.type == "cuda" else None  # CPU kernels: time only


def fwd_bwd(fn, *inputs):
    def run():
        xs = [x.detach().requires_grad_() for x in inputs]
        out = fn(*xs)
        out.backward(torch.ones_like(out))
    return run


def sdpa_backends(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"sdpa": nullcontext}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return {"sdpa_flash": lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION),
            "sdpa_efficient": lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)}


def bench_attention(shapes, device, dtype, repeats, warmup, say: Say = print) -> list[dict]:
    rows = []
    for name, B, H, L, D, *bias in shapes:
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype) for _ in range(3))
        inputs = (q, k, v, torch.randn(H, L, L, device=device)) if bias else (q, k, v)  # fp32 bias, as BEiT's

        def sdpa(q, k, v, b=None):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=None if b is None else b.to(q.dtype))

        flops = 3.5 * 4 * B * H * L * L * D  # forward 4BHL^2D, backward 2.5x that
        row = {"shape": name, "B": B, "H": H, "L": L, "D": D, "bias": bool(bias),
               "triton_s": timed(fwd_bwd(flash_attention, *inputs), device, repeats, warmup)}
        for backend, ctx in sdpa_backends(device).items():
            try:
                with ctx():
                    row[f"{backend}_s"] = timed(fwd_bwd(sdpa, *inputs), device, repeats, warmup)
            except RuntimeError as e:  # a backend that refuses this shape or dtype
                row[f"{backend}_s"] = None
                row[f"{backend}_error"] = str(e).splitlines()[0][:200]
        row["triton_tflops"] = flops / row["triton_s"] / 1e12
        best = min((v for key, v in row.items() if key.startswith("sdpa") and key.endswith("_s") and v), default=None)
        row["ratio_vs_best_sdpa"] = best / row["triton_s"] if best else None
        rows.append(row)
        say(f"attention {name} L={L} d={D}: triton {row['triton_s'] * 1e3:.3f} ms "
              f"({row['triton_tflops']:.1f} TFLOP/s), best SDPA {best * 1e3 if best else float('nan'):.3f} ms, "
              f"ratio {row['ratio_vs_best_sdpa'] or float('nan'):.2f}")
    return rows


def bench_packed(shapes, device, dtype, repeats, warmup, say: Say = print) -> list[dict]:
    rows = []
    for name, B, H, D, per_image in shapes:
        lens, longest = per_image * B, max(per_image)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device, dtype=torch.int32)
        q, k, v = (torch.randn(sum(lens), H, D, device=device, dtype=dtype) for _ in range(3))
        groups = {}
        for n in per_image:
            groups[n] = groups.get(n, 0) + B
        # the baseline: one SDPA call per crop resolution, on [crops, H, n, D] tensors
        split = [(torch.randn(c, H, n, D, device=device, dtype=dtype),) * 3 for n, c in groups.items()]

        def separate(split=split):
            for qs, ks, vs in split:
                xs = [x.detach().requires_grad_() for x in (qs, ks, vs)]
                out = F.scaled_dot_product_attention(*xs)
                out.backward(torch.ones_like(out))

        row = {"shape": name, "B": B, "H": H, "D": D, "tokens_per_image": per_image,
               "triton_varlen_s": timed(fwd_bwd(lambda a, b, c, cu=cu, n=longest: flash_attention_varlen(
                                                    a, b, c, cu, n), q, k, v), device, repeats, warmup),
               "sdpa_per_resolution_s": timed(separate, device, repeats, warmup)}
        if device.type != "cuda":  # the CPU pass also checks the packed reference runs
            attention_varlen_reference(q, k, v, cu)
        row["ratio"] = row["sdpa_per_resolution_s"] / row["triton_varlen_s"]
        rows.append(row)
        say(f"packed {name}: triton varlen {row['triton_varlen_s'] * 1e3:.3f} ms, SDPA per resolution "
              f"{row['sdpa_per_resolution_s'] * 1e3:.3f} ms, ratio {row['ratio']:.2f}")
    return rows


def bench_softmax_ce(shapes, device, dtype, repeats, warmup, say: Say = print) -> list[dict]:
    rows = []
    for R, K in shapes:
        s, t = (torch.randn(R, K, device=device, dtype=dtype) for _ in range(2))
        c = torch.zeros(K, device=device)
        row = {"rows": R, "K": K}
        total = torch.zeros(K, device=device)  # both also produce the center's column sums, as in training
        for name, fn in (("triton", softmax_ce_triton), ("torch", softmax_ce_reference)):
            run = fwd_bwd(lambda a, fn=fn, t=t, c=c, u=total: fn(a, t, c, 0.1, 0.04, teacher_sum=u), s)
            row[f"{name}_s"] = timed(run, device, repeats, warmup)
            row[f"{name}_peak_bytes"] = peak_memory(run, device)
        # the head's last layer fused in: bottleneck 256 -> K prototypes, against matmul + torch loss
        h = torch.randn(R, 256, device=device, dtype=dtype)
        w = torch.randn(K, 256, device=device, dtype=dtype)
        for name, fn in (("fused_linear", fused_linear_softmax_ce),
                         ("linear_torch", fused_linear_softmax_ce_reference)):
            run = fwd_bwd(lambda a, b, fn=fn, t=t, c=c, u=total: fn(a, b, t, c, 0.1, 0.04, teacher_sum=u), h, w)
            row[f"{name}_s"] = timed(run, device, repeats, warmup)
            row[f"{name}_peak_bytes"] = peak_memory(run, device)
        row["speedup"] = row["torch_s"] / row["triton_s"]
        row["fused_linear_speedup"] = row["linear_torch_s"] / row["fused_linear_s"]
        if row["triton_peak_bytes"]:
            row["memory_ratio"] = row["torch_peak_bytes"] / row["triton_peak_bytes"]
            row["fused_linear_memory_ratio"] = row["linear_torch_peak_bytes"] / row["fused_linear_peak_bytes"]
        rows.append(row)
        say(f"softmax-CE rows={R} K={K}: triton {row['triton_s'] * 1e3:.3f} ms, torch {row['torch_s'] * 1e3:.3f} ms,"
              f" speedup {row['speedup']:.2f}" + (f", peak memory ratio {row['memory_ratio']:.2f}"
                                                   if "memory_ratio" in row else ""))
    return rows


def measure(quick: bool = False, dtype: str = "bf16", repeats: int = 20, warmup: int = 5, say: Say = print) -> dict:
    """Every kernel against its baseline at the design's shapes (`quick`: tiny ones, the code path in
    Triton's CPU interpreter) -> the rows of each, with the settings they ran at. On the CPU fp32,
    2 repeats after 1 warm-up: interpreter times, which say nothing about speed."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = QUICK if quick else FULL
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if device.type == "cpu":
        torch_dtype, repeats, warmup = torch.float32, min(repeats, 2), min(warmup, 1)
    return {"dtype": str(torch_dtype), "repeats": repeats, "quick": quick, "cuda": torch.version.cuda,
            "attention": bench_attention(shapes["attention"], device, torch_dtype, repeats, warmup, say),
            "packed": bench_packed(shapes["packed"], device, torch_dtype, repeats, warmup, say),
            "softmax_ce": bench_softmax_ce(shapes["softmax_ce"], device, torch_dtype, repeats, warmup, say)}
