"""Issue 28 (8): what makes the host wait for the GPU in a training step, counted on the CPU
(trainer/syncs.py through scripts/bench_step.py --syncs): at most 2 per optimizer step for every
method, outside logging steps: the step guard's one read in mimscale's code and DeepSpeed's one
(its skip-the-step check; its grad-norm sentinels are made on the host, trainer.engine.sentinel_on_host).
The spike guard adds none: the loss terms ride on the step guard's all-reduce and read."""

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
    "dinov2": ("dinov2_vit_tiny.yaml", []),
    "ibot, spike guard on": ("ibot_vit_tiny.yaml", ["run.spike_guard.enabled=true"]),
}


@pytest.fixture(scope="module")
def counted(frozen_files, tmp_path_factory) -> dict:
    """Every case counted in one process (tests/runs/syncs_cases.py), as `scripts/bench_step.py --syncs
    --config C` counts one."""
    tmp = tmp_path_factory.mktemp("syncs")
    cases = {name: ["--config", str(ROOT / "configs" / config), *(o.format(**frozen_files) for o in overrides)]
             for name, (config, overrides) in CASES.items()}
    (tmp / "cases.json").write_text(json.dumps(cases))
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "runs" / "syncs_cases.py"), str(tmp / "cases.json"),
                        str(tmp / "out.json")], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_at_most_two_host_syncs_per_step(case, counted):
    r = counted[case]
    assert "error" not in r, r.get("error")
    assert r["ours"] + r["deepspeed"] <= 2, r["sites"]
    assert not any("torch.tensor" in site for site in r["sites"]), r["sites"]  # no blocking copies left
    assert any("faults.py" in site for site in r["sites"]), r["sites"]  # the step guard's one read is seen
