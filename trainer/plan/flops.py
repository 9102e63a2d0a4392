"""Model FLOPs per optimizer step, counted from the shapes of the step's own passes.

Each pass of trainer/plan/workload.py runs on the meta device under `torch.utils.flop_counter`
(every matmul, convolution and attention product, counted from its shapes; element-wise work is
not counted, as in the usual MFU convention). A pass with gradients costs 3x its forward (the
backward computes the gradients of the inputs and of the weights); a teacher's costs 1x; the
recomputation of activation checkpointing is not model work and is not counted. The student's
prototype scores, which run inside the fused loss, are added as 2 x rows x width x K x 3.

The masks are counted at their expected size (a view masked with probability `data.mask.prob`, at
the mean of `data.mask.ratio`), not the worst case the memory plan uses.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import Config

from . import workload

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets.
DEVICE_PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "V100": 125e12,  # fp16 (V100 has no bf16)
    "MI300X": 1307e12,
    "MI250X": 383e12,
}


def device_peak(name: str) -> float | None:
    """bf16 peak of a device by its name (torch.cuda.get_device_name), the longest match; None if unknown."""
    hits = [k for k in DEVICE_PEAK_BF16 if k.lower() in name.lower()]
    return DEVICE_PEAK_BF16[max(hits, key=len)] if hits else None


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def step_flops(cfg: Config, method: torch.nn.Module | None = None) -> dict[str, float]:
    """{pass name: model FLOPs per optimizer step (all micro-batches, one rank), 'total': their sum}."""
    method = method if method is not None else workload.build_meta(cfg)
    b = cfg.data.batch_size
    backbone = method.student["backbone"]
    every = getattr(backbone, "checkpoint_every", 0)
    if hasattr(backbone, "set_grad_checkpointing"):
        backbone.set_grad_checkpointing(False)  # recomputation is not model work
    out: dict[str, float] = {}
    try:
        # masked rows at their expected number, not the memory plan's worst case
        for name, fn, grad, _ in workload.step_calls(method, cfg, b, expected=True):
            with torch.set_grad_enabled(grad):
                out[name] = _flops(fn) * (3 if grad else 1)
        rows = workload.prototype_rows(method, cfg, b, expected=True)
        if rows:
            out["student prototype scores (in the loss)"] = sum(2 * r * d * k * 3 for r, d, k in rows)
    finally:
        if hasattr(backbone, "set_grad_checkpointing"):
            backbone.set_grad_checkpointing(bool(every), every=every or 1)
    accum = cfg.optim.grad_accum
    out = {k: v * accum for k, v in out.items()}
    out["total"] = sum(out.values())
    return out
