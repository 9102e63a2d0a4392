"""Checkpoints: DeepSpeed's sharded engine state plus our per-rank parts, saved atomically.

Layout: `<run>/checkpoints/step00001200/` holds DeepSpeed's files (the trainable parameters, their
optimizer state and the module's buffers; no frozen teacher), `rank00000.pt` ... (our parts: step,
EMA shadow slice, buffers in fp32, data position, RNG states, frozen-teacher file hash, config) and
`COMPLETE`, written by
rank 0 after every rank has finished. `<run>/checkpoints/latest` names the newest complete tag and
moves only after `COMPLETE` exists; a tag without `COMPLETE` is never loaded. Older tags beyond
`keep` are deleted after the new one is complete.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


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

    def save(self, engine, step: int, parts: dict) -> Path:
        """Every rank calls this. `parts`: this rank's named state (tensors, numbers, strings)."""
        tag = f"step{step:08d}"
        path = self.dir / tag
        # Frozen parameters (the EMA teacher, whose fp32 shadow is in `parts`, and a frozen CLIP
        # teacher, reloaded from its own file) are left out: a checkpoint holds what training changes.
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False, exclude_frozen_parameters=True)
        torch.save({"step": step, **parts}, path / f"rank{_rank():05d}.pt")
        _barrier()  # every rank's files are on disk
        if _rank() == 0:
            (path / "COMPLETE").write_text(f"{step}\n")
            tmp = self.dir / f".latest.{os.getpid()}"
            tmp.write_text(tag)
            os.replace(tmp, self.dir / "latest")
            for old in self.complete_tags()[: -self.keep]:
                shutil.rmtree(self.dir / old, ignore_errors=True)
        _barrier()
        return path

    def read_parts(self, path: str | Path) -> dict:
        """This rank's parts of the checkpoint at `path` (cheap: read before restoring the engine)."""
        path = Path(path)
        if not (path / "COMPLETE").is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
        own = path / f"rank{_rank():05d}.pt"
        if not own.is_file():
            raise FileNotFoundError(f"{own} is missing: the checkpoint was written by fewer ranks")
        return torch.load(own, map_location="cpu", weights_only=True)

    def load_engine(self, engine, path: str | Path) -> None:
        """Restore DeepSpeed's state (trainable parameters, optimizer, buffers) from `path`."""
        path = Path(path)
        # Not strict: the frozen parameters are absent by design (see `save`).
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no engine state in {path}")
