"""Issue 28 (8): what makes the host wait for the GPU in a training step, counted on the CPU
(trainer/syncs.py through scripts/bench_step.py --syncs): at most 2 per optimizer step for every
method, outside logging steps: the step guard's one read in mimscale's code and DeepSpeed's one
(its skip-the-step check; its grad-norm sentinels are made on the host, trainer.engine.sentinel_on_host)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


CASES = {
    "ibot, colour work on the device": ("ibot_vit_tiny.yaml", ["data.augment.photometric=device"]),
    # (the Triton kernels run in the interpreter here: a model small enough for it)
    "ibot, packed crops (Triton)": ("ibot_vit_tiny.yaml", ["run.kernels=triton", "model.arch=vit_test",
                                                           "model.patch_size=8", "ibot.out_dim=64",
                                                           "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
                                                           "data.batch_size=4"]),
    "ibot_clip": ("ibot_clip_vit_tiny.yaml", ["teacher.clip.weights={clip}"]),
    "maskalign": ("maskalign_vit_tiny.yaml", ["teacher.clip.weights={clip}"]),
    "beit": ("beit_vit_tiny.yaml", ["beit.tokenizer={tokenizer}"]),
    "itpn": ("itpn_hivit_tiny.yaml", []),
    "dvae": ("dvae_tiny.yaml", []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_at_most_two_host_syncs_per_step(case, frozen_files, tmp_path):
    config, overrides = CASES[case]
    out = tmp_path / "syncs.json"
    cmd = [sys.executable, "scripts/bench_step.py", "--syncs", "--config", f"configs/{config}", "--out", str(out),
           *(o.format(**frozen_files) for o in overrides)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["ours"] + r["deepspeed"] <= 2, r["sites"]
    assert not any("torch.tensor" in site for site in r["sites"]), r["sites"]  # no blocking copies left
    assert any("faults.py" in site for site in r["sites"]), r["sites"]  # the step guard's one read is seen
