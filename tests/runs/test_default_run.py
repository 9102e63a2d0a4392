"""`python launch.py` with no arguments: the embedded default, end to end, on the CPU."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The README's command, unchanged but for where it writes: (its directory, what it printed)."""
    tmp_path = tmp_path_factory.mktemp("default")
    result = subprocess.run([sys.executable, "launch.py", f"run.output_dir={tmp_path / 'run'}",
                             f"data.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp_path, result


@pytest.mark.slow
def test_default_run_learns_features(default_run):
    tmp_path, result = default_run
    env = ENV
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = records[-1]
    trained, random_init, raw_pixels = summary["knn"], summary["knn_random_init"], summary["knn_raw_pixels"]
    # It ends with the kNN accuracy beside what it is compared with, as the README shows it.
    assert re.search(rf"kNN top-1 .*: {trained:.2f}%\s+random init: {random_init:.2f}%\s+raw pixels: "
                     rf"{raw_pixels:.2f}%", result.stdout), result.stdout[-2000:]
    # Seen at seed 0: 78.3% against 41.3% (docs/methods.md, "The teacher and its student"); raw pixels 98.3%.
    # Each margin here held over seeds 0-2 with room (docs/methods.md, "Learning in CI": kNN +34.0 to +38.7,
    # at step 200 +15.7 to +21.7, the [CLS] loss down 2.7 to 3.5, the probe +8.0 to +11.7 above the kNN).
    assert trained >= random_init + 20.0, (trained, random_init)
    assert raw_pixels > 90.0, raw_pixels
    # The student's kNN is measured beside its EMA teacher's and printed after it (seen at seed 0: 78.33%, level
    # with its teacher; under the first recipe's EMA, 0.99 -> 1, 79.67% against the teacher's 69.00%, what
    # bytedance/ibot's knn_classifier gives the exported weights at k = 20).
    student = summary["knn_student"]
    assert student >= random_init + 20.0 and f"student: {student:.2f}%" in result.stdout, (student, random_init)
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
    by_step = {r["step"]: r for r in records if "loss" in r}
    first, end = by_step[50], by_step[max(by_step)]
    # The [CLS] term falls (each line is the mean of the 25 steps before it) and neither teacher is uniform:
    # the loss of a collapsed run sits at ln K. (The patch term is no learning signal alone: from step 50 it
    # fell by 0.33, 0.43 and 0.01 over seeds 0-2, its teacher sharpening as its student learns.)
    assert end["loss_cls"] < first["loss_cls"] - 1.0, (first, end)  # seen: 5.10 -> 3.18
    assert end["loss_cls"] < math.log(1024) - 2.0 and end["loss_mim"] < math.log(1024) - 2.0, end
    # The loader keeps up: waiting for data is under 5% of the step time (the log's "data" share) after the
    # first window, which includes starting the workers (seen: 0-1%, 3.5% in the first).
    windows = [r for r in records if "time_data_s" in r][1:]
    wait = sum(r["time_data_s"] for r in windows) / sum(r["step_time_s"] for r in windows)
    assert len(windows) > 10 and wait < 0.05, wait

    # The kNN is measured during training too (eval.knn_every_steps: 200), and the final one is logged.
    knn = {r["step"]: r["knn"] for r in records if r.get("knn") is not None}
    assert sorted(knn) == [200, 400, 600] and knn[600] == trained, knn
    assert [r["step"] for r in records if r.get("knn_student") is not None] == [200, 400, 600]
    assert knn[200] > random_init, knn

    # The run ends by drawing its curves and the teacher's [CLS] attention on held-out digits.
    from PIL import Image

    from evaluation.pictures import FIGURE_DPI, PANEL_INCHES

    run = tmp_path / "run"
    assert f"pictures: {run / 'curves.png'}  {run / 'attention.png'}" in result.stdout
    curves = Image.open(run / "curves.png")
    assert curves.info["Description"] == "panels: loss, loss_cls, loss_mim, lr, knn"  # one per loss term
    side = int(PANEL_INCHES * FIGURE_DPI)
    assert Image.open(run / "attention.png").size == (4 * side, 6 * side)  # 6 digits x (image + 3 heads)

    # A linear probe on the same frozen [CLS] features beats their kNN (seen: 87.7% against 78.3%).
    probe = subprocess.run([sys.executable, "scripts/evaluate.py", "linear", str(run)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    linear = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert linear["eval"] == "linear" and linear["step"] == 600
    assert linear["linear_top1"] > trained + 5.0, (linear, trained)


@pytest.mark.slow
def test_fine_tuning_the_default_run_beats_the_same_recipe_from_scratch(default_run):
    """docs/fine-tuning.md's table, its 10% column: configs/finetune_vit_tiny.yaml from the default run's
    teacher and from scratch, on the same class-balanced tenth of the labels (149 digits)."""
    tmp_path, _ = default_run
    top1, labelled = {}, {}
    for name, init in (("pretrained", tmp_path / "run"), ("scratch", "none")):
        out = tmp_path / f"finetune_{name}"
        p = subprocess.run([sys.executable, "launch.py", "--config", "configs/finetune_vit_tiny.yaml",
                            f"run.output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", f"finetune.init={init}",
                            "finetune.label_fraction=0.1", "log.tensorboard=false"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-4000:]
        summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        top1[name] = summary["top1"]
        assert f"fine-tuned top-1 (held-out split): {summary['top1']:.2f}%" in p.stdout, p.stdout[-2000:]
        labelled[name] = (out / "labelled_keys.txt").read_text()
    assert labelled["pretrained"] == labelled["scratch"] and len(labelled["scratch"].split()) == 149
    # Seen at seeds 0, 1, 2 (each from that seed's default run under the first recipe's EMA, 0.99 -> 1): 69.0 /
    # 75.3 / 73.3% against 32.0 / 45.3 / 31.0% from scratch (docs/fine-tuning.md): the smallest gap 30.0 points,
    # the weakest scratch run 31.0%; from today's default run at seed 0: 70.7% against 30.3%.
    assert top1["pretrained"] >= top1["scratch"] + 10.0, top1
    assert top1["scratch"] > 20.0, top1  # the from-scratch recipe learns too (chance: 10%)
