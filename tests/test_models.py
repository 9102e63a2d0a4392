import math

import torch

from models.heads import IBOTHead
from models.vit import VIT_ARCHS, build_vit
from trainer.config import load_config
from trainer.engine import build_method, layer_id, param_groups
from trainer.schedules import Schedules, cosine, warmup_cosine


def test_vit_masks_any_crop_size_and_split_outputs():
    torch.manual_seed(0)
    vit = build_vit("vit_test", img_size=32, patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    out = vit.forward_features(x)
    assert out["cls"].shape == (2, 32) and out["patch"].shape == (2, 16, 32)
    assert vit.forward_features(torch.randn(2, 3, 16, 16))["patch"].shape == (2, 4, 32)  # local crop
    assert torch.equal(vit.forward_features(x, masks)["cls"], out["cls"])  # empty mask changes nothing
    masks[0, 0, 0] = True
    with torch.no_grad():
        vit.mask_token.normal_()
    masked = vit.forward_features(x, masks)
    assert not torch.allclose(masked["patch"][0], out["patch"][0])
    assert torch.allclose(masked["patch"][1], out["patch"][1])  # the other image is untouched


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    vit = build_vit("vit_test", img_size=32, patch_size=8)
    x = torch.randn(2, 3, 32, 32)
    vit.forward_features(x)["cls"].sum().backward()
    plain = [p.grad.clone() for p in vit.parameters() if p.grad is not None]
    vit.zero_grad()
    vit.set_grad_checkpointing(True, every=1)
    vit.forward_features(x)["cls"].sum().backward()
    again = [p.grad for p in vit.parameters() if p.grad is not None]
    assert len(again) == len(plain) > 10
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, again))


def test_registered_sizes_match_the_design_table():
    expected = {"vit_large": (1024, 24, 16, 16, 304e6), "vit_huge": (1280, 32, 16, 14, 632e6),
                "vit_giant": (1408, 40, 16, 14, 1.0e9)}
    for arch, (width, depth, heads, patch, params) in expected.items():
        w, d, h, _, p = VIT_ARCHS[arch]
        assert (w, d, h, p) == (width, depth, heads, patch)
        with torch.device("meta"):
            n = sum(p.numel() for p in build_vit(arch, img_size=224).parameters())
        assert abs(n - params) / params < 0.05, (arch, n)


def test_head_shared_or_separate():
    shared = IBOTHead(32, 64, shared=True, hidden_dim=16, bottleneck_dim=8)
    separate = IBOTHead(32, 64, patch_out_dim=48, shared=False, hidden_dim=16, bottleneck_dim=8)
    cls, patch = torch.randn(3, 32), torch.randn(3, 5, 32)
    a, b = shared(cls, patch)
    assert a.shape == (3, 64) and b.shape == (3, 5, 64)
    assert torch.allclose(shared(patch[:, 0], patch)[0], b[:, 0], atol=1e-6)  # one head for both
    a, b = separate(cls, patch)
    assert b.shape == (3, 5, 48)
    assert len(list(separate.parameters())) == 2 * len(list(shared.parameters()))
    logits = shared.cls(cls)
    assert logits.abs().max() <= 1.0 + 1e-5  # normalised bottleneck x normalised prototypes: cosines


def test_method_forward_with_separate_heads():
    cfg = load_config(None, ["model.arch=vit_test", "ibot.out_dim=32", "ibot.patch_out_dim=24",
                             "ibot.shared_head=false", "ibot.head_hidden_dim=16", "ibot.head_bottleneck_dim=8"])
    method = build_method(cfg)
    batch = {"global_crops": torch.randn(2, 3, 3, 32, 32), "local_crops": torch.randn(4, 3, 3, 16, 16),
             "masks": torch.rand(2, 3, 4, 4) < 0.5}
    losses = method(batch, {"teacher_temp": 0.04, "step": 0, "micro_step": 0})
    (losses["cls"] + losses["mim"]).backward()
    assert method.center_patch.shape == (24,)
    assert all(p.grad is None for p in method.teacher.parameters())
    assert method.teacher.training is False and method.student.training is True


def test_param_groups_decay_and_layer_scales():
    cfg = load_config(None, ["model.arch=vit_test", "ibot.out_dim=32", "ibot.head_hidden_dim=16",
                             "ibot.head_bottleneck_dim=8"])
    method = build_method(cfg)
    groups = param_groups(method, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    for name in ("student.backbone.pos_embed", "student.backbone.cls_token", "student.backbone.mask_token",
                 "student.backbone.norm.weight", "student.backbone.blocks.0.attn.qkv.bias"):
        assert by_name[name]["wd_scale"] == 0.0, name
    assert by_name["student.backbone.blocks.0.attn.qkv.weight"]["wd_scale"] == 1.0
    depth = len(method.student.backbone.blocks)
    assert layer_id("backbone.blocks.1.mlp.fc1.weight", depth) == 2
    assert by_name["student.backbone.patch_embed.proj.weight"]["lr_scale"] == 0.5 ** (depth + 1)
    assert by_name["student.head.cls.mlp.0.weight"]["lr_scale"] == 1.0
    assert by_name["student.head.cls.last_layer.weight"]["last_layer"]
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in method.student.parameters())


def test_schedules_are_pure_functions_of_the_step():
    assert cosine(0, 100, 1.0, 0.0) == 1.0 and cosine(100, 100, 1.0, 0.0) == 0.0
    assert math.isclose(cosine(50, 100, 1.0, 0.0), 0.5)
    assert warmup_cosine(0, 100, 1.0, 0.0, 10) == 0.0 and warmup_cosine(10, 100, 1.0, 0.1, 10) == 1.0
    cfg = load_config(None, ["schedule.steps=1000", "ibot.freeze_last_layer_steps=10",
                             "ibot.teacher_temp_warmup_steps=100"])
    s = Schedules.from_config(cfg)
    assert s.at(0)["momentum"] == cfg.ibot.ema_momentum[0] and s.at(1000)["momentum"] == 1.0
    assert s.at(0)["teacher_temp"] == 0.04 and s.at(100)["teacher_temp"] == 0.07
    assert s.at(9)["last_layer_lr_factor"] == 0.0 and s.at(10)["last_layer_lr_factor"] == 1.0
    assert s.at(500) == s.at(500)
