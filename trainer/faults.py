"""Faults the train loop survives: non-finite steps, pre-emption signals and the job's time limit.

Both need every rank to agree, so both are decided by one small all-reduce per micro-step:
`[this rank's loss is non-finite (one slot per rank)..., a stop signal arrived]`.

Non-finite steps. DeepSpeed already skips an optimizer step whose global gradient norm is inf or
NaN (ZeRO-3 always; bf16 and fp16 at every stage: `bf16.check_grad_overflow`, which
`ds_config.py` keeps on), and that norm is all-reduced, so every rank skips together. A
non-finite *loss* on one rank is turned into that same event: every rank multiplies its loss by
NaN, which makes every gradient NaN, so the step is skipped on all ranks. `engine.was_step_applied()`
then says whether the step happened; a skipped step updates neither the weights, the optimizer
state nor the EMA teacher.

Stopping. SIGTERM / SIGUSR1 on any rank, or rank 0 seeing the job's time limit close
(`JobDeadline`), sets the stop slot; the all-reduce makes every rank stop after the same step
and save together.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time

import torch
import torch.distributed as dist

from . import stop_signals

log = logging.getLogger(__name__)


class NumericalFault(RuntimeError):
    """Too many optimizer steps in a row were skipped for non-finite values."""


class StepGuard:
    """Agrees on non-finite losses and stop signals across ranks; counts skipped steps."""

    def __init__(self, max_consecutive_skips: int, deadline: JobDeadline | None = None, rollback_on_skips: int = 0):
        self.max_consecutive = max_consecutive_skips
        self.deadline = deadline
        # with the spike guard: the skipped steps in a row it rolls back (not a stop, unless no checkpoint)
        self.rollback_on_skips = rollback_on_skips
        self.means: dict[str, float] = {}  # the last step's `watch` values, means over micro-steps and ranks
        self._names: list[str] = []
        self._checks = 0  # micro-steps checked in this step
        self.skipped = 0  # steps skipped over the whole run (restored on resume)
        self.consecutive = 0
        self._flags: torch.Tensor | None = None  # summed check() flags of the current step
        self.stop_requested = False
        self.signal_name: str | None = None
        stop_signals.catch()  # launch.py already does, before its imports; train() may be called without it

    def check(self, loss: torch.Tensor, watch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Agree with every rank on this micro-step's loss; -> the loss to back-propagate: NaN times the
        loss on every rank when any rank's loss is non-finite, so that DeepSpeed skips the step.
        Stays on the device (no host sync); `record` reads the outcome after the optimizer step.
        `watch`: values (the loss terms) summed over ranks in the same all-reduce; `record` leaves their
        mean over micro-steps and ranks in `means` (what the spike guard reads: no collective of its own)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        names = list(watch or {})
        flags = torch.zeros(world + 1 + len(names), dtype=torch.float32, device=loss.device)
        if names:
            flags[world + 1:] = torch.stack([watch[k].detach().float() for k in names])
        self._names = names
        self._checks += 1
        flags[rank] = (~torch.isfinite(loss.detach())).float()
        if self.signal_name is None:
            self.signal_name = stop_signals.take()
        if self.signal_name is None and self.deadline is not None and self.deadline.due():
            self.signal_name = "time limit"
        flags[world] = float(self.signal_name is not None)
        if world > 1:
            dist.all_reduce(flags)
        self._flags = flags if self._flags is None else self._flags + flags
        return loss * torch.where(flags[:world].sum() > 0, float("nan"), 1.0)

    def record(self, applied: bool, step: int, losses: dict[str, torch.Tensor], newest_checkpoint) -> bool:
        """After the optimizer step of `step` (1-based): count it if it was skipped, and stop the run
        after `max_consecutive` skips in a row. -> whether the step was applied."""
        flags, self._flags = self._flags.tolist(), None  # the one read of the step (a host sync on a GPU)
        names = self._names
        world = len(flags) - 1 - len(names)
        if names:
            count = self._checks * world
            self.means = {k: v / count for k, v in zip(names, flags[world + 1:])}
        self._checks = 0
        self.stop_requested = self.stop_requested or flags[world] > 0
        bad = [r for r in range(world) if flags[r] > 0]
        if applied:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        what = f"non-finite loss on rank(s) {', '.join(map(str, bad))}" if bad else "non-finite gradient norm"
        shown = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
        log.warning("step %d skipped on every rank (%s; loss terms here: %s): weights, optimizer and EMA teacher "
                    "unchanged; %d in a row, %d in this run", step, what, shown, self.consecutive, self.skipped)
        if self.consecutive == self.rollback_on_skips:
            return False  # the spike guard rolls back (trainer/spike_guard.py); with no checkpoint, the limit stands
        if self.consecutive >= self.max_consecutive:
            newest = newest_checkpoint()
            raise NumericalFault(
                f"{self.consecutive} optimizer steps in a row skipped for non-finite values, the last at step {step} "
                f"({what}; loss terms: {shown}); the newest complete checkpoint is {newest or 'none'}: "
                "resume from it with a lower optim.lr or a larger optim.warmup_steps")
        return False


def _seconds(left: str) -> float | None:
    """squeue's %L: `MM:SS`, `HH:MM:SS` or `D-HH:MM:SS`; None for UNLIMITED / NOT_SET / INVALID."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", left.strip())
    if m is None:
        return None
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def job_end_time(environ=None, squeue: str = "squeue") -> float | None:
    """When this Slurm job's time limit ends (a UNIX time), or None outside a time-limited job.
    SLURM_JOB_END_TIME where Slurm sets it (22.05 does not); otherwise squeue's time left, which
    needs no clock or time-zone agreement with the controller."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_JOB_END_TIME", "").isdigit() and int(env["SLURM_JOB_END_TIME"]) > 0:
        return float(env["SLURM_JOB_END_TIME"])
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run([squeue, "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("cannot read the time left of Slurm job %s (%s): only signals will stop it before its limit",
                    job, e)
        return None
    left = _seconds(out.stdout) if out.returncode == 0 else None
    return None if left is None else time.time() + left


class JobDeadline:
    """Stop before the job's time limit: due once the time left is below the margin plus the longest
    optimizer step seen (the stop happens after the current step, then a save, which the margin
    covers)."""

    def __init__(self, end_time: float, margin_s: float):
        self.end_time, self.margin = end_time, margin_s
        self.longest_step = 0.0
        self._steps = 0

    @classmethod
    def from_job(cls, margin_s: float) -> JobDeadline | None:
        end = job_end_time() if margin_s > 0 else None
        if end is None:
            return None
        log.info("job time limit in %.0f s: saving and stopping %d s + one step before it", end - time.time(), margin_s)
        return cls(end, margin_s)

    def observe(self, seconds: float) -> None:
        """One optimizer step's time, without the saves and evaluations between steps. The first
        step (warm-up, compilation) counts only until a second one is seen."""
        self._steps += 1
        self.longest_step = seconds if self._steps <= 2 else max(self.longest_step, seconds)

    def due(self) -> bool:
        return time.time() + self.margin + self.longest_step >= self.end_time
