"""kill -9 of a rank (during a save, or anywhere), SIGTERM, a full disk: the newest complete
checkpoint survives, the same command resumes from it, and the losses equal an uninterrupted run."""

import errno
import json
import os
import random
import re
import signal
import time
from collections import namedtuple

import pytest
from conftest import records, wandb_offline
from fault_runs import launch, losses, ok, tiny_args

pytestmark = pytest.mark.slow

STEPS = 6


def _args(run, *extra):
    return tiny_args(run, STEPS, "checkpoint.every_steps=2", *extra)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    ok(launch(_args(run), ranks=2))
    return run


@pytest.fixture(scope="module")
def reference(reference_run):
    ref = losses(reference_run)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker of `rank` among torchrun's children."""
    for child in open(f"/proc/{parent}/task/{parent}/children").read().split():
        try:
            environ = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


def test_kill_during_save_resumes_from_the_previous_checkpoint(tmp_path, reference, reference_run):
    run = tmp_path / "run"
    killed = launch(_args(run, "log.wandb=offline"), faults=("kill-in-save:4@1",), ranks=2)
    assert killed.returncode != 0
    ckpt = run / "checkpoints"
    # DeepSpeed's files of step 4 are on disk, but the save never completed: not a checkpoint
    assert any((ckpt / "step00000004").glob("*optim_states.pt"))
    assert not (ckpt / "step00000004" / "COMPLETE").exists()
    assert (ckpt / "latest").read_text() == "step00000002"
    assert max(losses(run)) == 4  # metrics.jsonl had steps 3 and 4 when the kill came
    resumed = ok(launch(_args(run, "log.wandb=offline"), ranks=2))  # the same command
    assert f"resumed from {ckpt / 'step00000002'} at step 2" in resumed.stderr
    assert losses(run) == reference  # steps 3 and 4 re-run with the losses they had
    # metrics.jsonl has each step once (cut back to step 2 at the resume), as the uninterrupted run's
    assert records(run) == records(reference_run)
    # one W&B run over both launches, each step sent once: steps 3 and 4 were not sent again
    ids, history = wandb_offline(run)
    assert ids == {json.loads((run / "tracking.json").read_text())["wandb"]["id"]}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2
    assert [s for s, _ in history] == sorted(reference)  # (the summary joins step 6: the same step)
    assert {s: h["loss"] for s, h in history if "loss" in h} == reference


def test_kill_at_a_random_moment_loses_nothing(tmp_path, reference, reference_run):
    run = tmp_path / "run"
    rng = random.Random()
    after_step, delay = rng.randint(1, STEPS - 2), rng.uniform(0.0, 0.6)
    proc = launch(_args(run), ranks=2, popen=True, stdout=open(os.devnull, "w"), stderr=open(tmp_path / "err", "w"))
    metrics, deadline = run / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and max(losses(run), default=0) >= after_step:
            break
        time.sleep(0.05)
    time.sleep(delay)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None and proc.poll() is None, (after_step, delay, (tmp_path / "err").read_text()[-2000:])
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=300) != 0
    resumed = ok(launch(_args(run), ranks=2))
    assert losses(run) == reference, (after_step, delay, resumed.stderr[-2000:])
    assert records(run) == records(reference_run), (after_step, delay)  # each step once


def test_sigterm_saves_and_the_same_command_resumes(tmp_path, reference, reference_run):
    run = tmp_path / "run"
    proc = launch(_args(run), ranks=2, popen=True, stdout=open(os.devnull, "w"), stderr=open(tmp_path / "err", "w"))
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and losses(run)):
        time.sleep(0.05)
    for rank in (0, 1):  # what srun does ahead of pre-emption (or --signal=USR1@T before the time limit)
        os.kill(_rank_pid(proc.pid, rank), signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, (tmp_path / "err").read_text()[-3000:]
    err = (tmp_path / "err").read_text()
    stopped = max(losses(run))
    assert f"SIGTERM: saved step {stopped} and stopped" in err
    assert (run / "checkpoints" / f"step{stopped:08d}" / "COMPLETE").exists()
    assert stopped < STEPS
    ok(launch(_args(run), ranks=2))
    assert losses(run) == reference
    assert records(run) == records(reference_run)  # a stopped launch leaves no summary of its own


def test_failed_save_on_one_rank_stops_every_rank_and_keeps_the_previous(tmp_path, reference, reference_run):
    run = tmp_path / "run"
    failed = launch(_args(run), faults=("fail-save:4@1",), ranks=2)
    assert failed.returncode != 0  # torchrun exits 1; its report names the ranks' own code
    assert re.search(r"exitcode\s*:\s*3", failed.stderr), failed.stderr[-3000:]
    ckpt = run / "checkpoints"
    assert os.strerror(errno.ENOSPC) in failed.stderr
    lines = [line for line in failed.stderr.splitlines() if line.startswith("mimscale: checkpoint error")]
    assert len(lines) == 2  # both ranks stop, each with one line; neither hangs
    assert all(f"still {ckpt / 'step00000002'} (nothing was deleted)" in line for line in lines)
    assert not (ckpt / "step00000004").exists() and (ckpt / "latest").read_text() == "step00000002"
    assert (ckpt / "step00000002" / "COMPLETE").exists()
    ok(launch(_args(run), ranks=2))
    assert losses(run) == reference
    assert records(run) == records(reference_run)  # steps 3 and 4, logged before the failed save, once


def test_no_room_for_a_checkpoint_stops_before_writing(tmp_path):
    run = tmp_path / "run"
    result = launch(tiny_args(run, 4), faults=("disk-free:100000",))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "not enough free space" in result.stderr.splitlines()[-1]
    ckpt = run / "checkpoints"
    assert (ckpt / "step00000001" / "COMPLETE").exists()  # the first save had nothing to compare with
    assert not (ckpt / "step00000002").exists()


def test_low_space_warns_early(tmp_path, monkeypatch, caplog):
    import trainer.checkpoint as c

    tag = tmp_path / "ckpt" / "step00000001"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text("1\n")
    (tag / "weights.pt").write_bytes(b"\0" * 1000)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(c.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 2500, 2500))
    c.Checkpointer(tmp_path / "ckpt", keep=2).check_space()
    assert "room for only 2 more checkpoint(s)" in caplog.text
    monkeypatch.setattr(c.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(c.CheckpointError, match="not enough free space"):
        c.Checkpointer(tmp_path / "ckpt", keep=2).check_space()
