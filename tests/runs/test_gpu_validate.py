"""scripts/gpu_validate.py --cpu-smoke: the GPU validation's code path at tiny shapes on the CPU
(Triton's interpreter), so the one command a GPU session runs cannot rot while no GPU is at hand."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_validation_runs_its_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "validation.json"
    p = subprocess.run([sys.executable, "scripts/gpu_validate.py", "--cpu-smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert not r["failed"] and r["command"].startswith("python scripts/gpu_validate.py --cpu-smoke")
    names = [row["name"] for row in r["rows"]]
    assert {row["section"] for row in r["rows"]} == {"env", "kernels", "speed", "plan", "train"}
    for expected in ("attention B=2 H=2 N=17 D=16 bias", "packed crops", "fused softmax-CE", "hard-label CE",
                     "self-check D=24 inside zero.Init", "deferred colour work against PIL", "sdpa flash",
                     "planner vs measured", "run.kernels=triton", "first losses, triton against torch"):
        assert any(expected in n for n in names), (expected, names)
    assert "passed in" in p.stdout and "wrote" in p.stdout
