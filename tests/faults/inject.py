"""Run launch.py with one fault injected into the real code path (for tests/faults/).

    python tests/faults/inject.py FAULT [FAULT ...] -- <launch.py arguments>

FAULT is one of
    nan:STEP[-LAST]@RANK   the batch of optimizer steps STEP..LAST (1-based) on RANK is NaN
    kill-in-save:STEP@RANK RANK kills itself (SIGKILL) after DeepSpeed wrote step STEP's files and
                           before our own parts and the COMPLETE marker exist
    fail-save:STEP@RANK    writing step STEP's checkpoint raises ENOSPC on RANK (disk full)
    disk-free:BYTES        every rank sees only BYTES free on the checkpoint file system
    hold:STEP              after optimizer step STEP every rank waits, before its next batch, until a
                           stop signal reaches it or it is killed (at most HOLD_S): a test signals or
                           kills a job that is certainly running, however slow the machine. Only in
                           a Slurm job's first run (SLURM_RESTART_COUNT 0): the requeued run goes on.
                           The losses do not change.
    worker-error:N         the loader's N-th image (1-based, in whichever process decodes it) raises
                           in its augmentation: a bug in a loader worker, not bad data
    spike:N@RANK           the loss terms of the N-th training forward on RANK (1-based, counted over
                           the process's life: steps redone after a rollback count again) times 1000
    skip-batches:N         the loader's first N batches after the start (or resume) are thrown away
    keys:DIR               each rank appends the sample keys of every batch it trains on to
                           DIR/keys.rank<R>.jsonl, one [call, keys] line per batch
"""

import errno
import os
import signal
import sys
import time
from collections import namedtuple
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402

import launch  # noqa: E402
import trainer.checkpoint  # noqa: E402
import trainer.loop  # noqa: E402
from trainer import stop_signals  # noqa: E402


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def parse(spec: str) -> tuple[str, str, int]:
    kind, _, rest = spec.partition(":")
    value, _, who = rest.partition("@")
    return kind, value, int(who or 0)


def inject_nan(first: int, last: int, who: int) -> None:
    normalize = trainer.loop.normalize_batch
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        batch = normalize(*args, **kwargs)
        calls["n"] += 1  # optim.grad_accum is 1 in these tests: call n is optimizer step n
        if rank() == who and first <= calls["n"] <= last:
            batch["global_crops"] = batch["global_crops"] * float("nan")
        return batch

    trainer.loop.normalize_batch = poisoned


HOLD_S = 300.0


def hold_after(step: int) -> None:
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        return
    normalize = trainer.loop.normalize_batch
    calls = {"n": 0}

    def held(*args, **kwargs):
        calls["n"] += 1  # optim.grad_accum is 1 in these tests: call n is optimizer step n
        if calls["n"] == step + 1:
            sys.stderr.write(f"inject: rank {rank()} holds after step {step} until a stop signal\n")
            end = time.monotonic() + HOLD_S
            while stop_signals.received is None and time.monotonic() < end:
                time.sleep(0.05)  # (the signal's handler runs between sleeps)
        return normalize(*args, **kwargs)

    trainer.loop.normalize_batch = held


def wrap_save(step: int, who: int, action) -> None:
    original = deepspeed.DeepSpeedEngine.save_checkpoint

    def save_checkpoint(self, save_dir, tag=None, *args, **kwargs):
        result = original(self, save_dir, tag, *args, **kwargs)
        if tag == f"step{step:08d}" and rank() == who:
            action()
        return result

    deepspeed.DeepSpeedEngine.save_checkpoint = save_checkpoint


def die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def disk_full() -> None:
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def report_free(free: int) -> None:
    usage = namedtuple("usage", "total used free")
    trainer.checkpoint.shutil.disk_usage = lambda path: usage(10**12, 10**12 - free, free)


def worker_error(n: int) -> None:
    import data.transforms

    real, calls = data.transforms.MultiCrop.__call__, {"n": 0}

    def failing(self, img):
        calls["n"] += 1
        if calls["n"] == n:
            raise ValueError("injected: an augmentation bug in a loader worker")
        return real(self, img)

    data.transforms.MultiCrop.__call__ = failing


def inject_spike(n: int, who: int, factor: float = 1000.0) -> None:
    build, calls = trainer.loop.build_engine, {"n": 0}

    def built(*args, **kwargs):
        engine, ema = build(*args, **kwargs)
        forward = engine.module.forward

        def spiking(batch, values):
            out = forward(batch, values)
            calls["n"] += 1
            if rank() == who and calls["n"] == n:
                out = {k: v * factor for k, v in out.items()}
            return out

        engine.module.forward = spiking  # (nn.Module.__call__ finds the instance's forward; hooks still run)
        return engine, ema

    trainer.loop.build_engine = built


def skip_batches(n: int) -> None:
    build = trainer.loop.build_train_loader

    def built(*args, **kwargs):
        loader = build(*args, **kwargs)
        real = type(loader).__iter__

        def skipping(self):
            batches = real(self)
            for _ in range(n):
                next(batches)
            return batches

        loader.__class__ = type("Skipping", (type(loader),), {"__iter__": skipping})
        return loader

    trainer.loop.build_train_loader = built


def log_keys(directory: str) -> None:
    import json

    normalize, calls = trainer.loop.normalize_batch, {"n": 0}

    def logged(batch, *args, **kwargs):
        calls["n"] += 1
        with open(Path(directory) / f"keys.rank{rank()}.jsonl", "a") as f:
            f.write(json.dumps([calls["n"], list(batch.get("keys", []))]) + "\n")
        return normalize(batch, *args, **kwargs)

    trainer.loop.normalize_batch = logged


def main() -> int:
    split = sys.argv.index("--")
    for spec in sys.argv[1:split]:
        kind, value, who = parse(spec)
        if kind == "nan":
            first, _, last = value.partition("-")
            inject_nan(int(first), int(last or first), who)
        elif kind == "kill-in-save":
            wrap_save(int(value), who, die)
        elif kind == "fail-save":
            wrap_save(int(value), who, disk_full)
        elif kind == "disk-free":
            report_free(int(value))
        elif kind == "hold":
            hold_after(int(value))
        elif kind == "worker-error":
            worker_error(int(value))
        elif kind == "spike":
            inject_spike(int(value), who)
        elif kind == "skip-batches":
            skip_batches(int(value))
        elif kind == "keys":
            log_keys(value)
        else:
            raise SystemExit(f"unknown fault {spec!r}")
    torch.set_num_threads(1)
    stop_signals.catch()  # what running launch.py as a script does first
    return launch.main(sys.argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
