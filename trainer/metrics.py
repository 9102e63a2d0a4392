"""Metrics sinks (rank 0 only): metrics.jsonl and TensorBoard events in the run directory, and the
experiment trackers (trainer/tracking.py).

A run resumes from its newest checkpoint, so the steps after it are trained again, with the same values
(resume is exact). metrics.jsonl is cut back to the checkpoint's step when the run starts, so it holds
each step once; TensorBoard purges the later steps itself (`purge_step`); a tracker keeps what it was
sent, so the writer never sends it a step at or below the highest one it had (W&B keeps its steps
increasing)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def read_records(path: Path) -> tuple[list[dict], int]:
    """(metrics.jsonl's records, its line count); a line cut short by a kill (the last one) is left out."""
    lines = path.read_text().splitlines() if path.is_file() else []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out, len(lines)


def rewrite(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)  # a kill leaves the old file or the new one, never half of one


def cut_back(path: Path, step: int) -> tuple[list[dict], int]:
    """Keep the records of steps <= `step` in `path` -> (the records cut, the highest step the file had)."""
    records, lines = read_records(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != lines:
        rewrite(path, kept)
    return [r for r in records if r.get("step", 0) > step], max((r.get("step", 0) for r in records), default=-1)


class MetricsWriter:
    """`resumed_at`: the step this launch starts from (0 for a new run): later records are cut."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True, trackers=None,
                 resumed_at: int = 0):
        self.enabled = enabled
        self.tb = None
        self.trackers = trackers
        self.sent_up_to = -1  # the highest step the trackers already have
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        _, self.sent_up_to = cut_back(self.path, resumed_at)
        self.jsonl = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resumed_at + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):  # (a value that could not be measured is None)
                    self.tb.add_scalar(key, value, step)
        if self.trackers and step > self.sent_up_to:
            self.trackers.log(step, values)

    def roll_back(self, to_step: int, spike_step: int, aside: Path) -> None:
        """A spike at `spike_step` rolled the run back to `to_step`: the records of the abandoned steps
        move from metrics.jsonl to `aside`, so metrics.jsonl stays the trained run, each step once. The
        trackers keep what they had (they cannot take a step back); they get the redone steps from
        past `spike_step` on, and a `spike_rolled_back_to` mark at it."""
        if not self.enabled:
            return
        self.jsonl.close()
        cut, _ = cut_back(self.path, to_step)
        aside.parent.mkdir(parents=True, exist_ok=True)
        rewrite(aside, cut + [{"step": spike_step, "spike_rolled_back_to": to_step}])
        self.jsonl = open(self.path, "a", buffering=1)
        self.write(to_step, {"spike_rolled_back_from": spike_step})
        if self.trackers and spike_step >= self.sent_up_to:
            self.trackers.log(spike_step, {"spike_rolled_back_to": to_step})
        self.sent_up_to = max(self.sent_up_to, spike_step)
        if self.tb is not None:  # TensorBoard hides the abandoned steps (its own purge, on the next event)
            self.tb.close()
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=to_step + 1)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
