"""Rank, world size and rendezvous address from whichever launcher started us.

torchrun, the deepspeed launcher and `accelerate launch` set RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; `srun` sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the node
list, whose first host becomes the master. A plain `python launch.py` is rank 0 of 1.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"

    def export(self) -> None:
        """Write the torch.distributed variables, so `deepspeed.init_distributed` finds them."""
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                          LOCAL_RANK=str(self.local_rank), MASTER_ADDR=self.master_addr,
                          MASTER_PORT=str(self.master_port))


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    port = int(env.get("MASTER_PORT", 29500))
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), port, "torch")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            # Jobs sharing a node do not collide (unless their ids differ by a multiple of 12000),
            # and 20000-31999 stays below Linux's ephemeral ports (32768-).
            port = 20000 + int(env["SLURM_JOB_ID"]) % 12000
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR", first_host(nodes)), port, "slurm")
    # A single process still needs a rendezvous port: take a free one, so runs side by side on
    # one machine do not collide on 29500.
    return DistEnv(master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else free_port())


def free_port() -> int:
    """A port nobody listens on now, from the OS (also the tests' torchrun rendezvous: they run two at
    a time)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: `gpu[003-010,012],cpu1` -> `gpu003`."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot read Slurm node list {nodelist!r}")
    prefix, _, ranges = head.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def cuda_index(local_rank: int, visible: int, environ: Mapping[str, str] | None = None) -> int:
    """The CUDA device (an index into the GPUs this process can see) for the task with `local_rank`
    on a node. `srun --gpus-per-task=1` or `--gpu-bind=single:1` / `map_gpu` give each task its own one
    GPU (its index 0 whatever SLURM_LOCALID is); `--gpus-per-node` without a binding, torchrun and the
    deepspeed launcher show every task all of the node's GPUs (its local rank's)."""
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    env = os.environ if environ is None else environ
    raise RuntimeError(f"local rank {local_rank} but this process sees {visible} GPUs (CUDA_VISIBLE_DEVICES="
                       f"{env.get('CUDA_VISIBLE_DEVICES', 'unset')}): give each task one GPU (srun --gpus-per-task=1) "
                       "or every task all of the node's (--gpus-per-node without --gpu-bind)")


def leave_distributed() -> None:
    """Leave the process group together, while the interpreter is whole: a rank that exits with a
    live gloo group can abort ("terminate called without an active exception", SIGABRT) when the
    group's worker threads release their last tensors during interpreter shutdown, and torchrun or
    Slurm then sees a failed rank after a finished run. Only after success: a rank that failed may
    leave its peers inside a collective, never to reach the barrier (release_before_exit leaves
    without one). A group of one process is kept: DeepSpeed caches its groups, and a second run in
    the same process (launch.main called again, as tests do) would meet the destroyed one."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    dist.barrier()
    release_before_exit()


def release_before_exit() -> None:
    """Destroy the process group, if any, without a barrier; launch.py's last step after main()
    returned, whatever its exit code: a gloo group still alive at interpreter shutdown can abort the
    process, and a refused resume that should exit 2 (bad input, not requeued by
    scripts/slurm/pretrain.sbatch) then exits by SIGABRT, which the sbatch requeues as a crash. After
    an error the peers may never reach a barrier, and they see this rank leave either way. Engines
    left in reference cycles are freed first, so no collective's buffers outlive the group. Not inside
    main(): a group of one is reused by a second main() in the same process (tests)."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
