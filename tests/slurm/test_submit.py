"""Slurm submission without a cluster (trainer/slurm.py, scripts/slurm/submit.py's one call): the script it
would submit (--dry-run), sweeps, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = ROOT / "scripts" / "slurm" / "submit.py"
TINY = str(ROOT / "configs" / "ibot_vit_tiny.yaml")

from trainer import slurm as submit  # noqa: E402


@pytest.fixture
def dry_run(monkeypatch):
    """A --dry-run submission in this process (a subprocess per case would spend seconds importing), as
    the script reports it: the script on stdout and the sbatch line on stderr, or its one error line
    and exit 2 (test_the_script_prints_the_dry_run_and_one_error_line runs the script itself)."""
    monkeypatch.chdir(ROOT)

    def run(*args: str) -> subprocess.CompletedProcess:
        try:
            done = submit.submit(*submit.parse_args(["--dry-run", *args]))
        except submit.SubmitError as e:
            return subprocess.CompletedProcess(args, 2, "", f"submit: {e}\n")
        return subprocess.CompletedProcess(args, 0, done.script, "\n".join(done.report) + "\n")

    return run


def test_the_script_prints_the_dry_run_and_one_error_line(dry_run, tmp_path):
    script = subprocess.run([sys.executable, str(SUBMIT), "--dry-run", "--config", TINY, "--runs-dir", str(tmp_path),
                             "--gpus-per-node", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert script.returncode == 0, script.stderr
    same = dry_run("--config", TINY, "--runs-dir", str(tmp_path), "--gpus-per-node", "1").stdout

    def undated(text: str) -> list[str]:  # the settings line says when it was written
        return [line for line in text.splitlines() if "written by scripts/slurm/submit.py on" not in line]

    assert undated(script.stdout) == undated(same) and "#SBATCH --gpus-per-task=1" in same
    assert "sbatch --parsable" in script.stderr and not (tmp_path / "ibot_vit_tiny").exists()
    bad = subprocess.run([sys.executable, str(SUBMIT), "--config", TINY, "--nodes", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.startswith("submit: --nodes 0")
    assert len(bad.stderr.strip().splitlines()) == 1


def sbatch_lines(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_dry_run_prints_the_exact_script_with_every_pass_through(dry_run, tmp_path):
    out = dry_run("--config", TINY, "--name", "vitl", "--runs-dir", str(tmp_path), "--nodes", "4",
                  "--gpus-per-node", "8", "--time", "4:00:00", "--chain", "6", "--signal-margin", "900",
                  "--partition", "gpu", "--account", "proj", "--qos", "high", "--constraint", "h100",
                  "--exclude", "node[1-2]", "--sbatch=--mail-type=END", "optim.lr=1e-3", "--ds_config", "zero3.json")
    assert out.returncode == 0, out.stderr
    lines = sbatch_lines(out.stdout)
    assert lines == ["--job-name=vitl", "--nodes=4", "--ntasks-per-node=8", "--cpus-per-task=10", "--gpus-per-task=1",
                     "--time=4:00:00", "--signal=B:USR1@900", "--requeue", "--open-mode=append",
                     f"--output={tmp_path}/vitl/logs/slurm-%A_%a.out", "--array=0-5%1", "--partition=gpu",
                     "--account=proj", "--qos=high", "--constraint=h100", "--exclude=node[1-2]", "--mail-type=END"]
    assert f"RUN_DIR={tmp_path}/vitl\n" in out.stdout
    assert f"ARGS=(--config {TINY} optim.lr=1e-3 --ds_config zero3.json)" in out.stdout
    assert "CHAIN_LENGTH=6\n" in out.stdout and f"PYTHON={sys.executable}\n" in out.stdout
    assert "sbatch --parsable" in out.stderr and not (tmp_path / "vitl").exists()  # nothing written
    # the body is pretrain.sbatch's, unchanged, and bash accepts the whole script
    body = (ROOT / "scripts" / "slurm" / "pretrain.sbatch").read_text().split("# ---- end of settings ----")[1]
    assert out.stdout.endswith(body)
    script = tmp_path / "job.sbatch"
    script.write_text(out.stdout)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_deepspeed_launcher_is_one_task_with_every_gpu(dry_run):
    out = dry_run("--config", TINY, "--gpus-per-node", "8", "--launcher", "deepspeed", "--cpus-per-task", "6")
    assert out.returncode == 0, out.stderr
    lines = sbatch_lines(out.stdout)
    assert "--ntasks-per-node=1" in lines and "--gpus-per-node=8" in lines and "--cpus-per-task=48" in lines
    assert "LAUNCHER=deepspeed" in out.stdout and "RANKS_PER_NODE=8" in out.stdout
    assert not any(line.startswith("--array") for line in lines)  # one job, no chain


def test_sweep_grid_and_points(dry_run, tmp_path):
    sweep = tmp_path / "lr.yaml"
    sweep.write_text("grid:\n  optim.lr: [1.0e-4, 3.0e-4]\n  model.arch: [vit_test, vit_tiny]\n"
                     "points:\n  - {optim.lr: 5.0e-4, data.global_crops.scale: [0.3, 1.0]}\n")
    points = submit.sweep_points(str(sweep))
    assert len(points) == 5 and points[0] == {"optim.lr": 1e-4, "model.arch": "vit_test"}
    out = dry_run("--config", TINY, "--sweep", str(sweep), "--runs-dir", str(tmp_path), "--parallel", "2",
                  "--gpus-per-node", "1")
    assert out.returncode == 0, out.stderr
    assert "--array=0-4%2" in sbatch_lines(out.stdout)
    assert "--output=" + str(tmp_path / "lr" / "logs" / "slurm-%A_%a.out") in sbatch_lines(out.stdout)
    assert (f"    0) RUN_DIR={tmp_path}/lr/optim.lr=0.0001,model.arch=vit_test; "
            f"ARGS=(--config {TINY} optim.lr=0.0001 model.arch=vit_test) ;;") in out.stdout
    assert (f"    4) RUN_DIR={tmp_path}/lr/optim.lr=0.0005,data.global_crops.scale=_0.3_1.0_; "
            f"ARGS=(--config {TINY} optim.lr=0.0005 'data.global_crops.scale=[0.3, 1.0]') ;;") in out.stdout


@pytest.mark.parametrize("args, message", [
    (["optim.lr=-1"], "launch.py arguments: config error: command line: optim.lr"),
    (["data.bach_size=3"], "did you mean data.batch_size?"),
    (["--chain", "0"], "--chain 0: must be at least 1"),
    (["--gpus-per-node", "0"], "--tasks-per-node: needed"),
    (["--time", "four hours"], "--time four hours: Slurm's formats"),
    (["--nodes", "2", "--launcher", "deepspeed"], "--launcher deepspeed runs on one node"),
    (["--name", "../x"], "--name '../x': letters, digits"),
    (["--resume", "runs/x/checkpoints/step00000100"], "--resume: not for a Slurm job"),
    (["--stop-at=100"], "--stop-at: not for a Slurm job"),
    (["--time", "5", "--signal-margin", "600"], "--signal-margin 600: the USR1 would come before"),
])
def test_bad_input_stops_before_sbatch(dry_run, args, message):
    out = dry_run("--config", TINY, *args)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("submit: ") and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_bad_sweeps_are_refused(dry_run, tmp_path):
    cases = {"empty.yaml": ("", "expected `grid:`"),
             "scalar.yaml": ("grid:\n  optim.lr: 1.0e-4\n", "needs a non-empty list"),
             "badpoint.yaml": ("points:\n  - {optim.lr: -1.0}\n", "sweep point 0 (optim.lr=-1.0): config error"),
             "twice.yaml": ("points:\n  - {optim.lr: 1.0e-4}\n  - {optim.lr: 1.0e-4}\n", "same overrides")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        out = dry_run("--config", TINY, "--gpus-per-node", "1", "--sweep", str(tmp_path / name))
        assert out.returncode == 2 and message in out.stderr, (name, out.stderr)
    (tmp_path / "ok.yaml").write_text("optim.lr: [1.0e-4]\n")  # a bare mapping of lists is a grid
    out = dry_run("--config", TINY, "--gpus-per-node", "1", "--sweep", str(tmp_path / "ok.yaml"), "--chain", "2")
    assert out.returncode == 2 and "--sweep with --chain" in out.stderr


def test_submitting_writes_the_script_and_the_sweep_index(tmp_path):
    """Submission without a cluster: sbatch is a stand-in that records what it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/sbatch-args\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    sweep = tmp_path / "s.yaml"
    sweep.write_text("optim.lr: [1.0e-4, 2.0e-4]\n")
    import os

    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, str(SUBMIT), "--config", TINY, "--sweep", str(sweep), "--runs-dir",
                          str(tmp_path / "runs"), "--gpus-per-node", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "submitted sweep of 2 points: job 4242" in out.stdout
    (script,) = (tmp_path / "runs" / "s" / "slurm").glob("submit-*.sbatch")
    assert (tmp_path / "sbatch-args").read_text().split() == ["--parsable", str(script)]
    index = json.loads((tmp_path / "runs" / "s" / "sweep.json").read_text())
    assert [p["overrides"] for p in index] == [["optim.lr=0.0001"], ["optim.lr=0.0002"]]
    assert index[1]["run_dir"] == str(tmp_path / "runs" / "s" / "optim.lr=0.0002")
    assert (tmp_path / "runs" / "s" / "logs").is_dir()  # Slurm does not create its log's directory


@pytest.mark.parametrize("limit, expected", [("10", 10), ("1:30", 1.5), ("4:00:00", 240), ("2-0", 2880),
                                             ("1-02:30", 1590), ("1-00:00:30", 1440.5)])
def test_slurm_time_formats(limit, expected):
    assert submit.minutes(limit) == expected
