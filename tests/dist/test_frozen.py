"""A frozen network (a method's `frozen_files`: a CLIP teacher, BEiT's tokenizer) is partitioned like the
student under ZeRO-3, holds its file's weights, never changes, has no gradients, stays in eval mode and
out of the optimizer, and is not in a checkpoint (which keeps only its file's hash): one test over the
methods' frozen networks, on 2 CPU ranks (tests/dist/frozen_check.py)."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT, torchrun

pytestmark = pytest.mark.slow

TINY = ["run.precision=bf16", "model.arch=vit_test", "data.batch_size=4"]
CASES = {  # config, overrides ({clip}, {tokenizer}: the tiny files)
    "clip_teacher of ibot_clip": ("ibot_clip_vit_tiny", [*TINY, "ibot.out_dim=64", "ibot.head_hidden_dim=64",
                                                         "ibot.head_bottleneck_dim=16", "teacher.clip.weights={clip}"]),
    "tokenizer of beit": ("beit_vit_tiny", [*TINY, "beit.tokenizer={tokenizer}", "beit.vocab_size=32"]),
}


def _tensor_keys(obj, prefix="") -> list[str]:
    """Every key path leading to a tensor inside a saved object."""
    if isinstance(obj, torch.Tensor):
        return [prefix]
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in _tensor_keys(v, f"{prefix}.{key}")]
    if isinstance(obj, (list, tuple)):
        return [k for i, v in enumerate(obj) for k in _tensor_keys(v, f"{prefix}[{i}]")]
    return []


@pytest.mark.parametrize("case", list(CASES))
def test_a_frozen_network_is_partitioned_frozen_and_not_checkpointed(case, frozen_files, tmp_path):
    config, overrides = CASES[case]
    report, ckpt_dir = tmp_path / "report.json", tmp_path / "ckpt"
    torchrun(str(ROOT / "tests" / "dist" / "frozen_check.py"), str(report), str(ckpt_dir),
             str(ROOT / "configs" / f"{config}.yaml"), *(o.format(**frozen_files) for o in overrides))
    r = json.loads(report.read_text())
    assert r["world"] == 2 and r["frozen"] and all(math.isfinite(v) for v in r["losses"])
    for name, f in r["frozen"].items():
        assert 0.45 < f["local_fraction"] < 0.55, (name, f)  # each rank holds about half of it
        assert f["matches_file"] and f["unchanged"] and f["no_grads"] and f["eval"] and not f["in_optimizer"], f

    # Nothing of a frozen network is in DeepSpeed's files or ours, only its file's hash; the EMA
    # teacher lives in our per-rank files as its fp32 shadow.
    step = ckpt_dir / "step00000003"
    for f in step.glob("*.pt"):
        state = torch.load(f, map_location="cpu", weights_only=False)
        keys = _tensor_keys(state)
        assert not [k for k in keys if any(name in k for name in r["frozen"])], (f.name, keys[:5])
        if not f.name.startswith("rank"):
            assert state.get("frozen_param_fragments") is None
            assert not [k for k in keys if "teacher" in k], f.name  # nor the EMA teacher (its shadow is ours)
        else:
            assert all(state[f"{name}_sha256"] == r["frozen"][name]["sha256"] for name in r["frozen"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    trainable = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=step.name)
    assert any(k.startswith("student.") for k in trainable)
    assert not [k for k in trainable if any(k.startswith(name) for name in r["frozen"]) or k.startswith("teacher.")]

    teacher = tmp_path / "teacher_backbone.pt"
    if teacher.exists():  # the EMA teacher backbone, reassembled from the two ranks' shadow slices
        from trainer.weights import read_backbone
        from models.vit import build_vit

        backbone = read_backbone(step)
        assert backbone.which == "teacher" and all(any(n in e for e in backbone.left_out) for n in r["frozen"])
        expected = torch.load(teacher, weights_only=True)
        assert backbone.state.keys() == expected.keys()
        for k in expected:  # the live teacher is the bf16 cast of the shadow
            assert torch.equal(backbone.state[k].to(torch.bfloat16).float(), expected[k]), k
        build_vit("vit_test", img_size=32, patch_size=8).load_state_dict(backbone.state, strict=True)
