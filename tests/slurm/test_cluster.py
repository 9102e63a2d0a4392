"""Jobs on a real one-node Slurm (tests/conftest.py's `slurm` fixture, scripts/ci/slurm_up.sh): a chain
that hands over, USR1 and a killed rank that requeue and resume, two jobs at once, a sweep, a broken
chain. Every loss curve is compared with the same tiny iBOT run made in one go by torchrun
(tests/conftest.py: ibot_two_rank_run)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, losses, records, tiny_ibot_cmd, wandb_offline

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SBATCH = ROOT / "scripts" / "slurm" / "pretrain.sbatch"
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT"}


def tiny_args(run: Path, steps: int = 6, extra=()) -> list[str]:
    """The reference run's launch.py arguments, without the script and the output directory."""
    return [a for a in tiny_ibot_cmd(run, steps, extra)[1:] if not a.startswith("run.output_dir=")]


def submit(env: dict, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "slurm" / "submit.py"), "--gpus-per-node", "0",
                           "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10", "--signal-margin", "0",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"job (\d+)", done.stdout).group(1)


def sbatch(env: dict, tmp: Path, name: str, run: Path, launch_args: list[str], faults=()) -> str:
    """pretrain.sbatch as a user submits it by hand (2 ranks, no GPU), through tests/faults/inject.py."""
    env = {**env, "MIMSCALE_RUN_DIR": str(run), "MIMSCALE_PYTHON": sys.executable,
           "MIMSCALE_LAUNCH": str(ROOT / "tests" / "faults" / "inject.py")}
    cmd = ["sbatch", "--parsable", f"--job-name={name}", "--ntasks-per-node=2", "--cpus-per-task=1",
           "--gpus-per-task=0", "--time=10", "--signal=B:USR1@30", f"--output={tmp}/slurm-{name}-%j.out", str(SBATCH),
           *faults, "--", *launch_args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def states(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%i %T"], env=env, capture_output=True,
                         text=True, timeout=30).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def wait(env: dict, job: str, timeout: float = 600) -> dict[str, str]:
    """Until no task of `job` is queued or running; -> task id: final state."""
    end = time.time() + timeout
    while time.time() < end:
        now = states(env, job)
        if now and not ACTIVE & set(now.values()):
            return now
        time.sleep(1)
    raise AssertionError(f"job {job} still {states(env, job)} after {timeout} s")


def restarts(env: dict, job: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return int(re.search(r"Restarts=(\d+)", out).group(1))


def logs(run: Path) -> str:
    return "".join(p.read_text() for p in sorted((run / "logs").glob("slurm-*")))


def slurm_state(env: dict, job: str, run: Path | None = None) -> str:
    """What Slurm says of `job` now, for a failure message: scontrol, slurmctld's log lines that name
    it, and the end of the job's own log."""
    show = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    ctld = Path(env["MIMSCALE_SLURM_DIR"]) / "log" / "slurmctld.log"
    lines = [ln for ln in ctld.read_text(errors="replace").splitlines() if re.search(rf"JobId={job}\b", ln)]
    tail = logs(run)[-4000:] if run is not None and (run / "logs").exists() else ""
    return f"scontrol show job {job}:\n{show}\nslurmctld.log:\n" + "\n".join(lines[-30:]) + f"\njob log:\n{tail}"


def until(predicate, timeout: float = 300, what: str = "") -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def rank_pid(job: str, rank: int) -> int | None:
    """The python process of `rank` in Slurm job `job` (what a lost node would take with it), not one
    of its data-loader workers (forked: same command line and environment)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if (f"SLURM_JOB_ID={job}".encode() in environ and f"SLURM_PROCID={rank}".encode() in environ
                and b"inject.py" in cmdline):
            found[int(pid)] = parent
    ranks = [pid for pid, parent in found.items() if parent not in found]
    return ranks[0] if len(ranks) == 1 else None


def test_chain_of_three_hands_over_and_matches_one_uninterrupted_run(slurm, tmp_path, ibot_two_rank_run):
    """3 array tasks of 2 ranks, each with a budget of 2 steps, end at step 6 with the reference's curve."""
    job = submit(slurm, "--name", "chain", "--runs-dir", str(tmp_path), "--chain", "3",
                 *tiny_args(tmp_path, extra=("log.wandb=offline", "log.mlflow=true")), "--stop-after", "2")
    final = wait(slurm, job)
    run = tmp_path / "chain"
    assert sorted(final.values()) == ["COMPLETED"] * 3, (final, logs(run))
    assert losses(run) == losses(ibot_two_rank_run)  # steps 1..6 once each, identical losses
    assert records(run) == records(ibot_two_rank_run)  # every record, as the run made in one go has it
    # one W&B run and one MLflow run over the three tasks, each step sent once
    ids, history = wandb_offline(run)
    tracking = json.loads((run / "tracking.json").read_text())
    assert ids == {tracking["wandb"]["id"]} and len(list((run / "wandb").glob("offline-run-*"))) == 3
    assert [(s, h["loss"]) for s, h in history] == losses(ibot_two_rank_run)
    (mlflow_run,) = (run / "mlruns").glob(f"*/{tracking['mlflow']['run_id']}")
    assert len(list((run / "mlruns").glob("*/*/meta.yaml"))) == 1
    logged = [line.split() for line in (mlflow_run / "metrics" / "loss").read_text().splitlines()]
    assert [(int(s), float(v)) for _, v, s in logged] == losses(ibot_two_rank_run)
    text = logs(run)
    assert f"resumed from {run}/checkpoints/step00000002 at step 2" in (run / "logs" / "rank0.log").read_text()
    assert "task 1 of the chain continues" in text and "task 2 of the chain continues" in text
    assert "the schedule is complete" in text and "training on 2 ranks (from slurm" in text
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert sorted(p.name for p in (run / "slurm").glob("*.done")) == [f"{job}_{i}.done" for i in range(3)]


def test_a_chain_whose_task_failed_does_not_start_over(slurm, tmp_path):
    """Task 0 fails (its shards do not exist): task 1 refuses to start a fresh run and cancels task 2."""
    job = submit(slurm, "--name", "broken", "--runs-dir", str(tmp_path), "--chain", "3", "--tasks-per-node", "1",
                 *tiny_args(tmp_path), f"data.train_shards={tmp_path}/none-{{0..3}}.tar")
    final = wait(slurm, job)
    assert final[f"{job}_0"] == "FAILED" and final[f"{job}_1"] == "FAILED", final
    assert final[f"{job}_2"] == "CANCELLED", final
    text = logs(tmp_path / "broken")
    assert "not requeued: exit 2 is bad input" in text
    assert "task 0 of this chain did not finish its part" in text and "not starting" in text
    assert not (tmp_path / "broken" / "checkpoints").exists()


def test_usr1_a_killed_rank_and_scancel_on_three_jobs_at_once(slurm, tmp_path, ibot_two_rank_run):
    """Three 2-rank jobs share the node at once (distinct rendezvous ports).
    - USR1 to the batch shell mid-run (what --signal=B:USR1@T sends): both ranks save, the job requeues
      itself and resumes from that save;
    - kill -9 of a rank after the step-3 checkpoint: the job requeues itself and resumes from it;
    - a plain scancel (SIGTERM): both ranks save, and the job stays cancelled (no requeue).
    The two requeued runs end with the uninterrupted run's losses. Each job's first run holds after a
    step until it is signalled or killed (tests/faults/inject.py hold), so the test acts on a job that
    is running its batch script however slow the machine is, and the save comes at a known step."""
    signalled, killed, cancelled = tmp_path / "usr1", tmp_path / "kill9", tmp_path / "cancel"
    a, b, c = (sbatch(slurm, tmp_path, r.name, r, tiny_args(tmp_path), faults=(f"hold:{step}",))
               for r, step in ((signalled, 2), (killed, 3), (cancelled, 2)))
    runs = (signalled, killed, cancelled)

    def held(run: Path, step: int) -> bool:  # rank 0 logged `step`: the job now waits for the test
        return (run / "metrics.jsonl").exists() and max((s for s, _ in losses(run)), default=0) >= step

    until(lambda: held(signalled, 2) and held(cancelled, 2) and held(killed, 3)
          and (killed / "checkpoints" / "step00000003" / "COMPLETE").exists(), what="the three jobs to hold")
    now = states(slurm, f"{a},{b},{c}")
    assert now == {a: "RUNNING", b: "RUNNING", c: "RUNNING"}, "\n".join(
        slurm_state(slurm, j, r) for j, r in ((a, signalled), (b, killed), (c, cancelled)) if now.get(j) != "RUNNING")

    sent = subprocess.run(["scancel", "--batch", "--signal=USR1", a], env=slurm, capture_output=True, text=True)
    assert sent.returncode == 0, sent.stderr + slurm_state(slurm, a, signalled)
    subprocess.run(["scancel", c], env=slurm, check=True)
    victim = rank_pid(b, 1)
    assert victim is not None, slurm_state(slurm, b, killed)
    os.kill(victim, signal.SIGKILL)
    assert wait(slurm, a) == {a: "COMPLETED"} and wait(slurm, b) == {b: "COMPLETED"}
    assert wait(slurm, c) == {c: "CANCELLED"}
    assert (restarts(slurm, a), restarts(slurm, b), restarts(slurm, c)) == (1, 1, 0)

    sig_log = logs(signalled)
    assert "SIGUSR1: passing it to every rank" in sig_log
    for rank in (0, 1):  # each rank got the signal itself, not only through the other's all-reduce
        assert "SIGUSR1: saving step" in (signalled / "logs" / f"rank{rank}.log").read_text()
    assert "requeueing: stopped before the end of the schedule" in sig_log
    stopped = re.search(r"resumed from \S+step(\d+) at step", (signalled / "logs" / "rank0.log").read_text())
    assert stopped and int(stopped.group(1)) == 3  # the requeued job resumed from the USR1 save (held before step 3)
    limit = re.search(r"job time limit in (\d+) s", (signalled / "logs" / "rank0.log").read_text())
    assert limit and 400 < int(limit.group(1)) <= 600  # read from the real squeue: --time=10 minutes
    kill_log = logs(killed)
    assert "requeueing: crash 1 of at most 3" in kill_log
    assert f"resumed from {killed}/checkpoints/step00000003 at step 3" in (killed / "logs" / "rank0.log").read_text()
    for run in (signalled, killed):
        assert dict(losses(run)) == dict(losses(ibot_two_rank_run))  # re-run steps repeat their losses exactly

    status = json.loads((cancelled / "status.json").read_text())
    assert status["state"] == "stopped" and status["stopped_by"] in ("SIGTERM", "SIGUSR1"), status
    assert status["step"] == 3  # held before step 3 until the signal
    assert (cancelled / "checkpoints" / f"step{status['step']:08d}" / "COMPLETE").exists()
    assert "not requeueing" in logs(cancelled) and "the job was sent SIGTERM" in logs(cancelled)
    ports = {re.search(r"rendezvous \S+:(\d+)", logs(r)).group(1) for r in runs}
    assert len(ports) == 3


def test_sweep_of_three_points_with_the_deepspeed_launcher(slurm, tmp_path):
    """3 points, each 2 ranks started by DeepSpeed's launcher on one node, each in its own run (one after
    another: --parallel 1, the array's throttle)."""
    sweep = tmp_path / "lr.yaml"
    sweep.write_text("optim.lr: [1.0e-4, 2.0e-4, 4.0e-4]\n")
    job = submit(slurm, "--sweep", str(sweep), "--runs-dir", str(tmp_path), "--parallel", "1", "--launcher",
                 "deepspeed", *tiny_args(tmp_path, steps=2))
    try:
        final = wait(slurm, job)
    finally:  # DeepSpeed's CPU all-reduce leaves its shared memory behind, named by the port: a later job
        for task in states(slurm, job):  # with the same id (a restarted test cluster) would map it again
            job_id = subprocess.run(["scontrol", "show", "job", task], env=slurm, capture_output=True,
                                    text=True).stdout
            port = 20000 + int(re.search(r"JobId=(\d+)", job_id).group(1)) % 12000 if "JobId=" in job_id else None
            for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
                leftover.unlink(missing_ok=True)
    assert sorted(final.values()) == ["COMPLETED"] * 3, (final, logs(tmp_path / "lr"))
    index = json.loads((tmp_path / "lr" / "sweep.json").read_text())
    assert [(p["index"], p["overrides"]) for p in index] == [
        (0, ["optim.lr=0.0001"]), (1, ["optim.lr=0.0002"]), (2, ["optim.lr=0.0004"])]
    for point, lr in zip(index, (1e-4, 2e-4, 4e-4)):
        run = Path(point["run_dir"])
        assert run.name == point["overrides"][0] and run.parent == tmp_path / "lr"
        assert f"lr: {lr}" in (run / "config.yaml").read_text()
        assert json.loads((run / "status.json").read_text())["state"] == "finished"
        assert (run / "logs" / "rank1.log").exists()  # two ranks, from the deepspeed launcher
        assert "training on 2 ranks (from deepspeed" in (run / "logs" / "rank0.log").read_text()
        assert any(p.is_symlink() for p in (run / "logs").glob("slurm-*.out"))  # Slurm's log beside the ranks'
