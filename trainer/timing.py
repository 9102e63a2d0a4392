"""Where a step's time goes: data wait, forward, backward, optimizer step, EMA update.

On a GPU the work of a phase is asynchronous: without a synchronisation its time would land in
whichever later phase waits for the GPU. With `sync` (`log.sync_timing`) each boundary of the last
step before a log line synchronises first, and that step's phases are what the line reports: the
other steps keep their overlap of data, compute and communication. On the CPU nothing is
asynchronous and every step is timed. Achieved FLOP/s and model FLOP utilisation divide the step's
model FLOPs (trainer/plan/flops.py) by the step time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

PHASES = ("data", "forward", "backward", "optimizer", "ema")


class StepTimer:
    def __init__(self, sync: bool, device: torch.device):
        self.enabled, self.cuda = sync, device.type == "cuda"
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.timed_steps, self.active = 0, sync

    def start_step(self, logged_next: bool) -> None:
        """A new optimizer step; on a GPU it is timed (and synchronised) when its log line follows it."""
        self.active = self.enabled and (logged_next or not self.cuda)
        self.timed_steps += self.active

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.active:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - start

    def window(self) -> dict[str, float]:
        """Mean seconds per timed optimizer step of each phase since the last call, then start again."""
        if not self.timed_steps:
            return {}
        out = {f"time_{k}_s": v / self.timed_steps for k, v in self.totals.items()}
        self.totals, self.timed_steps = dict.fromkeys(PHASES, 0.0), 0
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
