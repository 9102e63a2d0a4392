"""A run's state in and out of its checkpoints: which checkpoint a run resumes from, on how many
ranks it was written (another number goes through DeepSpeed's universal checkpoint,
trainer/resharding.py), putting back the engine, the EMA shadow, the data position, the buffers
and the RNG, and what each rank saves beside DeepSpeed's files."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from data.pipeline import PositionMismatch
from models.teachers import TeacherWeightsError

from . import resharding
from .checkpoint import Checkpointer, CheckpointError, rng_state, set_rng_state
from .config import Config, to_dict
from .methods import frozen_files

log = logging.getLogger(__name__)


@dataclass
class Resume:
    """What a run starts from: nothing, or `source` (written by `saved_ranks` ranks)."""

    source: Path | None = None
    saved_ranks: int = 0
    reshard: bool = False  # written by another number of ranks than this run's
    step: int = 0
    summary: dict = field(default_factory=dict)
    skipped: int = 0

    @classmethod
    def find(cls, ckpt: Checkpointer, resume: str | None, world_size: int, ds_config: dict) -> tuple[Resume, dict]:
        """-> (the resume point: `--resume`, else the newest complete checkpoint; the DeepSpeed config,
        told to load a universal checkpoint when the engine must be built for one)."""
        source = Path(resume) if resume else ckpt.latest()
        if source is None:
            return cls(), ds_config
        saved = resharding.saved_world_size(source)
        reshard = (source / "COMPLETE").is_file() and saved != world_size
        if reshard:
            if ds_config.get("zero_optimization", {}).get("stage") != 3:
                raise CheckpointError(f"{source} was written by {saved} ranks, this run has {world_size}: resuming "
                                      "on another number of ranks needs ZeRO stage 3 (--ds_config zero3.json), or "
                                      "the same number of ranks")
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        return cls(source, saved, reshard), ds_config

    def restore(self, ckpt: Checkpointer, engine, ema, loader, cfg: Config, rank: int, world_size: int,
                global_batch: int) -> None:
        """Everything back as it was saved; sets `step`, `summary` and `skipped`. A frozen network's
        file must be the one the run was trained with (its sha256). `loader` None: the data position
        is left where it is (a spike's rollback)."""
        source = self.source
        if self.reshard:
            universal = resharding.convert(source)
            parts = resharding.merged_parts(source, rank, world_size, ema)
            saved = json.loads(parts["config"])
            log.warning("%s was written by %d ranks; resumed on %d through a universal checkpoint. The global "
                        "batch is now %d images (it was %d): the schedules go on by step, the lr is not rescaled",
                        source, self.saved_ranks, world_size, global_batch,
                        saved["data"]["batch_size"] * saved["optim"]["grad_accum"] * self.saved_ranks)
        else:
            parts = ckpt.read_parts(source)
        for name, path in frozen_files(cfg).items():
            sha, saved_sha = getattr(engine.module, name).weights_sha256, str(parts.get(f"{name}_sha256"))
            if saved_sha != sha:
                raise TeacherWeightsError(
                    f"{path} (sha256 {sha[:12]}), the frozen {name}'s weights, is not the file {source} was trained "
                    f"with (sha256 {saved_sha[:12]}); point the config at that file")
        if self.reshard:
            resharding.load_engine(engine, universal)
        else:
            ckpt.load_engine(engine, source)
        if ema is not None:
            ema.load_state_dict(parts["ema"])
        if loader is None:  # a rollback (trainer/spike_guard.py): the stream goes on past the skipped steps
            pass
        elif self.reshard:
            d = parts["data"]
            loader.restart(d["restart_epoch"], d["counters"])
            log.warning("data: %d samples taken by %d ranks' streams; the %d new ones start epoch %d (no sample "
                        "seen is shown again before it; what no old stream reached in the epoch before is skipped)",
                        d["consumed"], d["saved_ranks"], world_size * max(1, cfg.data.num_workers), d["restart_epoch"])
        else:
            try:
                loader.load_state_dict(parts["data"])
            except PositionMismatch as e:  # e.g. data.num_workers changed: the model state is still good
                log.warning("%s; the data stream starts over from its first epoch", e)
        for name, buf in engine.module.named_buffers():
            buf.copy_(parts["buffers"][name])
        set_rng_state(parts["rng"])
        if parts.get("rng_reseed") is not None:  # a new rank beyond the old count: not a copy of another's draws
            resharding.reseed(parts["rng_reseed"])
        self.step, self.summary, self.skipped = parts["step"], parts.get("summary", {}), parts.get("skipped_steps", 0)
        log.info("resumed from %s at step %d", source, self.step)


def client_state(cfg: Config, method, loader, ema, summary: dict, skipped: int, command: str) -> dict:
    """This rank's parts beside DeepSpeed's files: the data position, the buffers, the RNG, the run's
    summary and config, the EMA shadow; a frozen network only as its file's sha256 (it is reloaded
    from the file)."""
    parts = {"data": loader.state_dict(), "buffers": dict(method.named_buffers()), "rng": rng_state(),
             "summary": summary, "config": json.dumps(to_dict(cfg)), "skipped_steps": skipped, "command": command}
    if ema is not None:
        parts["ema"] = ema.state_dict()
    for name in frozen_files(cfg):
        parts[f"{name}_sha256"] = getattr(method, name).weights_sha256
    return parts
