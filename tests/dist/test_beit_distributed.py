"""BEiT on two CPU ranks under ZeRO-3: the frozen tokenizer and resuming."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer_file, torchrun

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_tokenizer_is_partitioned_frozen_not_checkpointed_and_resume_continues(tmp_path):
    tokenizer = tiny_tokenizer_file(tmp_path / "tok.safetensors")
    report, ckpt_dir = tmp_path / "report.json", tmp_path / "ckpt"
    torchrun(str(ROOT / "tests" / "dist" / "tokenizer_check.py"), str(report), str(tokenizer), str(ckpt_dir))
    r = json.loads(report.read_text())
    assert r["world"] == 2 and 0.45 < r["local_fraction"] < 0.55  # each rank holds about half of it
    assert r["matches_file"] and r["unchanged"] and r["no_grads"] and r["eval"] and not r["in_optimizer"]
    assert all(math.isfinite(v) for v in r["losses"]) and r["losses"][0] != r["losses"][1]
    # A new engine restored from the step-2 checkpoint continues exactly as the first one did.
    assert r["resumed"] == r["losses"][2:], (r["resumed"], r["losses"])

    # Nothing of the tokenizer is in DeepSpeed's files; the head and backbone are.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    step = ckpt_dir / "step00000002"
    for f in step.glob("*model_states.pt"):
        state = torch.load(f, map_location="cpu", weights_only=False)
        assert not [k for k in state["module"] if k.startswith("tokenizer")], f.name
        assert state.get("frozen_param_fragments") is None
    trainable = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=step.name)
    assert any(k.startswith("student.head.") for k in trainable) and not any("tokenizer" in k for k in trainable)
    assert "student.backbone.rel_pos_bias.relative_position_bias_table" in trainable
