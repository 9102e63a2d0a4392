"""`python launch.py` with no arguments: the embedded default, end to end, on the CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_run_learns_features(tmp_path):
    # The README's command, unchanged but for where it writes.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "launch.py", f"run.output_dir={tmp_path / 'run'}",
                             f"data.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    match = re.search(r"kNN top-1 .*: ([\d.]+)%\s+random init: ([\d.]+)%", result.stdout)
    assert match, result.stdout[-2000:]
    trained, random_init = float(match.group(1)), float(match.group(2))
    assert trained >= random_init + 5.0, (trained, random_init)
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
