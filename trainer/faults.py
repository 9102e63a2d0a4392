"""Faults the train loop survives: non-finite steps, and pre-emption signals.

Both need every rank to agree, so both are decided by one small all-reduce per micro-step:
`[this rank's loss is non-finite (one slot per rank)..., a stop signal arrived]`.

Non-finite steps. DeepSpeed already skips an optimizer step whose global gradient norm is inf or
NaN (ZeRO-3 always; bf16 and fp16 at every stage: `bf16.check_grad_overflow`, which
`ds_config.py` keeps on), and that norm is all-reduced, so every rank skips together. A
non-finite *loss* on one rank is turned into that same event: every rank multiplies its loss by
NaN, which makes every gradient NaN, so the step is skipped on all ranks. `engine.was_step_applied()`
then says whether the step happened; a skipped step updates neither the weights, the optimizer
state nor the EMA teacher.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class NumericalFault(RuntimeError):
    """Too many optimizer steps in a row were skipped for non-finite values."""


class StepGuard:
    """Agrees on non-finite losses and stop signals across ranks; counts skipped steps."""

    def __init__(self, max_consecutive_skips: int, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.max_consecutive = max_consecutive_skips
        self.skipped = 0  # steps skipped over the whole run (restored on resume)
        self.consecutive = 0
        self._flags: torch.Tensor | None = None  # summed check() flags of the current step
        self.stop_requested = False
        self.signal_name: str | None = None
        self._signal_seen = False
        for sig in signals:  # Slurm sends SIGTERM (or --signal=USR1@t) ahead of pre-emption / the time limit
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: saving from inside a handler would interrupt a collective half-way.
        self._signal_seen = True
        self.signal_name = signal.Signals(signum).name

    def check(self, loss: torch.Tensor) -> torch.Tensor:
        """Agree with every rank on this micro-step's loss; -> the loss to back-propagate: NaN times the
        loss on every rank when any rank's loss is non-finite, so that DeepSpeed skips the step.
        Stays on the device (no host sync); `record` reads the outcome after the optimizer step."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        flags = torch.zeros(world + 1, dtype=torch.float32, device=loss.device)
        flags[rank] = (~torch.isfinite(loss.detach())).float()
        flags[world] = float(self._signal_seen)
        if world > 1:
            dist.all_reduce(flags)
        self._flags = flags if self._flags is None else self._flags + flags
        return loss * torch.where(flags[:world].sum() > 0, float("nan"), 1.0)

    def record(self, applied: bool, step: int, losses: dict[str, torch.Tensor], newest_checkpoint) -> bool:
        """After the optimizer step of `step` (1-based): count it if it was skipped, and stop the run
        after `max_consecutive` skips in a row. -> whether the step was applied."""
        flags, self._flags = self._flags.cpu(), None
        world = len(flags) - 1
        self.stop_requested = self.stop_requested or bool(flags[world] > 0)
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
        if self.consecutive >= self.max_consecutive:
            newest = newest_checkpoint()
            raise NumericalFault(
                f"{self.consecutive} optimizer steps in a row skipped for non-finite values, the last at step {step} "
                f"({what}; loss terms: {shown}); the newest complete checkpoint is {newest or 'none'}: "
                "resume from it with a lower optim.lr or a larger optim.warmup_steps")
        return False
