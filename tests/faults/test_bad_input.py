"""Bad configs and bad paths stop before any training with one line on the terminal (exit 2)."""

import json

import pytest

import launch


def _ds_disagreeing(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                                "train_micro_batch_size_per_gpu": 999}))
    return ["--ds_config", str(path)], "train_micro_batch_size_per_gpu"


def _blocked_output(tmp_path):
    (tmp_path / "file").write_text("x")
    return [f"run.output_dir={tmp_path}/file/run"], "run.output_dir"


def _fp32_zero2(tmp_path):
    path = tmp_path / "z2.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    return ["run.precision=fp32", "--ds_config", str(path)], "zero_optimization.stage"


CASES = {
    "unknown key": lambda t: (["optim.lrr=1e-3"], "optim.lrr"),
    "impossible value": lambda t: (["data.mask.ratio=[0.1,1.5]"], "data.mask.ratio"),
    "missing teacher weights": lambda t: (["method=maskalign", "data.local_crops.number=0",
                                           "teacher.clip.arch=clip_vit_tiny", f"teacher.clip.weights={t}/none.pt"],
                                          "teacher.clip.weights"),
    "unwritable output dir": _blocked_output,
    "ds_config disagrees with the YAML": _ds_disagreeing,
    "missing ds_config": lambda t: (["--ds_config", "zero9"], "--ds_config"),
    "shard list naming nothing": lambda t: ([f"data.train_shards={t}/in22k-{{000..009}}.tar"], "data.train_shards"),
    "fp32 below ZeRO-3": lambda t: _fp32_zero2(t),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_before_training(case, tmp_path, capsys):
    args, names = CASES[case](tmp_path)
    if not any(a.startswith("run.output_dir") for a in args):
        args = [*args, f"run.output_dir={tmp_path}/run"]
    assert launch.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("mimscale: config error"), err
    assert names in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing written
