"""Checkpoints: DeepSpeed's sharded engine state plus our per-rank parts, saved atomically.

Layout: `<run>/checkpoints/step00001200/` holds DeepSpeed's files (the trainable parameters, their
optimizer state and the module's buffers; no frozen teacher), `rank00000.pt` ... (our parts: step,
EMA shadow slice, buffers in fp32, data position, RNG states, frozen-teacher file hash, config) and
`COMPLETE`, written by
rank 0 after every rank has finished. `<run>/checkpoints/latest` names the newest complete tag and
moves only after `COMPLETE` exists; a tag without `COMPLETE` is never loaded. Older tags beyond
`keep` are deleted after the new one is complete, and so are incomplete tags older than it (left
by a crash during a save).

A save that fails on any rank (disk full, quota, I/O error) is agreed on by all ranks: no
`COMPLETE`, `latest` stays, nothing older is deleted, and `CheckpointError` stops the run. Before
writing, every rank checks that its file system has room for another checkpoint as large as the
newest one, and warns when room for fewer than three is left.

Loading trusts nothing: every pickle in a checkpoint is opened with `torch.load(weights_only=True)`
(DeepSpeed's own files too, whose two classes are allow-listed), so a file with code in it is
refused (`UntrustedFileError`) before DeepSpeed reads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

WARN_BELOW_CHECKPOINTS = 3  # warn when the disk has room for fewer checkpoints than this


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous ones are intact."""


class UntrustedFileError(ValueError):
    """A checkpoint or weights file holds objects other than tensors and plain containers."""


def deepspeed_safe_globals() -> list:
    # What DeepSpeed pickles into its optimizer states besides tensors and plain containers
    # (fragment_address: a two-int dataclass in ZeRO-1/2's bf16 optimizer files).
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_weights_only(path: str | Path) -> None:
    """Unpickle `path` with `weights_only=True` (memory-mapped: the tensors are not read), allowing
    DeepSpeed's bookkeeping classes; raise `UntrustedFileError` naming the file otherwise."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # not a zip-format file: it cannot be memory-mapped, read it whole
                    raise
                torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError ... for these
        first = str(e).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise UntrustedFileError(f"{path} is not a plain tensor file (refused to unpickle it: {detail.strip()}); "
                                 "only load checkpoints you wrote or trust") from None


def _all_ranks_ok(ok: bool) -> bool:
    if not dist.is_initialized():
        return ok
    # On the collective backend's device: NCCL reduces no CPU tensors
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# What trainer.engine.param_groups puts on every optimizer group beside torch's keys.
GROUP_KEYS = ("lr_scale", "wd_scale", "lr_factor")


@contextlib.contextmanager
def group_keys_kept(optimizer):
    """A checkpoint load replaces each optimizer group's dict with the saved one (torch's
    `load_state_dict`; DeepSpeed 0.19's universal load even gives every group group 0's): put ours
    back as this run built them, so a checkpoint written before a key existed gets it too."""
    kept = [{k: g[k] for k in GROUP_KEYS if k in g} for g in optimizer.param_groups]
    yield
    for group, keys in zip(optimizer.param_groups, kept):
        group.update(keys)


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int):
        self.dir, self.keep = Path(directory), keep

    def complete_tags(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if (p / "COMPLETE").is_file())

    def latest(self) -> Path | None:
        """The newest complete checkpoint: `latest` if it points at one, else the newest marked tag."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            tag = pointer.read_text().strip()
            if (self.dir / tag / "COMPLETE").is_file():
                return self.dir / tag
            log.warning("checkpoint %s named by %s is incomplete; looking for an older one", tag, pointer)
        tags = self.complete_tags()
        return self.dir / tags[-1] if tags else None

    def check_space(self) -> None:
        """Every rank calls this before a save: stop cleanly, before writing anything, when some
        rank's disk cannot hold another checkpoint as large as the newest."""
        newest = self.latest()
        need = _size(newest) if newest is not None else 0
        self.dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dir).free
        if not _all_ranks_ok(free > need * 1.05):
            raise CheckpointError(
                f"not enough free space in {self.dir} for another checkpoint (the newest, {newest}, takes "
                f"{need / 2**30:.2f} GiB; {free / 2**30:.2f} GiB free on rank {_rank()}); nothing was written, "
                "free some space (or lower checkpoint.keep) and run the same command to resume")
        if need and free < WARN_BELOW_CHECKPOINTS * need:
            log.warning("%s has room for only %d more checkpoint(s) of %.2f GiB (%.2f GiB free)", self.dir,
                        free // need, need / 2**30, free / 2**30)

    def save(self, engine, step: int, parts: dict) -> Path:
        """Every rank calls this. `parts`: this rank's named state (tensors, numbers, strings)."""
        self.check_space()
        tag = f"step{step:08d}"
        path = self.dir / tag
        error = None
        try:
            # Frozen parameters (the EMA teacher, whose fp32 shadow is in `parts`, and a frozen CLIP
            # teacher, reloaded from its own file) are left out: a checkpoint holds what training changes.
            engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False, exclude_frozen_parameters=True)
            torch.save({"step": step, **parts}, path / f"rank{_rank():05d}.pt")
        except OSError as e:  # disk full, quota, I/O error: tell every rank, keep what exists
            error = e
            log.error("rank %d could not write checkpoint %s: %s", _rank(), path, e)
        if not _all_ranks_ok(error is None):  # also the barrier: every rank's files are on disk
            if _rank() == 0:
                shutil.rmtree(path, ignore_errors=True)  # never COMPLETE, so never loaded; free its space
            raise CheckpointError(
                f"saving step {step} to {path} failed ({error or 'on another rank'}); the newest complete "
                f"checkpoint is still {self.latest() or 'none'} (nothing was deleted); fix the cause and run the "
                "same command to resume from it")
        if _rank() == 0:
            (path / "COMPLETE").write_text(f"{step}\n")
            tmp = self.dir / f".latest.{os.getpid()}"
            tmp.write_text(tag)
            os.replace(tmp, self.dir / "latest")
            complete = self.complete_tags()
            stale = [p.name for p in self.dir.glob("step*") if p.is_dir() and p.name < tag and p.name not in complete]
            for old in [t for t in complete[: -self.keep] if t != self.best_tag()] + stale:
                shutil.rmtree(self.dir / old, ignore_errors=True)
        _barrier()
        return path

    def best_tag(self) -> str | None:
        """The checkpoint `best` names (a method's `best_by` measure), kept beside the newest ones."""
        pointer = self.dir / "best"
        return pointer.read_text().split()[0] if pointer.is_file() else None

    def mark_best(self, path: Path, measure: str, value: float) -> None:
        """Rank 0, after `path` was saved complete: it is now `best` (the previous best goes, unless it is
        still among the newest `keep`)."""
        before = self.best_tag()
        tmp = self.dir / f".best.{os.getpid()}"
        tmp.write_text(f"{path.name} {measure} {value}\n")
        os.replace(tmp, self.dir / "best")
        if before and before != path.name and before not in self.complete_tags()[-self.keep:]:
            shutil.rmtree(self.dir / before, ignore_errors=True)

    def read_parts(self, path: str | Path) -> dict:
        """This rank's parts of the checkpoint at `path` (cheap: read before restoring the engine)."""
        path = Path(path)
        if not (path / "COMPLETE").is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
        own = path / f"rank{_rank():05d}.pt"
        if not own.is_file():
            raise FileNotFoundError(f"{own} is missing: the checkpoint was written by fewer ranks (trainer/loop.py "
                                    "resumes it on another number of ranks through trainer/resharding.py)")
        try:
            return torch.load(own, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - report which file and why, in one line
            check_weights_only(own)
            raise

    def load_engine(self, engine, path: str | Path) -> None:
        """Restore DeepSpeed's state (trainable parameters, optimizer, buffers) from `path`."""
        path = Path(path)
        # DeepSpeed unpickles its files with weights_only=False: vet each one first.
        for f in sorted(path.glob("*.pt")):
            check_weights_only(f)
        # Not strict: the frozen parameters are absent by design (see `save`).
        with group_keys_kept(engine.optimizer):
            load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no engine state in {path}")
