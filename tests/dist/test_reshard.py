"""Resuming on another number of ranks (trainer/resharding.py): 2 -> 1 and 1 -> 2 under ZeRO-3,
in-process (every state compared with what was saved) and through launch.py (automatic)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_ibot_cmd

from trainer.distributed import free_port

pytestmark = pytest.mark.slow


def torchrun_n(n: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'dist'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
           str(free_port()), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.mark.parametrize("saved,resumed", [(2, 1), (1, 2)])
def test_universal_resume_restores_every_state(tmp_path, saved, resumed):
    script = str(ROOT / "tests" / "dist" / "reshard_check.py")
    torchrun_n(saved, script, "save", str(tmp_path))
    out = torchrun_n(resumed, script, "load", str(tmp_path)).stdout
    report = json.loads(next(line for line in out.splitlines() if line.startswith("RESHARD "))[8:])
    print(report)
    for key in ("fp32", "exp_avg", "exp_avg_sq", "shadow", "buffers"):
        assert report[key] == 0.0, (key, report)


def test_launch_resumes_a_two_rank_run_on_one_rank(ibot_two_rank_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ibot_two_rank_run, run)  # (a session fixture: other tests may have run it on)
    from trainer import resharding
    from trainer.checkpoint import Checkpointer

    newest = Checkpointer(run / "checkpoints", 1).latest()
    saved = int(newest.name[len("step"):])
    assert resharding.saved_world_size(newest) == 2, newest
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *tiny_ibot_cmd(run, saved + 3)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "written by 2 ranks; resumed on 1 through a universal checkpoint" in result.stderr
    assert (run / "universal" / newest.name / "COMPLETE").is_file()
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == saved + 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records if "loss" in r and r["step"] > saved]
    assert [r["step"] for r in resumed][-3:] == [saved + 1, saved + 2, saved + 3]
    assert all(r["loss"] == r["loss"] and r["loss"] < 20 for r in resumed)  # finite
    # and the same command again resumes the new 1-rank checkpoint the ordinary way
    again = subprocess.run([sys.executable, *tiny_ibot_cmd(run, saved + 4)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "universal" not in again.stderr, again.stderr[-3000:]
