"""Stops a job needs from the trainer itself: ahead of the time limit without any signal, and on a
signal that comes while the process is still starting."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.faults import JobDeadline, _seconds, job_end_time

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "faults"))

from fault_runs import tiny_args  # noqa: E402


@pytest.mark.parametrize("text, seconds", [("4:59", 299), ("1:02:03", 3723), ("2-00:00:10", 172810),
                                           ("0:00", 0), ("UNLIMITED", None), ("INVALID", None), ("", None)])
def test_squeue_time_left(text, seconds):
    assert _seconds(text) == seconds


def test_job_end_time_from_the_environment_or_squeue(tmp_path):
    assert job_end_time({}) is None  # not a Slurm job
    assert job_end_time({"SLURM_JOB_END_TIME": "1800000000", "SLURM_JOB_ID": "7"}) == 1800000000.0
    squeue = tmp_path / "squeue"
    squeue.write_text('#!/bin/sh\n[ "$*" = "-h -j 7 -o %L" ] && echo " 1:00:00" || exit 1\n')
    squeue.chmod(0o755)
    end = job_end_time({"SLURM_JOB_ID": "7"}, squeue=str(squeue))
    assert end == pytest.approx(time.time() + 3600, abs=5)
    assert job_end_time({"SLURM_JOB_ID": "8"}, squeue=str(squeue)) is None  # squeue failed: no deadline
    assert job_end_time({"SLURM_JOB_ID": "7"}, squeue=str(tmp_path / "missing")) is None


def test_deadline_counts_the_longest_step_but_not_the_first():
    d = JobDeadline(time.time() + 100, margin_s=50)
    assert not d.due()
    d.observe(80.0)  # the first step (warm-up): counted while it is the only one
    assert d.due() and d.longest_step == 80
    d.observe(10.0)
    assert d.longest_step == 10 and not d.due()
    d.observe(45.0)  # 50 + 45 s to go, 100 s left: not yet
    d.observe(30.0)
    assert d.longest_step == 45 and not d.due()
    d.end_time -= 10
    assert d.due()


@pytest.mark.slow
def test_a_run_stops_and_saves_before_the_job_time_limit(tmp_path):
    """SLURM_JOB_END_TIME 40 s away, checkpoint.before_time_limit_s 35: the run stops after a few
    steps with a complete checkpoint and status.json saying why, and exits 0 (the job requeues it)."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "SLURM_JOB_END_TIME": str(int(time.time()) + 40)}
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), *tiny_args(run, 500),
                           "checkpoint.before_time_limit_s=35", "checkpoint.every_steps=1000"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["stopped_by"] == "time limit"
    assert 1 <= status["step"] < 500
    assert (run / "checkpoints" / f"step{status['step']:08d}" / "COMPLETE").exists()
    assert "job time limit in" in done.stderr and f"time limit: saved step {status['step']} and stopped" in done.stderr


@pytest.mark.slow
def test_a_signal_during_start_up_stops_the_run_after_its_first_step(tmp_path):
    """USR1 half a second after start, while launch.py still imports torch: recorded, not fatal (its
    default action would kill the process), and the run saves after step 1 and exits 0."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *tiny_args(run, 50)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status == {**status, "state": "stopped", "stopped_by": "SIGUSR1", "step": 1}
    assert (run / "checkpoints" / "step00000001" / "COMPLETE").exists()
