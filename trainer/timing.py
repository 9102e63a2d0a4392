"""Where a step's time goes: data wait, forward, backward, optimizer step, EMA update.

On a GPU the work of a phase is asynchronous: without a synchronisation its time would land in
whichever later phase waits for the GPU. With `sync` each boundary synchronises first (what
`log.sync_timing` turns on); without it only the whole step is timed. Achieved FLOP/s and model
FLOP utilisation divide the step's model FLOPs (trainer/plan/flops.py) by the step time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

PHASES = ("data", "forward", "backward", "optimizer", "ema")


class StepTimer:
    def __init__(self, sync: bool, device: torch.device):
        self.sync = sync and device.type == "cuda"
        self.enabled = sync
        self.totals = dict.fromkeys(PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - start

    def window(self, steps: int) -> dict[str, float]:
        """Mean seconds per optimizer step of each phase since the last call, then start again."""
        if not self.enabled or not steps:
            return {}
        out = {f"time_{k}_s": v / steps for k, v in self.totals.items()}
        self.totals = dict.fromkeys(PHASES, 0.0)
        return out


def throughput(flops_per_step: float | None, step_time: float, device: torch.device) -> dict[str, float]:
    """Achieved model TFLOP/s of one rank, and on a known GPU the utilisation of its bf16 peak."""
    if not flops_per_step or step_time <= 0:
        return {}
    achieved = flops_per_step / step_time
    out = {"model_tflops_per_s": achieved / 1e12}
    if device.type == "cuda":
        from trainer.plan.flops import device_peak

        peak = device_peak(torch.cuda.get_device_name(device))
        if peak:
            out["mfu"] = achieved / peak
    return out
