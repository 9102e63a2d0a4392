"""MaskAlign and iBOT+CLIP modules on one process: visible-only encoding, masks, Dynamic Alignment."""

import importlib.util
from pathlib import Path

import pytest
import torch

from models.align import DynamicAlign, layerwise_matrix
from models.teachers import load_teacher_weights
from trainer.config import load_config
from trainer.engine import build_method, param_groups
from trainer.methods.ibot_clip import distill_loss
from trainer.methods.maskalign import attentive_visible, random_visible, visible_count

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.arch=vit_test", "model.patch_size=4", "data.batch_size=3", "data.mask.min_block_patches=4"]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_tiny_clip", ROOT / "scripts" / "make_tiny_clip.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.save(mod.tiny_clip(seed=1), tmp_path_factory.mktemp("clip") / "clip.safetensors")


def build(config: str, clip_file, *overrides):
    cfg = load_config(ROOT / "configs" / config, [*TINY, f"teacher.clip.weights={clip_file}", *overrides])
    method = build_method(cfg)
    load_teacher_weights(method.clip_teacher, clip_file)
    return cfg, method


def batch(g=0, views=2, locals_=0):
    gen = torch.Generator().manual_seed(g)
    return {"global_crops": torch.randn(views, 3, 3, 32, 32, generator=gen),
            "local_crops": torch.randn(locals_, 3, 3, 16, 16, generator=gen),
            "masks": torch.rand(views, 3, 8, 8, generator=gen) < 0.4}


def test_student_encodes_only_the_visible_patches(clip_file):
    cfg, method = build("maskalign_vit_tiny.yaml", clip_file, "maskalign.masking=attentive")
    lengths = []
    method.student.backbone.blocks[0].register_forward_pre_hook(lambda m, i: lengths.append(i[0].shape[1]))
    losses = method(batch(), {"step": 0, "micro_step": 0})
    grid = (32 // cfg.model.patch_size) ** 2  # vit_test: patch 4 -> 64 patches
    keep = visible_count(grid, 0.7)
    assert keep == 19 and lengths == [keep + 1]  # visible patches + [CLS]; no [MASK] tokens
    assert set(losses) == {"align"} and torch.isfinite(losses["align"])


def test_attentive_masking_keeps_the_top_of_the_teacher_attention(clip_file):
    _, method = build("maskalign_vit_tiny.yaml", clip_file, "maskalign.masking=attentive")
    images = batch()["global_crops"].flatten(0, 1)
    t = method.clip_teacher(images, (8, 8), method.input_mean, method.input_std, [-1], attention=True)
    keep = visible_count(64, 0.7)
    visible = method.visible(t["cls_attn"], images.shape[0], 64, 0, images.device)
    assert visible.shape == (6, keep)
    for attn, vis in zip(t["cls_attn"], visible):
        assert set(vis.tolist()) == set(attn.argsort(descending=True)[:keep].tolist())
        assert attn[vis].min() >= attn[~torch.isin(torch.arange(64), vis)].max()
    assert torch.equal(attentive_visible(t["cls_attn"], keep), visible)


def test_random_masks_are_exact_reproducible_and_vary():
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a, b, c = (random_visible(4, 64, 19, g(s), torch.device("cpu")) for s in (1, 1, 2))
    assert a.shape == (4, 19) and torch.equal(a, b) and not torch.equal(a, c)
    assert all(len(set(row.tolist())) == 19 for row in a) and bool((a.diff(dim=1) > 0).all())


def test_dynamic_alignment_learns_w_and_adapters_only(clip_file):
    _, method = build("maskalign_vit_tiny.yaml", clip_file)
    losses = method(batch(), {"step": 0, "micro_step": 0})
    losses["align"].backward()
    assert method.align.weight.requires_grad and method.align.weight.grad.abs().sum() > 0
    assert method.align.weight.shape == (2, 4)  # S student blocks (vit_test: 2) x T teacher blocks (4)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.align.adapters.parameters())
    assert all(p.grad is None for p in method.clip_teacher.parameters())
    groups = param_groups(method)
    trained = {id(p) for g in groups for p in g["params"]}
    assert next(g for g in groups if "align.weight" in g["names"])["wd_scale"] == 0.0
    assert {id(p) for p in method.align.parameters()} <= trained
    assert not {id(p) for p in method.clip_teacher.parameters()} & trained


def test_dynamic_alignment_mixes_levels():
    da = DynamicAlign(8, 6, n_student=3, n_teacher=2)
    assert torch.equal(da.weight.detach(), layerwise_matrix(3, 2)) and torch.equal(layerwise_matrix(4, 4), torch.eye(4))
    with torch.no_grad():
        da.weight.copy_(torch.randn(3, 2))
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    out = da(xs)
    expected = [sum(da.weight[i, j] * da.adapters[i](xs[i]) for i in range(3)) for j in range(2)]
    torch.testing.assert_close(out, torch.stack(expected))
    fixed = DynamicAlign(8, 6, 3, 2, dynamic=False)
    assert "weight" not in dict(fixed.named_parameters())


def test_ibot_clip_adds_a_distillation_term_on_masked_patches(clip_file):
    _, method = build("ibot_clip_vit_tiny.yaml", clip_file, "ibot.out_dim=32", "ibot.head_hidden_dim=16",
                      "ibot.head_bottleneck_dim=8")
    losses = method(batch(locals_=2), {"teacher_temp": 0.04, "step": 0, "micro_step": 0})
    assert set(losses) == {"cls", "mim", "clip"} and method.loss_weights["clip"] == 1.0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in method.clip_head.parameters())
    assert all(p.grad is None for p in method.clip_teacher.parameters())
    assert all(p.grad is None for p in method.teacher.parameters())
    names = {n for g in param_groups(method) for n in g["names"]}
    assert any(n.startswith("clip_head.") for n in names) and not any("teacher" in n for n in names)
    target = torch.randn(5, 6)
    normed = torch.nn.functional.layer_norm(target, (6,))
    assert distill_loss(normed * 3.0, target, "cosine").abs() < 1e-6  # scale-free
    assert distill_loss(normed, target, "smooth_l1").abs() < 1e-6
    assert distill_loss(torch.zeros(0, 6, requires_grad=True), torch.zeros(0, 6), "cosine") == 0
