"""Where a step's time goes: the loop's per-phase times and FLOPs (trainer/timing.py), and
scripts/bench_step.py writing them as JSON."""

from __future__ import annotations

import json
import os

import torch

from trainer.config import PROJECT_ROOT, load_config
from trainer.loop import breakdown
from trainer.plan.flops import step_flops
from trainer.timing import StepTimer, throughput


def test_timer_splits_a_step_into_phases():
    import time

    timer = StepTimer(True, torch.device("cpu"))
    for _ in range(2):
        timer.start_step(logged_next=False)  # (the CPU times every step)
        with timer.phase("forward"):
            time.sleep(0.02)
        with timer.phase("backward"):
            time.sleep(0.04)
    out = timer.window()
    assert out["time_forward_s"] >= 0.02 and out["time_backward_s"] >= 0.04  # per step: sleeps only overshoot
    assert out["time_backward_s"] > out["time_forward_s"] and out["time_data_s"] == 0
    assert timer.window() == {}  # a window starts again
    gpu = StepTimer(True, torch.device("cuda"))  # on a GPU only the step before a log line is timed
    gpu.start_step(logged_next=False)
    assert not gpu.active
    off = StepTimer(False, torch.device("cpu"))
    off.start_step(logged_next=True)
    assert off.window() == {}
    assert throughput(2e12, 0.5, torch.device("cpu")) == {"model_tflops_per_s": 4.0}
    line = breakdown({"step_time_s": 1.0, "time_data_s": 0.1, "time_forward_s": 0.3, "time_backward_s": 0.5,
                      "model_tflops_per_s": 4.0, "mfu": 0.4})
    assert line == " (data 10%, fwd 30%, bwd 50%, 4 TFLOP/s, MFU 40.0%)"


def test_bench_step_writes_the_breakdown_eager_and_compiled(tmp_path):
    """--compile blocks: the same steps eager, then compiled, in one call; each with its breakdown."""
    import subprocess
    import sys

    out = tmp_path / "step.json"
    config = str(PROJECT_ROOT / "configs" / "defaults.yaml")
    p = subprocess.run([sys.executable, "scripts/bench_step.py", "--config", config, "--steps", "4", "--warmup", "1",
                        "--compile", "blocks", "--out", str(out), "data.batch_size=32"], cwd=PROJECT_ROOT,
                       capture_output=True, text=True, timeout=900,
                       env={**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1",
                            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "compiling took about" in p.stdout and "0 graph breaks" in p.stdout
    result = json.loads(out.read_text())
    assert {"device", "versions", "command", "eager", "compiled", "speedup", "compile_s"} <= set(result)
    assert result["versions"]["torch"] == torch.__version__ and result["compile_s"] > 0
    cfg = load_config(config, ["data.batch_size=32"])
    for run in (result["eager"], result["compiled"]):
        assert len(run["records"]) == 3
        s = run["summary"]
        for r in run["records"]:  # each step's phases are (most of) that step, never more
            phases = sum(r[f"time_{p}_s"] for p in ("data", "forward", "backward", "optimizer", "ema"))
            assert 0.5 * r["step_time_s"] < phases <= 1.01 * r["step_time_s"], r
        assert s["time_forward_s"] > 0 and s["time_backward_s"] > 0 and s["time_ema_s"] > 0
        assert s["model_flops_per_step"] == step_flops(cfg)["total"] > 0
        assert s["model_tflops_per_s"] > 0 and s["planned_memory_gib"] > 0
    assert result["compiled"]["summary"]["compile_graph_breaks"] == 0
    assert result["speedup"] == result["eager"]["summary"]["step_time_s"] / result["compiled"]["summary"]["step_time_s"]
