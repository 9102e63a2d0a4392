"""torchrun and `accelerate launch` start the same launch.py on two ranks that really train together."""

import logging
import os
import subprocess
import sys

import pytest
from conftest import ROOT, losses, tiny_ibot_cmd

from trainer.cli import say_ranks
from trainer.distributed import DistEnv, free_port


def test_torchrun_trains_on_two_ranks(ibot_two_rank_run):
    rank0 = (ibot_two_rank_run / "logs" / "rank0.log").read_text()
    assert "training on 2 ranks (from torchrun" in rank0
    assert "engine: ZeRO stage 3" in (ibot_two_rank_run / "logs" / "rank1.log").read_text()  # rank 1 trained too


@pytest.mark.slow
def test_accelerate_multi_gpu_trains_two_cpu_ranks_like_torchrun(tmp_path, ibot_two_rank_run):
    """The README's command: --multi_gpu --num_processes 2 starts two ranks (on the CPU too), and
    they train exactly as torchrun's two ranks do."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *tiny_ibot_cmd(run, 6)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "training on 2 ranks (from accelerate" in done.stderr
    assert (run / "logs" / "rank1.log").exists()
    assert losses(run) == losses(ibot_two_rank_run)


def test_a_single_accelerate_process_says_so(monkeypatch, caplog):
    """`accelerate launch --cpu --num_processes 2` starts ONE process without RANK: rank 0 says it trains
    alone and which command starts two."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with caplog.at_level(logging.INFO, logger="mimscale"):
        say_ranks(DistEnv())
    assert "training on 1 rank (a single process" in caplog.text
    assert "accelerate launch --multi_gpu --num_processes N" in caplog.text
    caplog.clear()
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    with caplog.at_level(logging.INFO, logger="mimscale"):
        say_ranks(DistEnv(rank=0, world_size=4, launcher="slurm", master_addr="gpu003", master_port=20042))
    assert "training on 4 ranks (from slurm; rendezvous gpu003:20042)" in caplog.text
    assert "accelerate" not in caplog.text


def test_accelerate_cpu_flag_really_starts_one_process(tmp_path):
    """What the warning is for, checked against the installed accelerate."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os; print('RANK' in os.environ, os.environ.get('WORLD_SIZE'))\n")
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(probe)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "None"]  # one process, no rank: launch.py would train alone
