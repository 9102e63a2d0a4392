"""run.spike_guard: a loss spike on one rank of two rolls both back to the newest checkpoint, the data
of the steps since is skipped and recorded, and training goes on exactly as a run started from that
checkpoint with that data skipped."""

import json
import math
import shutil

import pytest
from conftest import wandb_offline
from fault_runs import launch, metrics, ok, tiny_args

from trainer.config.sections import SpikeGuardConfig
from trainer.spike_guard import SpikeError, SpikeGuard

pytestmark = pytest.mark.slow

ARGS = ("ibot.head_norm=none", "checkpoint.every_steps=4", "data.batch_size=4")
GUARD = ("run.spike_guard.enabled=true", "run.spike_guard.min_history=3", "run.spike_guard.window=10")


# a loss 1000 times its recent values on rank 1 at step 7, or a NaN batch there (one skipped step rolls back)
FAULTS = {"spike": ("spike:7@1", "loss "), "nan": ("nan:7@1", "1 non-finite steps in a row")}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_spike_rolls_back_once_skips_its_data_and_goes_on_as_a_run_from_the_checkpoint(tmp_path, fault):
    run, keys = tmp_path / "run", tmp_path / "keys"
    keys.mkdir()
    spec, why = FAULTS[fault]
    result = ok(launch(tiny_args(run, 10, *ARGS, *GUARD, "run.spike_guard.nonfinite_steps=1", "log.wandb=offline"),
                       faults=(spec, f"keys:{keys}"), ranks=2))
    # exactly one rollback, of step 7 to the checkpoint of step 4, decided alike on both ranks
    (record,) = [json.loads(line) for line in (run / "rollbacks.jsonl").read_text().splitlines()]
    assert (record["spike_step"], record["restored_step"], record["skipped_steps"]) == (7, 4, [5, 7])
    assert record["restored"].endswith("step00000004") and record["reason"].startswith(why), record["reason"]
    for rank in (0, 1):
        log = (run / "logs" / f"rank{rank}.log").read_text()
        assert log.count("loss spike") == 1 and "rolled back to" in log and "step00000004 (step 4)" in log
    assert "loss spike" in result.stderr
    # the samples of steps 5-7 on each rank are the ones recorded, and none comes back
    for rank in (0, 1):
        seen = dict(tuple(json.loads(line)) for line in (keys / f"keys.rank{rank}.jsonl").read_text().splitlines())
        assert sorted(seen) == list(range(1, 14))  # 7 batches, then 6 more after the rollback
        skipped = [k for call in (5, 6, 7) for k in seen[call]]
        assert (run / record["skipped_keys"][rank]).read_text().split() == skipped and len(skipped) == 12
        assert record["skipped_samples"][rank] == 12
        later = {k for call in range(8, 14) for k in seen[call]}
        assert not later & set(skipped)
    # metrics.jsonl is the run as trained, each step once: the abandoned steps 5-7 moved aside
    rows = metrics(run)
    mark = next(i for i, r in enumerate(rows) if "spike_rolled_back_from" in r)
    assert rows[mark] == {**rows[mark], "step": 4, "spike_rolled_back_from": 7}
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))
    after = {r["step"]: r["loss"] for r in rows[mark + 1:] if "loss" in r}
    assert sorted(after) == list(range(5, 11)) and all(math.isfinite(v) for v in after.values())
    aside = metrics(run / "rollbacks", "step7.metrics.jsonl")
    assert [r["step"] for r in aside] == [5, 6, 7] and aside[-1] == {"step": 7, "spike_rolled_back_to": 4}
    # W&B cannot take a step back: it keeps steps 1-6 as first trained, the mark at 7, then 8-10
    ids, history = wandb_offline(run)
    assert len(ids) == 1 and [s for s, _ in history] == list(range(1, 11))
    assert history[6][1]["spike_rolled_back_to"] == 4
    assert {s: h["loss"] for s, h in history[7:]} == {s: after[s] for s in (8, 9, 10)}

    # a run started from that checkpoint with those three batches thrown away: the same losses
    again = tmp_path / "again"
    shutil.copytree(run / "checkpoints" / "step00000004", again / "checkpoints" / "step00000004")
    ok(launch(tiny_args(again, 10, *ARGS), faults=("skip-batches:3",), ranks=2))
    theirs = {r["step"]: r["loss"] for r in metrics(again) if "loss" in r}
    assert {s: after[s] for s in range(5, 11)} == {s: theirs[s] for s in range(5, 11)}


def guard(**options) -> SpikeGuard:
    return SpikeGuard(SpikeGuardConfig(**{"enabled": True, "min_history": 5, "window": 20, **options}))


def test_a_spike_is_a_rise_past_the_robust_deviation_and_never_enters_the_history():
    g = guard(factor=10.0)
    for step, value in enumerate([10.0, 9.8, 9.9, 9.7, 9.6, 9.5], 1):
        assert g.spike(step, {"loss": value}, True, 0) is None
    assert g.spike(7, {"loss": 9.0}, True, 0) is None  # falling is never a spike
    assert "loss 30 >" in g.spike(8, {"loss": 30.0}, True, 0)
    assert "loss nan" in g.spike(9, {"loss": float("nan")}, True, 0)
    assert 30.0 not in g.history["loss"] and len(g.history["loss"]) == 7
    assert g.spike(10, {"loss": 9.9}, True, 0) is None
    # non-finite (skipped) steps: the configured run of them
    assert g.spike(11, {"loss": float("nan")}, False, 2) is None
    assert "3 non-finite steps" in g.spike(12, {"loss": float("nan")}, False, 3)


def test_rollbacks_are_capped_and_lower_the_lr_for_a_while():
    g = guard(max_rollbacks=2, rollback_window=100, lr_scale=0.5, lr_scale_steps=10)
    g.rolled_back(50, 40)  # a spike at step 50, back to the checkpoint of step 40: the lr x 0.5 for steps 40-49
    assert g.lr_factor(40) == g.lr_factor(49) == 0.5 and g.lr_factor(50) == 1.0
    g.rolled_back(120, 110)  # 50 is still within 100 steps
    with pytest.raises(SpikeError, match="3 rollbacks within 100 steps .at steps 50, 120, 140"):
        g.rolled_back(140, 130)
    g2 = guard(max_rollbacks=1, rollback_window=100)
    g2.rolled_back(50, 40)
    g2.rolled_back(151, 150)  # the first is out of the window
