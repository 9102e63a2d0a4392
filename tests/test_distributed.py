"""Two CPU ranks (gloo) under ZeRO-3: the EMA teacher, and resuming a run exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def torchrun(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29600 + os.getpid() % 1000), script, *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_shard_local_ema_matches_dense_fp32_ema(tmp_path):
    report = tmp_path / "ema.json"
    torchrun(str(ROOT / "tests" / "dist" / "ema_check.py"), str(report), "zero3.json")
    r = json.loads(report.read_text())
    assert r["world"] == 2 and r["zero3"] and r["partitioned"]  # each rank holds a slice of every teacher weight
    assert r["collectives_in_update"] == 0  # no gather, broadcast or reduce inside ema.update()
    # the fp32 shadow is the dense fp32 EMA of the student's fp32 masters, up to summation order
    assert r["err_shadow"] < 1e-6 * max(1.0, r["moved"] * 1e4)
    assert r["teacher_is_cast_of_shadow"]
    # a bf16-only EMA at m=0.9995 freezes: most elements never move, and it misses the drift
    assert r["bf16_frozen_fraction"] > 0.5
    assert r["err_bf16"] > 100 * r["err_shadow"]
    assert r["err_bf16"] > 0.5 * r["moved"]


def test_ema_without_stage3_reads_whole_parameters(tmp_path):
    """ZeRO-2: teacher parameters are whole on every rank; the shadow follows the student's working
    (bf16) weights, one rounding per read, never accumulated."""
    report = tmp_path / "ema.json"
    torchrun(str(ROOT / "tests" / "dist" / "ema_check.py"), str(report), "zero2.json")
    r = json.loads(report.read_text())
    assert not r["zero3"] and r["collectives_in_update"] == 0
    assert r["teacher_is_cast_of_shadow"]
    # reading bf16 student weights costs at most one bf16 rounding, weighted by 1 - m^steps
    assert r["err_shadow"] <= r["bf16_read_bound"] * 1.01 + 1e-7
    assert r["err_bf16"] > 2 * r["err_shadow"]  # a bf16-only EMA is further off: it barely moves
    assert r["bf16_frozen_fraction"] > 0.5


def _run_cmd(out: Path, steps: int, extra=()) -> list[str]:
    return ["launch.py", "--config", str(ROOT / "configs" / "ibot_vit_tiny.yaml"), f"run.output_dir={out}",
            f"schedule.steps={steps}", "checkpoint.every_steps=3", "log.every_steps=1", "eval.knn_at_end=false",
            "model.arch=vit_test", "ibot.out_dim=64", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
            "data.batch_size=8", "data.num_workers=2", "log.tensorboard=false", "model.drop_path=0.1", *extra]


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_resume_is_exact_on_two_ranks(tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun(*_run_cmd(straight, 6))
    torchrun(*_run_cmd(split, 6, ["--stop-at", "3"]))  # a job slot that ends at step 3
    torchrun(*_run_cmd(split, 6))  # a fresh process: resumes from split's newest checkpoint
    a, b = _losses(straight), _losses(split)
    assert [s for s, _ in a] == [1, 2, 3, 4, 5, 6] and [s for s, _ in b] == [1, 2, 3, 4, 5, 6]
    assert a == b  # identical losses at every step, before and after the restart

    tag = "step00000006"
    sa = get_fp32_state_dict_from_zero_checkpoint(str(straight / "checkpoints"), tag=tag)
    sb = get_fp32_state_dict_from_zero_checkpoint(str(split / "checkpoints"), tag=tag)
    assert sa.keys() == sb.keys() and any(k.startswith("student.") for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for rank in (0, 1):  # the EMA teacher: each rank's fp32 shadow slice
        ea = torch.load(straight / "checkpoints" / tag / f"rank{rank:05d}.pt", weights_only=True)
        eb = torch.load(split / "checkpoints" / tag / f"rank{rank:05d}.pt", weights_only=True)
        assert all(torch.equal(x, y) for x, y in zip(ea["ema"]["shadow"], eb["ema"]["shadow"]))
        assert ea["data"] == eb["data"]


def test_sharded_init_builds_like_dense_and_trains(tmp_path):
    report = tmp_path / "init.json"
    torchrun(str(ROOT / "tests" / "dist" / "sharded_init_check.py"), str(report))
    r = json.loads(report.read_text())
    # trunc_normal(0.02) as timm/DINO, not PyTorch's kaiming default (std ~ 1/sqrt(3 fan_in) = 0.1 here)
    assert r["linear_std"] and all(0.012 < s < 0.028 for s in r["linear_std"]), r["linear_std"]
    assert r["norm_ones"] and r["teacher_equals_student"] and r["loss_finite"]
    assert r["last_layer_unchanged"] and r["others_changed"] > 10


def test_resume_after_changing_loader_workers_keeps_the_model(tmp_path):
    """A data position saved under another layout is reported and the stream restarts; the
    engine, EMA and step still resume."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    cmd = [sys.executable, *_run_cmd(run, 4)]
    first = subprocess.run(cmd + ["--stop-at", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(cmd + ["data.num_workers=0"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "num_streams 2 -> 1" in second.stderr and "resumed from" in second.stderr
    assert [s for s, _ in _losses(run)] == [1, 2, 3, 4]
