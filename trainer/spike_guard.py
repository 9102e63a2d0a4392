"""Surviving a loss spike (`run.spike_guard`): see when one happens, and what a rollback records.

Every rank sees the same numbers (the loss terms' means over ranks come out of the step guard's
all-reduce, trainer/faults.py), so every rank decides the same thing at the same step without a
collective of its own. A step is a spike when its loss, or any of its terms, is above the running
median of the last `window` applied steps by more than `factor` robust deviations (1.4826 x the
median absolute deviation, at least `rel_floor` x |median|); a run of `nonfinite_steps` skipped
steps is one too. Spikes never enter the history.

The loop (trainer/loop.py) then restores the newest complete checkpoint, keeping the data stream
where it is: the batches of the steps since that checkpoint, the spike's among them, are never
trained on; `rollbacks.jsonl` records the rollback, and each rank writes the keys of the samples it
skipped under `rollbacks/`. More than `max_rollbacks` rollbacks
within `rollback_window` steps stop the run (`SpikeError`) rather than loop on a spike that is not
the data's.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections import deque
from pathlib import Path

from .faults import NumericalFault

log = logging.getLogger(__name__)


class SpikeError(NumericalFault):
    """Too many rollbacks in a row: the run stops (its newest checkpoint stays loadable)."""


class SpikeGuard:
    def __init__(self, cfg):
        """cfg: the `run.spike_guard` section."""
        self.cfg = cfg
        self.history: dict[str, deque] = {}
        self.rollbacks: list[int] = []  # the steps that were rolled back, this process's lifetime
        self.lr_until = 0  # the step below which the lowered lr holds

    def spike(self, step: int, means: dict[str, float], applied: bool, consecutive_skips: int) -> str | None:
        """After optimizer step `step`: the reason to roll back, or None (the step's values join the history)."""
        c = self.cfg
        if not applied:
            return (f"{consecutive_skips} non-finite steps in a row" if consecutive_skips >= c.nonfinite_steps
                    else None)
        reasons = []
        for name, value in means.items():
            past = self.history.get(name)
            if past is None or len(past) < c.min_history:
                continue
            median = statistics.median(past)
            mad = statistics.median(abs(v - median) for v in past)
            limit = median + c.factor * max(1.4826 * mad, c.rel_floor * abs(median))
            if not math.isfinite(value) or value > limit:
                reasons.append(f"{name} {value:.4g} > {limit:.4g} (median {median:.4g} of the last {len(past)} "
                               f"steps, MAD {mad:.3g})")
        if reasons:
            return "; ".join(reasons)
        for name, value in means.items():
            self.history.setdefault(name, deque(maxlen=c.window)).append(value)
        return None

    def rolled_back(self, step: int, restored_step: int) -> None:
        """Count a rollback of `step` to `restored_step`; raises SpikeError past `max_rollbacks` within
        `rollback_window` steps. The lowered lr (if any) holds for the `lr_scale_steps` steps after it."""
        c = self.cfg
        self.rollbacks = [s for s in self.rollbacks if s > step - c.rollback_window] + [step]
        if len(self.rollbacks) > c.max_rollbacks:
            raise SpikeError(
                f"{len(self.rollbacks)} rollbacks within {c.rollback_window} steps (at steps "
                f"{', '.join(map(str, self.rollbacks))}; run.spike_guard.max_rollbacks {c.max_rollbacks}): the "
                "spikes come back after skipping their data. Stopping; the newest complete checkpoint is kept. "
                "Resume it with a lower optim.lr, a longer optim.warmup_steps or a smaller optim.clip_grad")
        self.lr_until = restored_step + c.lr_scale_steps

    def lr_factor(self, step: int) -> float:
        """What the scheduled lr is multiplied by at `step` (0-based, as the schedules)."""
        return self.cfg.lr_scale if step < self.lr_until else 1.0


def skipped_keys_file(run_dir: Path, spike_step: int, rank: int) -> Path:
    """Where each rank writes the keys of the samples a rollback skipped on it, one per line."""
    return run_dir / "rollbacks" / f"step{spike_step:08d}.rank{rank:05d}.keys"


def write_skipped_keys(run_dir: Path, spike_step: int, rank: int, keys: list[str]) -> Path:
    """This rank's skipped sample keys (each rank its own file: at ImageNet scale a rollback skips
    millions of samples over the ranks, too many to gather into one line)."""
    path = skipped_keys_file(run_dir, spike_step, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text("".join(f"{k}\n" for k in keys))
    tmp.replace(path)
    return path


def record_rollback(run_dir: Path, spike_step: int, restored: Path, restored_step: int, reason: str,
                    counts: list[int], cfg) -> dict:
    """Append the rollback to run_dir/rollbacks.jsonl (rank 0); -> the record. `counts`: how many samples
    each rank skipped (those of steps restored_step + 1 .. spike_step; their keys in `skipped_keys_file`)."""
    record = {"time": time.time(), "spike_step": spike_step, "reason": reason, "restored": str(restored),
              "restored_step": restored_step, "skipped_steps": [restored_step + 1, spike_step],
              "lr_scale": cfg.lr_scale, "lr_scale_steps": cfg.lr_scale_steps, "skipped_samples": counts,
              "skipped_keys": [str(skipped_keys_file(run_dir, spike_step, r).relative_to(run_dir))
                               for r in range(len(counts))]}
    with open(run_dir / "rollbacks.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record
