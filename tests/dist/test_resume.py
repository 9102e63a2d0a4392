"""Resuming is exact, for every method: on 2 CPU ranks under ZeRO-3, a run stopped at step 2 and
started again (a new process, the same command) logs the uninterrupted run's losses and scheduled
values at every step, and ends with the same fp32 weights and the same EMA shadow slices."""

import pytest
import torch
from conftest import launch_run

pytestmark = pytest.mark.slow

SMALL_VIT = ["model.arch=vit_test", "data.batch_size=8", "data.num_workers=1"]
IBOT = [*SMALL_VIT, "ibot.out_dim=64", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16", "model.drop_path=0.1"]
CASES = {
    "ibot": ("ibot_vit_tiny", IBOT),
    "ibot_clip": ("ibot_clip_vit_tiny", [*IBOT, "teacher.clip.weights={clip}"]),
    "maskalign": ("maskalign_vit_tiny", [*SMALL_VIT, "teacher.clip.weights={clip}"]),
    "dvae": ("dvae_tiny", ["data.batch_size=8", "data.num_workers=1", "dvae.n_hid=8", "dvae.temperature_steps=4",
                           "dvae.kl_steps=4"]),
    "beit": ("beit_vit_tiny", [*SMALL_VIT, "beit.tokenizer={tokenizer}"]),
    "itpn": ("itpn_hivit_tiny", ["model.arch=hivit_test", "data.batch_size=8", "data.num_workers=1"]),
    "itpn with the CLIP teacher": ("itpn_hivit_tiny", ["model.arch=hivit_test", "data.batch_size=8",
                                                       "data.num_workers=1", "itpn.teacher=clip",
                                                       "teacher.clip.arch=clip_vit_tiny", "teacher.clip.weights={clip}"]),
    # from scratch, on a labelled tenth, with Mixup / CutMix (NumPy-seeded per step), RandAugment and erasing
    "finetune": ("finetune_vit_tiny", [*SMALL_VIT, "finetune.label_fraction=0.1", "finetune.mixup=0.8",
                                       "finetune.cutmix=1.0"]),
}
SCHEDULES = ("lr", "weight_decay", "momentum", "teacher_temp", "teacher_patch_temp", "gumbel_temp", "kl_weight")


def numbers(run) -> list[dict]:
    """What must match step for step: each loss term and metric, and each scheduled value."""
    return [{k: v for k, v in r.items() if k == "step" or k.startswith("loss") or k in SCHEDULES or k == "train_top1"}
            for r in run.steps()]


@pytest.mark.parametrize("method", list(CASES))
def test_resume_is_exact(method, frozen_files, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    config, overrides = CASES[method]
    args = [*(o.format(**frozen_files) for o in overrides), "schedule.steps=4", "checkpoint.every_steps=2", "log.every_steps=1"]
    straight = launch_run(tmp_path / "straight", config, *args, ranks=2)
    launch_run(tmp_path / "split", config, *args, "--stop-at", "2", ranks=2)
    split = launch_run(tmp_path / "split", config, *args, ranks=2)
    assert "resumed from" in split.stderr
    a, b = numbers(straight), numbers(split)
    assert [r["step"] for r in a] == [1, 2, 3, 4] and a == b
    assert straight.status["state"] == split.status["state"] == "finished" and split.status["step"] == 4
    if method == "ibot":  # the logged total is the optimised (weighted) sum of the terms
        assert all(abs(r["loss"] - r["loss_cls"] - r["loss_mim"]) < 1e-5 * abs(r["loss"]) for r in a)
    if method == "dvae":  # DALL-E's schedules: the KL weight ramps up from 0, the relaxation temperature falls
        assert a[0]["kl_weight"] == 0.0 < a[1]["kl_weight"] and a[0]["gumbel_temp"] == 1.0 > a[3]["gumbel_temp"]

    tag = "step00000004"
    sa = get_fp32_state_dict_from_zero_checkpoint(str(straight.out / "checkpoints"), tag=tag)
    sb = get_fp32_state_dict_from_zero_checkpoint(str(split.out / "checkpoints"), tag=tag)
    assert sa.keys() == sb.keys() and any(k.startswith("student.") for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for rank in (0, 1):  # the EMA teacher (where there is one): each rank's fp32 shadow slice, and the data position
        pa = torch.load(straight.out / "checkpoints" / tag / f"rank{rank:05d}.pt", weights_only=True)
        pb = torch.load(split.out / "checkpoints" / tag / f"rank{rank:05d}.pt", weights_only=True)
        assert ("ema" in pa) == ("ema" in pb)
        if "ema" in pa:
            assert all(torch.equal(x, y) for x, y in zip(pa["ema"]["shadow"], pb["ema"]["shadow"]))
        assert pa["data"] == pb["data"]
