"""Where a step's time goes: the loop's per-phase times and FLOPs (trainer/timing.py), and
scripts/bench_step.py writing them as JSON."""

from __future__ import annotations

import json

import torch

from trainer.config import PROJECT_ROOT, load_config
from trainer.loop import breakdown
from trainer.plan.flops import step_flops
from trainer.timing import StepTimer, throughput


def test_timer_splits_a_step_into_phases():
    import time

    timer = StepTimer(True, torch.device("cpu"))
    with timer.phase("forward"):
        time.sleep(0.02)
    with timer.phase("backward"):
        time.sleep(0.04)
    out = timer.window(2)
    assert 0.009 < out["time_forward_s"] < 0.02 and 0.019 < out["time_backward_s"] < 0.04
    assert timer.window(1)["time_forward_s"] == 0  # a window starts again
    assert StepTimer(False, torch.device("cpu")).window(1) == {}
    assert throughput(2e12, 0.5, torch.device("cpu")) == {"model_tflops_per_s": 4.0}
    line = breakdown({"step_time_s": 1.0, "time_data_s": 0.1, "time_forward_s": 0.3, "time_backward_s": 0.5,
                      "model_tflops_per_s": 4.0, "mfu": 0.4})
    assert line == " (data 10%, fwd 30%, bwd 50%, 4 TFLOP/s, MFU 40.0%)"


def test_bench_step_writes_the_breakdown(tmp_path):
    from scripts.bench_step import main

    out = tmp_path / "step.json"
    config = str(PROJECT_ROOT / "configs" / "defaults.yaml")
    assert main(["--config", config, "--steps", "4", "--warmup", "1", "--out", str(out),
                 "data.batch_size=32"]) == 0
    result = json.loads(out.read_text())
    assert {"device", "versions", "command", "summary", "records"} <= set(result)
    assert len(result["records"]) == 3 and result["versions"]["torch"] == torch.__version__
    s = result["summary"]
    phases = sum(s[f"time_{p}_s"] for p in ("data", "forward", "backward", "optimizer", "ema"))
    assert 0.7 * s["step_time_s"] < phases <= 1.05 * s["step_time_s"]  # the phases are most of the step
    assert s["time_forward_s"] > 0 and s["time_backward_s"] > 0 and s["time_ema_s"] > 0
    cfg = load_config(config, ["data.batch_size=32"])
    assert s["model_flops_per_step"] == step_flops(cfg)["total"] > 0
    assert s["model_tflops_per_s"] > 0 and s["planned_memory_gib"] > 0
