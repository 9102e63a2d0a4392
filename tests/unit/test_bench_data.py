"""scripts/bench_data.py at smoke size (its real size is the benchmark): both loaders stream the same
photographs through the same crops, and the JSON carries each rate, the ratios and the record."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_loader_benchmark_runs_its_real_code_at_smoke_size(tmp_path):
    out = tmp_path / "data.json"
    args = ["--images", "24", "--workers", "1", "--batch-size", "4", "--batches", "2", "--repeats", "1",
            "--local-crops", "2", "--work-dir", str(tmp_path / "w"), "--json", str(out)]
    p = subprocess.run([sys.executable, "scripts/bench_data.py", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert {"device", "versions", "command"} <= set(r) and r["timed_batches"] == 2
    for side in ("baseline", "ours", "ours_colour_on_device"):
        assert r[f"{side}_images_per_s"] > 0, r
    assert r["ratio"] > 0 and "baseline (torchvision ImageFolder + DataLoader)" in p.stdout
    assert json.loads((tmp_path / "w" / "shards" / "manifest.json").read_text())["total"] == 24
