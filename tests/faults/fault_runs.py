"""Launching tiny training runs (1 or 2 CPU ranks) with or without an injected fault."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import losses as conftest_losses

from trainer.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
INJECT = str(ROOT / "tests" / "faults" / "inject.py")


def tiny_args(out: Path, steps: int, *extra: str) -> list[str]:
    """launch.py arguments of a run of a few seconds per step: iBOT, a 2-block ViT, digits."""
    return ["--config", str(ROOT / "configs" / "ibot_vit_tiny.yaml"), f"run.output_dir={out}",
            f"schedule.steps={steps}", "checkpoint.every_steps=1", "checkpoint.keep=10", "log.every_steps=1",
            "eval.knn_at_end=false", "model.arch=vit_test", "ibot.out_dim=64", "ibot.head_hidden_dim=32",
            "ibot.head_bottleneck_dim=16", "data.batch_size=8", "data.num_workers=0", "log.tensorboard=false",
            "model.drop_path=0.1", *extra]


def launch(args: list[str], faults: tuple[str, ...] = (), ranks: int = 1, timeout: int = 600,
           **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run launch.py (through inject.py when `faults`) on `ranks` CPU ranks; wait unless `popen`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = [INJECT, *faults, "--"] if faults else [str(ROOT / "launch.py")]
    if ranks == 1:
        cmd = [sys.executable, *script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(free_port()), *script, *args]
    if popen:
        popen.pop("popen")
        return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, **popen)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def losses(run: Path) -> dict[int, float]:
    """step -> loss, the last record of each step winning (a resumed run appends)."""
    return dict(conftest_losses(run))


def metrics(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def optimizer_state(ckpt: Path, rank: int) -> dict:
    from trainer.checkpoint import deepspeed_safe_globals

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        # bf16_zero_pp_rank_* under bf16, zero_pp_rank_* under fp32 (run.precision picks)
        (path,) = ckpt.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        sd = torch.load(path, weights_only=True)
    return sd["optimizer_state_dict"]


def rank_parts(ckpt: Path, rank: int) -> dict:
    return torch.load(ckpt / f"rank{rank:05d}.pt", weights_only=True)
