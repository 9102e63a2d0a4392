"""SIGTERM / SIGUSR1 (Slurm's warning ahead of the time limit or a pre-emption) ask the run to save and stop.

They are caught from launch.py's first lines, before its imports: a signal that arrives while a rank
still imports torch or builds the engine would otherwise kill it (their default action), and the
job would look crashed. Here it is only recorded (process state, as the signal is the process's);
the train loop's StepGuard takes it after each micro-step (`take`: once, so a later run in the same
process starts without it), agrees with every rank, and the run stops after that step with a save.
After training, `ignore()`: a late signal cannot turn a finished run into a killed process.
"""

from __future__ import annotations

import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# The name of the first stop signal this process got; a job script that got one before it started
# the ranks says so in MIMSCALE_STOP_REQUESTED (scripts/slurm/pretrain.sbatch).
received: str | None = os.environ.get("MIMSCALE_STOP_REQUESTED") or None


def _record(signum, frame) -> None:
    # Only a flag: saving from inside a handler would interrupt a collective half-way.
    global received
    received = received or signal.Signals(signum).name


def take() -> str | None:
    """The stop signal recorded and not yet taken (None if none), cleared."""
    global received
    name, received = received, None
    return name


def catch() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _record)


def ignore() -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
