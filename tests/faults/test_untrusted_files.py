"""Checkpoints and weights are unpickled with weights_only=True: a pickle with code in it is refused
and its code never runs."""

import subprocess
import sys

import pytest
import torch
from fault_runs import ROOT, launch, ok, tiny_args


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _poisoned(path, marker):
    torch.save({"weights": torch.zeros(2), "extra": Payload(marker)}, path)
    return path


def test_check_refuses_code_and_accepts_deepspeed_files(tmp_path):
    from trainer.checkpoint import UntrustedFileError, check_weights_only

    marker = tmp_path / "pwned"
    with pytest.raises(UntrustedFileError, match="not a plain tensor file"):
        check_weights_only(_poisoned(tmp_path / "x.pt", marker))
    assert not marker.exists()
    torch.save({"w": torch.ones(3), "step": 4, "names": ["a"]}, tmp_path / "plain.pt")
    check_weights_only(tmp_path / "plain.pt")


def test_teacher_weights_with_code_are_refused(tmp_path):
    from models.teachers import TeacherWeightsError, read_state_dict

    marker = tmp_path / "pwned"
    with pytest.raises(TeacherWeightsError, match="cannot read teacher weights"):
        read_state_dict(_poisoned(tmp_path / "clip.pt", marker))
    assert not marker.exists()


@pytest.mark.slow
def test_resume_and_export_refuse_a_poisoned_checkpoint(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    ok(launch(tiny_args(run, 2)))
    tag = run / "checkpoints" / "step00000002"
    # DeepSpeed's own file: DeepSpeed would unpickle it with weights_only=False
    _poisoned(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", marker)
    resumed = launch(tiny_args(run, 3))
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    last = resumed.stderr.strip().splitlines()[-1]
    assert last.startswith("mimscale: untrusted file") and "zero_pp_rank_0_mp_rank_00_model_states.pt" in last
    exported = subprocess.run([sys.executable, "scripts/convert_to_hf.py", str(tag), str(tmp_path / "hf")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    last = exported.stderr.strip().splitlines()[-1]  # the script: one line, exit 2
    assert exported.returncode == 2 and last.startswith("convert_to_hf: ") and "not a plain tensor file" in last
    assert not (tmp_path / "hf").exists()
    # our own per-rank file is refused the same way
    _poisoned(tag / "rank00000.pt", marker)
    again = launch(tiny_args(run, 3))
    assert again.returncode == 2 and "rank00000.pt" in again.stderr.strip().splitlines()[-1]
    assert not marker.exists()  # the payload never ran
