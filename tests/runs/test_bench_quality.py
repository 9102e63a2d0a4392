"""scripts/bench_quality.py at smoke length (its full length is the benchmark, not CI): the JSON
carries each recipe's command, its figures and what they are compared with."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_quality_benchmark_writes_each_figure_beside_its_baselines(tmp_path):
    out = tmp_path / "quality.json"
    p = subprocess.run([sys.executable, "scripts/bench_quality.py", "--only", "ibot", "--steps", "2", "--out",
                        str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["steps"] == 2 and {"device", "versions", "command"} <= set(r)
    ibot = r["results"]["ibot"]
    assert {"knn", "knn_random_init", "knn_raw_pixels", "linear_top1", "command"} <= set(ibot), ibot
    assert 0 < ibot["knn"] <= 100 and 0 < ibot["linear_top1"] <= 100 and ibot["knn_raw_pixels"] > 90
