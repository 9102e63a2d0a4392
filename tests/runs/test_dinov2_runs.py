"""configs/dinov2_vit_tiny.yaml end to end: its features learn, on one rank and under ZeRO-3 on two."""

import math

import pytest
from conftest import launch_run

pytestmark = pytest.mark.slow

# 120 of its 600 steps (bench/quality.py's `ci` length). Measured at this length, seeds 0 / 1 / 2:
# teacher kNN 53.3 / 48.3 / 54.0% against random init 13.3 / 11.7 / 11.7%, student 71.7 / 68.0 / 68.0%
# (full length: docs/methods.md). Each margin below the smallest seen (+36.7 teacher, +56.3 student).
STEPS, TEACHER_MARGIN, STUDENT_MARGIN = 120, 20.0, 40.0


def test_tiny_dinov2_learns_features(tmp_path):
    run = launch_run(tmp_path / "run", "dinov2_vit_tiny", f"schedule.steps={STEPS}", "eval.knn_at_end=true")
    s = run.summary
    assert s["knn"] >= s["knn_random_init"] + TEACHER_MARGIN, s
    assert s["knn_student"] >= s["knn_random_init"] + STUDENT_MARGIN, s
    first, last = run.steps()[0], run.steps()[-1]
    assert set(first) >= {"loss_cls", "loss_mim", "loss_koleo", "teacher_temp"}
    # KoLeo: at init the [CLS] tokens nearly coincide (LayerScale 1e-5), then spread out
    assert first["loss_koleo"] > 5.0 and last["loss_koleo"] < 0.5, (first, last)
    assert last["loss_mim"] < first["loss_mim"] - 0.1, (first, last)


def test_dinov2_runs_on_two_ranks_under_zero3(tmp_path):
    """Sinkhorn-Knopp over both ranks' rows, the batch masks and KoLeo per rank, under DeepSpeed."""
    run = launch_run(tmp_path / "run", "dinov2_vit_tiny", "schedule.steps=4", "model.arch=vit_test",
                     "dinov2.out_dim=64", "dinov2.patch_out_dim=32", "dinov2.head_hidden_dim=32",
                     "dinov2.patch_head_hidden_dim=32", "data.batch_size=8", "data.num_workers=0",
                     "log.every_steps=1", ranks=2)
    steps = run.steps()
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(r[k]) for r in steps for k in ("loss", "loss_cls", "loss_mim", "loss_koleo"))
    assert run.status["state"] == "finished"
