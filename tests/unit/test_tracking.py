"""trainer/metrics.py and trainer/tracking.py without a training run: metrics.jsonl cut back on resume,
what a tracker is sent, a result sent after the run to the run's own W&B run (offline)."""

import json

from conftest import wandb_items, wandb_offline, wandb_records

from trainer.config import dump_yaml, load_config
from trainer.metrics import MetricsWriter
from trainer.tracking import Trackers, send_results


class Recorder:
    def __init__(self):
        self.sent = []

    def log(self, step, values):
        self.sent.append((step, dict(values)))


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_resume_cuts_metrics_back_and_sends_a_tracker_no_step_twice(tmp_path):
    first = Recorder()
    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False, trackers=first)
    for step in range(1, 6):
        w.write(step, {"loss": 1.0 / step})
    w.jsonl.write('{"step": 6, "loss": 0.1')  # a kill in the middle of a line
    w.jsonl.close()
    assert [s for s, _ in first.sent] == [1, 2, 3, 4, 5]

    again = Recorder()  # resumed from the checkpoint of step 3: steps 4 and 5 are trained again
    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False, trackers=again, resumed_at=3)
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]  # the half line gone too
    for step in range(4, 8):
        w.write(step, {"loss": 1.0 / step})
    w.close()
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6, 7]
    assert [s for s, _ in again.sent] == [6, 7]  # 4 and 5 were sent before the kill


def test_a_rollback_moves_the_abandoned_steps_aside(tmp_path):
    sent = Recorder()
    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False, trackers=sent)
    for step in range(1, 8):
        w.write(step, {"loss": float(step)})
    w.roll_back(4, 7, tmp_path / "rollbacks" / "step7.metrics.jsonl")
    w.write(5, {"loss": 0.5})
    w.close()
    assert [(r["step"], "loss" in r) for r in lines(tmp_path / "metrics.jsonl")] == [
        (1, True), (2, True), (3, True), (4, True), (4, False), (5, True)]
    assert lines(tmp_path / "rollbacks" / "step7.metrics.jsonl")[-1] == {"step": 7, "spike_rolled_back_to": 4}
    assert sent.sent[-1] == (7, {"spike_rolled_back_to": 4})  # the redone step 5 is not sent


def test_a_result_after_the_run_goes_to_its_wandb_run(tmp_path):
    """A run's pictures go to W&B as images; scripts/evaluate.py's linear probe of a run that logged to W&B
    goes to the same W&B run (its id from tracking.json), in the run's summary; a run without a tracker
    is left alone."""
    assert send_results(tmp_path, 10, {"linear_top1": 0.5}) == []
    cfg = load_config(None, ["log.wandb=offline", f"run.output_dir={tmp_path}"])
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "curves.png")
    trackers = Trackers.open(cfg, 0)
    trackers.log(10, {"loss": 1.5, "note": "text"})
    trackers.pictures(10, [tmp_path / "curves.png", tmp_path / "absent.png"])  # as launch.py does at the end
    trackers.close()
    assert send_results(tmp_path, 10, {"linear_top1": 87.7}) == ["Wandb"]
    ids, history = wandb_offline(tmp_path)
    assert len(ids) == 1 and len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2
    assert [(s, h["loss"]) for s, h in history] == [(10, 1.5)] and "note" not in history[0][1]
    assert history[0][1]["pictures/curves/_type"] == "image-file"  # in the same step's row
    summaries = [wandb_items(r.summary.update) for r in wandb_records(tmp_path)
                 if r.WhichOneof("record_type") == "summary"]
    assert any(s.get("linear_top1") == 87.7 for s in summaries)
