"""Resuming a checkpoint written by R ranks on R' != R ranks (ZeRO-3).

DeepSpeed's part: its sharded files are converted once by its own converter
(`python -m deepspeed.checkpoint.ds_to_universal`) into `<run>/universal/<tag>/` (one folder per
parameter: fp32 weights and Adam moments, whole), which an engine built with
`"checkpoint": {"load_universal": true}` loads at any world size. Two things DeepSpeed 0.19's
universal load gets wrong are put right after it: every optimizer group receives saved group 0's
extra keys (our lr_scale / wd_scale / lr_factor), and the Adam step counter becomes one tensor
shared by all groups (it then advances once per group per step, skewing the bias correction).

Our parts (`rank<N>.pt`) are re-sliced here:
- the EMA shadow: each parameter's slices from the R files, concatenated and cut to its numel (the
  last slice's padding is not zeros), re-partitioned as ZeRO-3 partitions for R' (rank r owns
  [r k, (r + 1) k), k = ceil(numel / R'), zero-padded);
- buffers (iBOT's centers), the step, the summary and the skip count are global: rank 0's;
- RNG states: new rank r takes old rank r's, and a rank beyond the old count is reseeded from
  old rank r mod R's state and r (not a copy of another rank's draws);
- the data position: a stream's shards depend on ranks x workers, so the old per-stream offsets mean
  nothing to the new streams. The new streams start the first epoch no old stream has taken a
  sample from: no sample seen before is shown again before that epoch, and the samples of the epoch
  before it that no old stream had reached are skipped (at most the remainder of one epoch). Failure
  counters are carried over (old rank r's to new rank r mod R').

The conversion runs on rank 0 while the others wait in a collective: at a scale where it takes
longer than the process group's timeout (30 minutes by default), run the logged command by hand
first (a complete `<run>/universal/<tag>/COMPLETE` is reused).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError, _all_ranks_ok, _rank, check_weights_only, group_keys_kept

log = logging.getLogger(__name__)

def saved_world_size(path: str | Path) -> int:
    """How many ranks wrote the checkpoint at `path` (its rank<N>.pt files)."""
    return len(list(Path(path).glob("rank*.pt")))


def universal_dir(path: Path) -> Path:
    """Where the universal form of checkpoint `path` (<run>/checkpoints/<tag>) goes: <run>/universal/<tag>
    (not under checkpoints/, whose incomplete-looking tags a later save would delete)."""
    return path.parent.parent / "universal" / path.name


def convert(path: Path) -> Path:
    """DeepSpeed's universal form of `path`, converted by rank 0 (once: reused when complete); every
    rank returns when it is there. The command it runs is logged, to be run by hand as well."""
    out = universal_dir(path)
    error = ""
    if _rank() == 0 and not (out / "COMPLETE").is_file():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
               "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        log.info("converting %s (%d ranks) to a universal checkpoint: %s", path, saved_world_size(path), " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not (out / "zero").is_dir():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            error = f"ds_to_universal failed on {path} (exit {proc.returncode}): {' | '.join(tail)}"
        else:
            (out / "COMPLETE").write_text("universal\n")
    if not _all_ranks_ok(not error):
        raise CheckpointError(error or "converting the checkpoint to a universal one failed on rank 0")
    return out


def load_engine(engine, universal: Path) -> None:
    """DeepSpeed's state from its universal form (the engine was built with checkpoint.load_universal)."""
    for f in sorted(universal.rglob("*.pt")):  # DeepSpeed unpickles them with weights_only=False
        check_weights_only(f)
    with group_keys_kept(engine.optimizer):
        load_path, _ = engine.load_checkpoint(str(universal.parent), tag=universal.name, load_module_strict=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no engine state in {universal}")
    opt = engine.optimizer
    for flat in getattr(opt, "fp32_partitioned_groups_flat", []):
        state = opt.optimizer.state.get(flat, {})
        if "step" in state and torch.is_tensor(state["step"]):
            state["step"] = state["step"].clone()


def reslice_shadow(old: list[list[torch.Tensor]], numels: list[int], rank: int, world: int) -> list[torch.Tensor]:
    """Per parameter: the R old slices -> this rank's slice of a `world`-way ZeRO-3 partition."""
    out = []
    for i, numel in enumerate(numels):
        full = torch.cat([slices[i].flatten() for slices in old])[:numel]  # the padding is not zeros
        k = -(-numel // world)
        padded = torch.cat([full, full.new_zeros(k * world - numel)])
        out.append(padded[rank * k:(rank + 1) * k].clone())
    return out


def merged_parts(path: Path, rank: int, world: int, ema=None) -> dict:
    """This rank's parts for `world` ranks from a checkpoint written by another number of ranks."""
    # Memory-mapped: each rank reads only what it copies, not R whole fp32 shadows
    old = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in sorted(path.glob("rank*.pt"))]
    parts = dict(old[0])  # step, buffers, summary, skipped steps, frozen-teacher hashes, config: global
    parts["rng"] = old[rank % len(old)]["rng"]
    parts["rng_reseed"] = rank if rank >= len(old) else None
    if ema is not None and "ema" in parts:
        if all(hasattr(p, "ds_tensor") for p in ema.teachers):
            numels = [p.ds_numel for p in ema.teachers]
            shadow = reslice_shadow([o["ema"]["shadow"] for o in old], numels, rank, world)
        else:  # below ZeRO-3 every rank holds the whole shadow
            shadow = old[0]["ema"]["shadow"]
        parts["ema"] = {"names": old[0]["ema"]["names"], "shadow": shadow}
    # the first epoch no stream has taken from: a stream that has just begun epoch e took nothing of it
    epochs = [s["epoch"] + (s["consumed"] > 0) for o in old for s in o["data"]["streams"]]
    counters: dict[str, int] = {}
    for r, o in enumerate(old):
        if r % world == rank:
            for s in o["data"]["streams"]:
                for k, v in s["counters"].items():
                    counters[k] = counters.get(k, 0) + v
    parts["data"] = {"restart_epoch": max(epochs), "counters": counters,
                     "consumed": sum(s["consumed"] for o in old for s in o["data"]["streams"]),
                     "saved_ranks": len(old)}
    return parts


def reseed(rank: int) -> None:
    """Derive this rank's generators from the state it was given and its rank."""
    import random

    base = int(torch.randint(0, 2**62, (1,)).item())
    torch.manual_seed(base + rank)
    random.seed(base + rank)
