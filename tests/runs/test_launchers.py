"""torchrun and `accelerate launch` start the same launch.py on two ranks that really train together."""

import json
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
def test_accelerate_with_deepspeed_trains_two_cpu_ranks_like_torchrun(tmp_path, ibot_two_rank_run):
    """`accelerate launch --use_deepspeed --deepspeed_config_file ds_configs/zero3.json` starts two ranks (on
    the CPU too: accelerate runs torchrun for one machine) that train with that JSON exactly as torchrun's
    two ranks do with --ds_config zero3.json. (`--multi_gpu` starts the same two ranks.)"""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
           "ds_configs/zero3.json", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), *tiny_ibot_cmd(run, 6)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "training on 2 ranks (from accelerate" in done.stderr
    assert f"DeepSpeed config {ROOT / 'ds_configs' / 'zero3.json'} (from accelerate" in done.stderr
    assert losses(run) == losses(ibot_two_rank_run)


def accelerate_env(tmp_path, *launch_args: str) -> dict[str, str]:
    """The environment `accelerate launch ARGS` gives its processes (one, a probe that prints it)."""
    probe = tmp_path / "probe.py"
    probe.write_text("import json, os; print(json.dumps(dict(os.environ)))\n")
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--num_processes", "1",
                           "--main_process_port", str(free_port()), str(probe)], cwd=ROOT,
                          env={**os.environ, "HF_HOME": str(tmp_path / "hf")}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_accelerate_config_files_deepspeed_section_is_checked_against_the_json_and_yaml(tmp_path):
    """An `accelerate config` file with a deepspeed_config section: its deepspeed_config_file is the
    DeepSpeed JSON; its own options (zero_stage, gradient_accumulation_steps, ...) must agree with that
    JSON and the YAML, or the launch stops with one line naming both."""
    from trainer.config import ConfigError, load_config
    from trainer.ds_config import build_ds_config

    def env_of(section: str) -> dict:
        yaml = tmp_path / "accelerate.yaml"
        yaml.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_machines: 1\n"
                        "mixed_precision: 'no'\ndeepspeed_config:\n" + section)
        return accelerate_env(tmp_path, "--config_file", str(yaml))

    cfg = load_config(None, ["optim.grad_accum=2", "run.precision=bf16"])
    file_env = env_of("  deepspeed_config_file: ds_configs/zero2.json\n")
    assert build_ds_config(None, cfg, 1, file_env)["zero_optimization"]["stage"] == 2  # accelerate's file
    with pytest.raises(ConfigError, match="accelerate's deepspeed_config_file is ds_configs/zero2.json"):
        build_ds_config("zero3.json", cfg, 1, file_env)  # --ds_config too, another file
    assert build_ds_config("zero2.json", cfg, 1, file_env)["zero_optimization"]["stage"] == 2  # the same file
    inline = env_of("  zero_stage: 3\n  gradient_accumulation_steps: 2\n  zero3_init_flag: false\n")
    assert build_ds_config(None, cfg, 1, inline)["gradient_accumulation_steps"] == 2
    with pytest.raises(ConfigError, match=r"zero_optimization.stage: is 3 here but accelerate's zero_stage is 2"):
        build_ds_config(None, cfg, 1, {**inline, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    with pytest.raises(ConfigError, match="gradient_accumulation_steps: is 2 here but accelerate's "
                                          "gradient_accumulation_steps is 4"):
        build_ds_config(None, cfg, 1, {**inline, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    with pytest.raises(ConfigError, match="run.precision: bf16: accelerate says mixed_precision fp16"):
        build_ds_config(None, cfg, 1, {**inline, "ACCELERATE_MIXED_PRECISION": "fp16"})


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
