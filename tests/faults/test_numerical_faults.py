"""A non-finite loss or gradient skips the step on every rank; too many in a row stop the run."""


import pytest
import torch
from fault_runs import launch, losses, metrics, ok, optimizer_state, rank_parts, tiny_args

pytestmark = pytest.mark.slow


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_nan_on_one_rank_skips_the_step_on_both(tmp_path):
    run = tmp_path / "run"
    # Without batch norm in the head: its statistics, summed over ranks, would carry rank 1's NaN
    # into rank 0's loss too (as iBOT's SyncBatchNorm would).
    result = ok(launch(tiny_args(run, 4, "ibot.head_norm=none"), faults=("nan:3@1",), ranks=2))
    assert "step 3 skipped on every rank (non-finite loss on rank(s) 1" in result.stderr
    ckpt = run / "checkpoints"
    for rank in (0, 1):
        s2, s3, s4 = (optimizer_state(ckpt / f"step{n:08d}", rank) for n in (2, 3, 4))
        # master weights, Adam moments and Adam's step count: untouched by step 3, moved by step 4
        assert _same(s2["fp32_flat_groups"], s3["fp32_flat_groups"])
        assert _same(s2["optimizer_state_dict"]["state"], s3["optimizer_state_dict"]["state"])
        assert not _same(s3["fp32_flat_groups"], s4["fp32_flat_groups"])
        assert s4["optimizer_state_dict"]["state"][1]["step"] == 3  # steps 1, 2 and 4 were applied
        p2, p3, p4 = (rank_parts(ckpt / f"step{n:08d}", rank) for n in (2, 3, 4))
        assert _same(p2["ema"], p3["ema"]) and not _same(p3["ema"], p4["ema"])  # the EMA teacher too
        assert _same(p2["buffers"], p3["buffers"])  # iBOT's centers: the NaN batch left no trace
        assert all(torch.isfinite(b).all() for b in p4["buffers"].values())
        assert p3["skipped_steps"] == 1
    rows = {r["step"]: r for r in metrics(run) if "loss" in r}
    assert [rows[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert all(rows[s]["loss"] == rows[s]["loss"] for s in (1, 2, 4))  # finite before and after


def test_consecutive_skips_stop_the_run_naming_step_and_checkpoint(tmp_path):
    run = tmp_path / "run"
    result = launch(tiny_args(run, 8, "optim.max_consecutive_skips=3"), faults=("nan:2-8",))
    assert result.returncode == 3, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("mimscale: numerical fault")
    assert "3 optimizer steps in a row" in line and "the last at step 4" in line
    assert "cls nan" in line and str(run / "checkpoints" / "step00000003") in line
    assert "Traceback" not in result.stderr  # the traceback is in the log file
    log = (run / "logs" / "rank0.log").read_text()
    assert "Traceback" in log and "NumericalFault" in log
    assert sorted(losses(run)) == [1, 2, 3]  # step 4 raised before its metrics line


def test_logged_losses_are_means_over_the_applied_steps_since_the_last_line(tmp_path):
    each, pairs = tmp_path / "each", tmp_path / "pairs"
    ok(launch(tiny_args(each, 4), faults=("nan:3",)))
    ok(launch(tiny_args(pairs, 4, "log.every_steps=2"), faults=("nan:3",)))
    by_step = {r["step"]: r for r in metrics(each) if "loss" in r}
    logged = {r["step"]: r for r in metrics(pairs) if "loss" in r}
    assert sorted(logged) == [2, 4]
    for key in ("loss", "loss_cls", "loss_mim"):
        assert logged[2][key] == pytest.approx((by_step[1][key] + by_step[2][key]) / 2, rel=1e-6)
        assert logged[4][key] == pytest.approx(by_step[4][key], rel=1e-6)  # step 3 was skipped
