"""Nothing changes for users (issue 29): what a user had before the redesign still works with today's
code. tests/runs/golden/old_run/ was written by main at 8fe8d9d, before anything moved
(tests/runs/golden/make_old_run.py says how): an iBOT run stopped at step 2 (its config.yaml, its
step-2 ZeRO-3 checkpoint, its metrics), the 4 losses of the same run uninterrupted, and a 2-step iTPN
run's exported file with the features the old loader gave on a fixed input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import main_in_process

pytestmark = pytest.mark.slow

OLD = Path(__file__).resolve().parent / "golden" / "old_run"
RECORD = json.loads((OLD / "record.json").read_text())
RTOL = 1e-5  # float rounding across CPU vendors (tests/runs/test_golden_losses.py)


def test_an_old_run_resumes_exactly_from_its_checkpoint(tmp_path):
    run = tmp_path / "ibot"
    shutil.copytree(OLD / "ibot", run)
    # (the run was trained under the default's first teacher EMA, 0.99 -> 1; the default is 0.99 -> 0.995
    # since stop 39, so the same command now needs the old schedule said to go on as it was)
    assert main_in_process(*RECORD["ibot_args"], "ibot.ema_momentum=[0.99,1.0]", f"run.output_dir={run}") == 0
    assert "resumed from" in (run / "logs" / "rank0.log").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    after = [{k: v for k, v in r.items() if k == "step" or k.startswith("loss")} for r in rows if "loss" in r]
    want = RECORD["ibot_losses"]
    assert [r["step"] for r in after] == [1, 2, 3, 4] == [r["step"] for r in want]
    assert after[2:] == [pytest.approx(r, rel=RTOL, abs=0) for r in want[2:]]  # steps 3 and 4, after the resume
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


def test_an_old_checkpoint_and_config_load_and_export(tmp_path):
    from export.convert import convert
    from trainer.config import load_config

    cfg = load_config(str(OLD / "ibot" / "config.yaml"), [])
    assert cfg.method == "ibot" and cfg.model.arch == "vit_test" and cfg.schedule.steps == 4
    done = convert(OLD / "ibot", tmp_path / "hf")  # the newest complete checkpoint, its EMA teacher
    assert done.hf_class == "ViTModel" and max(done.errors.values()) <= 1e-4, done.errors


def test_an_old_itpn_export_loads_to_the_same_features():
    from export.backbones import load_backbone

    loaded = load_backbone(OLD / "itpn_export" / "itpn.safetensors")
    assert loaded.method == "itpn" and loaded.image_size == 32 and loaded.num_prefix_tokens == 0
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = loaded.model.float().forward_features(x)
    want = RECORD["itpn_features"]
    assert f["patch"].flatten()[:16].tolist() == pytest.approx(want["patch"], rel=1e-4, abs=1e-6)
    assert [p.mean().item() for p in f["pyramid"]] == pytest.approx(want["pyramid_means"], rel=1e-4, abs=1e-6)
