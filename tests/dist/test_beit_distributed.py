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


def _dvae_cmd(out: Path, steps: int, extra=()) -> list[str]:
    return ["launch.py", "--config", str(ROOT / "configs" / "dvae_tiny.yaml"), f"run.output_dir={out}",
            f"schedule.steps={steps}", "checkpoint.every_steps=2", "log.every_steps=1", "eval.knn_at_end=false",
            "data.batch_size=8", "data.num_workers=1", "log.tensorboard=false", "dvae.n_hid=8",
            "dvae.temperature_steps=4", "dvae.kl_steps=4", *extra]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_tokenizer_training_resumes_exactly_on_two_ranks(tmp_path):
    """Stage 1 on the shared engine: ZeRO-3 on 2 ranks, stopped at step 2 and resumed, gives the
    uninterrupted run's losses and schedule values step for step."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun(*_dvae_cmd(straight, 4))
    torchrun(*_dvae_cmd(split, 4, ["--stop-at", "2"]))
    torchrun(*_dvae_cmd(split, 4))
    keys = ("step", "loss", "loss_recon", "loss_kl", "gumbel_temp", "kl_weight")
    a = [{k: r[k] for k in keys} for r in _records(straight)]
    b = [{k: r[k] for k in keys} for r in _records(split)]
    assert [r["step"] for r in a] == [1, 2, 3, 4] and a == b
    assert a[0]["kl_weight"] == 0.0 < a[1]["kl_weight"] and a[0]["gumbel_temp"] == 1.0 > a[3]["gumbel_temp"]
