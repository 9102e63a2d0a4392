"""The run planner (trainer/plan): parameter counts, activation memory against measured peaks,
FLOPs against a hand count, the ViT-G configs fitting 64 x 80 GB, the CLI and the launch warning."""

from __future__ import annotations

import logging
import os

import pytest
import timm
import torch

from models.archs import VIT_ARCHS
from models.vit import build_vit
from trainer.config import PROJECT_ROOT, files_unchecked, load_config
from trainer.ds_config import build_ds_config
from trainer.plan import workload
from trainer.plan.flops import device_peak, step_flops
from trainer.plan.measured import allocator_peak, backbone_case, drop_gradients, tensor_peak
from trainer.plan.memory import GiB, activations, plan, warn_if_over

CONFIGS = PROJECT_ROOT / "configs"
TINY = ["defaults", "ibot_vit_tiny", "ibot_clip_vit_tiny", "maskalign_vit_tiny", "beit_vit_tiny", "itpn_hivit_tiny",
        "dvae_tiny", "dinov2_vit_tiny"]


def config(name: str, *overrides: str):
    with files_unchecked():
        return load_config(CONFIGS / f"{name}.yaml", list(overrides))


@pytest.mark.parametrize("name", TINY)
def test_counts_equal_the_instantiated_method(name):
    """Every method: the planner's counts (meta device) are those of the module the engine builds."""
    from trainer.methods import METHODS

    cfg = config(name)
    counts = workload.count_parameters(workload.build_meta(cfg))
    torch.manual_seed(0)
    with files_unchecked():
        real = METHODS[cfg.method].from_config(cfg)
    assert counts == workload.count_parameters(real)
    assert counts.total == sum(p.numel() for p in real.parameters())
    assert counts.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad) > 0


@pytest.mark.parametrize("name", TINY)
def test_every_method_runs_its_step_on_the_meta_device(name):
    """The passes the planner and the FLOP count run exist for every method and cost something."""
    cfg = config(name)
    method = workload.build_meta(cfg)
    passes = workload.step_passes(method, cfg, 2)
    assert any(p.grad and p.saved > 0 for p in passes)
    assert all(p.kept > 0 for p in passes if not p.grad)
    flops = step_flops(cfg, method)
    assert flops["total"] > 0 and len(flops) == len(passes) + 1 + ("student prototype scores (in the loss)" in flops)


@pytest.mark.parametrize("arch", [a for a, record in VIT_ARCHS.items() if record.timm])
def test_every_registered_vit_has_timms_parameter_count(arch):
    """Our backbones on the meta device against timm's registry (the published shapes), plus our [MASK]."""
    width, depth = VIT_ARCHS[arch].width, VIT_ARCHS[arch].depth
    with torch.device("meta"):
        ours = build_vit(arch, img_size=224)
        theirs = timm.create_model(VIT_ARCHS[arch].timm, pretrained=False, num_classes=0)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) + width  # + mask_token
    if arch == "vit_gigantic":  # docs/design.md: ViT-G/14 1.8B, depth 48, width 1664
        assert (depth, width) == (48, 1664) and 1.84e9 < n < 1.85e9


def test_tensor_peak_counts_each_storage_once_while_it_is_alive():
    a = torch.ones(1024)  # 4 KiB, given as an input: alive throughout

    def fn():
        b = a * 2  # 4 KiB
        c = b.view(32, 32)  # a view of b: nothing new
        d = c + 1  # 4 KiB: a + b + d = 12 KiB
        del b, c, d
        torch.ones(4096).add_(1)  # 16 KiB (in place: counted once), after b and d are gone: 20 KiB

    assert tensor_peak(fn, inputs=[a]) == 20 * 1024
    w = torch.nn.Linear(64, 64)
    assert tensor_peak(lambda: w.weight.t(), [w]) == 0  # a view of a parameter is the parameter


@pytest.mark.parametrize("every", [0, 1, 2])
def test_activation_estimate_within_15_percent_of_measured_peak(every):
    """A ViT-S forward + backward in bf16 on the CPU: the planner's activations (saved tensors,
    the backward's working set, one recomputed block under checkpointing) vs the peak of the tensors
    the operators return, which is what the planner models and the same on every CPU; the
    allocator's peak beside it adds the kernels' scratch buffers (this CPU's, at this thread count)."""
    r = backbone_case(f"vit_small:112:16:{every}", torch.device("cpu"))
    print(f"every {every}: estimate {r['estimate_bytes'] / 2**20:.1f} MiB, tensors' peak "
          f"{r['tensor_peak_bytes'] / 2**20:.1f} MiB ({100 * r['error']:+.1f}%), allocator's peak "
          f"{r['allocator_peak_bytes'] / 2**20:.1f} MiB ({100 * r['allocator_error']:+.1f}%)")
    assert abs(r["error"]) < 0.15
    assert r["tensor_peak_bytes"] <= r["allocator_peak_bytes"]  # every tensor the operators return is allocated


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("every", [0, 1])
def test_activation_estimate_against_cuda_peak_at_vit_l_shapes(every):
    """On a GPU the allocator's peak (torch.cuda.max_memory_allocated) is held to the bound too."""
    r = backbone_case(f"vit_large:224:32:{every}", torch.device("cuda"))
    print(r)
    assert abs(r["error"]) < 0.15 and abs(r["allocator_error"]) < 0.15


MEASURE_ONE_CASE = """
import json, sys, torch
from trainer.plan.measured import backbone_case
r = backbone_case("vit_small:112:16:1", torch.device("cpu"))
print(json.dumps([r["tensor_peak_bytes"], r["allocator_peak_bytes"], torch.get_num_threads(),
                  torch.backends.cpu.get_cpu_capability()]))
"""


def test_the_tensors_peak_is_the_same_whatever_the_cpu_kernels_and_threads():
    """What the estimate is checked against does not move with the CPU's kernels (ATen's vectorised or
    baseline ones) or the thread count, to the byte; the allocator's peak does (27.5 vs 23.3 MB here)."""
    import json
    import subprocess
    import sys

    seen = []
    for env in ({"OMP_NUM_THREADS": "2"}, {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"}):
        done = subprocess.run([sys.executable, "-c", MEASURE_ONE_CASE], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **env})
        assert done.returncode == 0, done.stderr[-3000:]
        seen.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(seen)
    (tensors_a, _, threads_a, isa_a), (tensors_b, _, threads_b, isa_b) = seen
    assert (threads_a, threads_b) == (2, 1) and isa_b == "DEFAULT" and isa_a != isa_b  # two real set-ups
    assert tensors_a == tensors_b


def test_method_step_estimate_against_measured_peak():
    """The default iBOT step (student, EMA teacher, heads, loss) at micro-batch 64 on the CPU: the
    planner's whole activation estimate vs the tensors' peak of the real forward + backward (the
    batch included: the planner counts it as the patch embedding's saved input)."""
    from trainer.methods import METHODS

    cfg = config("defaults", "run.kernels=torch", "run.precision=bf16")
    b = cfg.data.batch_size
    estimate = activations(workload.build_meta(cfg), cfg, b, 0, fused_ce=False).total
    torch.manual_seed(0)
    method = METHODS[cfg.method].from_config(cfg).to(torch.bfloat16)
    drop_gradients(method)
    s = workload.shapes(cfg, b)
    masks = torch.zeros(s.global_n, b, s.grid * s.grid, dtype=torch.bool)
    masks[..., : s.masked_per_view] = True  # the planner's worst case: every view masked at the top ratio
    batch = {"global_crops": torch.randn(s.global_n, b, 3, s.global_size, s.global_size).to(torch.bfloat16),
             "local_crops": torch.randn(s.local_n, b, 3, s.local_size, s.local_size).to(torch.bfloat16),
             "masks": masks.view(s.global_n, b, s.grid, s.grid)}
    values = {"teacher_temp": 0.04, "teacher_patch_temp": 0.04}

    def step():
        losses = method(batch, values)
        sum(losses.values()).backward()

    step()
    method.zero_grad(set_to_none=True)
    measured = tensor_peak(step, [method], batch.values())
    allocated = allocator_peak(step, torch.device("cpu")) + sum(t.untyped_storage().nbytes() for t in batch.values())
    print(f"iBOT default step: estimate {estimate / 2**20:.1f} MiB, tensors' peak {measured / 2**20:.1f} MiB, "
          f"allocator's peak {allocated / 2**20:.1f} MiB")
    assert abs(estimate / measured - 1) < 0.15
    assert measured <= allocated


def test_flops_of_a_vit_b16_forward_equal_a_hand_count():
    N, D, H, L = 197, 768, 12, 12  # tokens, width, heads, blocks
    patch_embed = 2 * 196 * D * (3 * 16 * 16)
    per_block = 2 * N * D * 3 * D + 2 * 2 * H * N * N * (D // H) + 2 * N * D * D + 2 * 2 * N * D * 4 * D
    hand = patch_embed + L * per_block
    assert hand == 35_126_120_448  # 17.56 GMACs: the usual "17.6 GFLOPs" of ViT-B/16 counts multiply-adds
    with torch.device("meta"):
        m = build_vit("vit_base", img_size=224)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        m.forward_features(torch.empty(1, 3, 224, 224, device="meta"))
    assert counter.get_total_flops() == hand


def test_flops_of_a_vit_giant2_forward_equal_a_hand_count():
    """DINOv2's ViT-g/14 (docs/scale.md writes this count out): 257 tokens of width 1536, SwiGLU 4096 wide
    (fc1 packs gate and up: 2 x 4096 outputs), 40 blocks, patch 14 at 224 pixels."""
    T, C, H, L = 257, 1536, 4096, 40
    patch_embed = 2 * 256 * C * (3 * 14 * 14)
    per_block = 2 * T * C * 3 * C + 2 * 2 * T * T * C + 2 * T * C * C + 2 * T * C * 2 * H + 2 * T * H * C
    hand = patch_embed + L * per_block
    assert hand == 598_780_133_376  # 598.8 GFLOP (299.4 GMACs)
    with torch.device("meta"):
        m = build_vit("vit_giant2", img_size=224, ffn="swiglu", layer_scale=1e-5)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        m.forward_features(torch.empty(1, 3, 224, 224, device="meta"))
    assert abs(counter.get_total_flops() / hand - 1) < 0.01


def test_step_flops_count_grad_passes_three_times():
    cfg = config("ibot_l16_in22k", "data.local_crops.number=0")
    f = step_flops(cfg)
    with torch.device("meta"):
        vit = build_vit("vit_large", img_size=224)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        vit.forward_features(torch.empty(2 * cfg.data.batch_size, 3, 224, 224, device="meta"))
    backbone = counter.get_total_flops()
    # the student's backbone costs 3x, the teacher's 1x; the heads add a few percent
    assert 4 * backbone < f["total"] < 4.3 * backbone
    assert device_peak("NVIDIA H100 80GB HBM3") == 989e12 and device_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert device_peak("a CPU") is None


@pytest.mark.parametrize("name", ["ibot_l16_in22k", "ibot_h14_in22k", "ibot_g14_in22k", "ibot_G14_in22k",
                                  "ibot_clip_vit_G14_in22k", "dinov2_vitg14_in22k", "dinov2_vitG14_in22k"])
def test_large_configs_fit_64_gpus_of_80_gb(name):
    cfg = config(name)
    p = plan(cfg, build_ds_config("zero3.json", cfg, 64), 64, 80 * GiB, search=False)
    print(p.table())
    assert p.fits and p.micro_batch >= 16 and p.margin > 10 * GiB
    if "G14" in name and cfg.method != "dinov2":
        assert cfg.model.arch == "vit_gigantic" and cfg.ibot.out_dim == 65536 and cfg.model.sharded_init
        assert 1.84e9 < p.counts.trainable < 1.91e9  # ViT-G/14 + iBOT heads
    if cfg.method == "dinov2":  # the SwiGLU backbone and DINOv2's two heads of 131072 prototypes
        with torch.device("meta"):
            backbone = sum(p.numel() for p in build_vit(cfg.model.arch, img_size=224, ffn="swiglu",
                                                        layer_scale=1e-5).parameters())
        C, h = VIT_ARCHS[cfg.model.arch].width, 2048
        heads = sum(C * h + h + h * h + h + h * b + b + 131072 * b + 131072 for b in (384, 256))
        assert p.counts.trainable == backbone + heads and cfg.model.sharded_init
        if cfg.model.arch == "vit_giant2":
            assert backbone == 1_134_771_200  # tests/unit/test_dinov2.py counts it by hand
        else:  # DINOv2's width rule keeps ViT-G's MLP parameter count: 3 x 5464 ~ 2 x 8192
            assert 1.84e9 < backbone < 1.85e9


def test_checkpointing_and_offload_change_the_plan_the_way_they_should():
    cfg = config("ibot_l16_in22k", "model.grad_checkpointing=1")
    z3 = build_ds_config("zero3.json", cfg, 8)
    base = plan(cfg, z3, 8, 80 * GiB, search=False)
    rows = {r.name: r for r in base.rows}
    assert base.activations_without_checkpointing > 5 * rows["activations: student (saved for backward)"].gpu
    off = plan(cfg, build_ds_config("zero3_offload.json", cfg, 8), 8, 80 * GiB, search=False)
    off_rows = {r.name: r for r in off.rows}
    assert off_rows["Adam moments (fp32 m, v)"].gpu == 0 and off_rows["Adam moments (fp32 m, v)"].host > 0
    assert off.total < base.total
    # ZeRO-3 shards the states: 8 -> 64 GPUs divides them by 8
    wide = {r.name: r for r in plan(cfg, z3, 64, 80 * GiB, search=False).rows}
    assert wide["fp32 master weights"].gpu == pytest.approx(rows["fp32 master weights"].gpu / 8)


def test_largest_micro_batch_is_the_boundary():
    cfg = config("ibot_l16_in22k")
    ds = build_ds_config("zero3.json", cfg, 8)
    p = plan(cfg, ds, 8, 24 * GiB, micro_batch=16)
    b = p.largest_micro_batch
    assert b and b > 16
    method = workload.build_meta(cfg)
    assert plan(cfg, ds, 8, 24 * GiB, micro_batch=b, method=method, search=False).fits
    assert not plan(cfg, ds, 8, 24 * GiB, micro_batch=b + 1, method=method, search=False).fits


def test_cli_says_whether_it_fits(tmp_path):
    import json
    import subprocess
    import sys

    def plan_memory(*args: str) -> tuple[int, str]:
        p = subprocess.run([sys.executable, "scripts/plan_memory.py", *args], cwd=CONFIGS.parent, capture_output=True,
                           text=True, timeout=600)
        return p.returncode, p.stdout + p.stderr

    code, out = plan_memory("--config", str(CONFIGS / "ibot_vit_tiny.yaml"), "--gpus", "2", "--gpu-mem", "16",
                            "--json", str(tmp_path / "p.json"), "--flops")
    assert code == 0, out
    assert "fits:" in out and "largest micro-batch" in out and "model FLOPs per optimizer step" in out
    assert json.loads((tmp_path / "p.json").read_text())["fits"] is True
    code, out = plan_memory("--config", str(CONFIGS / "ibot_G14_in22k.yaml"), "--gpus", "1", "--gpu-mem", "16")
    assert code == 1 and "does NOT fit" in out, out
    assert plan_memory("--config", str(CONFIGS / "ibot_G14_in22k.yaml"), "--gpus", "0")[0] == 2


def test_launch_warns_before_the_engine_when_the_plan_does_not_fit(caplog):
    cfg = config("ibot_G14_in22k")
    with caplog.at_level(logging.WARNING):
        result = warn_if_over(cfg, build_ds_config("zero3.json", cfg, 1), 1, available=8 * GiB)
    assert not result.fits and "does NOT fit" in caplog.text and "plan_memory.py" in caplog.text


def test_configs_for_vit_h_and_larger_build_sharded():
    big = [p.stem for p in CONFIGS.glob("*.yaml")
           if config(p.stem).model.arch in ("vit_huge", "vit_giant", "vit_giant2", "vit_gigantic")]
    assert {"ibot_h14_in22k", "ibot_g14_in22k", "ibot_G14_in22k", "ibot_clip_vit_G14_in22k"} <= set(big)
    assert all(config(name).model.sharded_init for name in big), big


def test_bench_plan_writes_the_estimate_beside_both_measured_peaks(tmp_path):
    """scripts/bench_plan.py at a tiny case: the table and the JSON with its record."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "plan.json"
    p = subprocess.run([sys.executable, "scripts/bench_plan.py", "--cases", "vit_test:32:2:1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert {"device", "versions", "command"} <= set(r) and "ATen" in r["device"]
    (case,) = r["cases"]
    assert case["estimate_bytes"] > 0 and case["tensor_peak_bytes"] > 0 and "vit_test:32:2:1" in p.stdout
