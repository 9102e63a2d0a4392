import math

import numpy as np
import pytest
import torch

from models.archs import VIT_ARCHS
from models.heads import IBOTHead
from models.vit import build_vit
from trainer.config import ConfigError, load_config
from trainer.engine import build_method, layer_id, param_groups
from trainer.methods import method_class
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
        a = VIT_ARCHS[arch]
        w, d, h, p = a.width, a.depth, a.heads, a.patch
        assert (w, d, h, p) == (width, depth, heads, patch)
        with torch.device("meta"):
            n = sum(p.numel() for p in build_vit(arch, img_size=224).parameters())
        assert abs(n - params) / params < 0.05, (arch, n)


def test_head_layouts():
    kw = {"hidden_dim": 16, "bottleneck_dim": 8}
    shared = IBOTHead(32, 64, patch="shared", **kw)
    ibot_style = IBOTHead(32, 64, patch_out_dim=48, patch="last_layer", **kw)
    dinov2 = IBOTHead(32, 64, patch_out_dim=48, patch="separate", **kw)
    cls, patch = torch.randn(3, 32), torch.randn(3, 5, 32)
    a, b = shared(cls, patch)
    assert a.shape == (3, 64) and b.shape == (3, 5, 64)
    assert torch.allclose(shared(patch[:, 0], patch)[0], b[:, 0], atol=1e-6)  # one head for both
    # iBOT's unshared head (bytedance/ibot models/head.py iBOTHead): the MLP is shared, the patch
    # tokens get a prototype layer of their own, last_layer2; nothing else is added.
    names = {n for n, _ in ibot_style.named_parameters()}
    assert names - {n for n, _ in shared.named_parameters()} == {"last_layer2.weight"}
    assert tuple(ibot_style.last_layer2.weight.shape) == (48, 8)
    a, b = ibot_style(cls, patch)
    assert b.shape == (3, 5, 48)
    mlp, protos = ibot_style.patch_path()
    assert mlp == ibot_style.cls.bottleneck and protos is ibot_style.last_layer2
    # DINOv2's separate head: a whole second head
    assert len(list(dinov2.parameters())) == 2 * len(list(shared.parameters()))
    assert dinov2(cls, patch)[1].shape == (3, 5, 48)
    logits = shared.cls(cls)
    assert logits.abs().max() <= 1.0 + 1e-5  # normalised bottleneck x normalised prototypes: cosines


def test_prototype_init_row_norms():
    """iBOT's prototypes start from nn.Linear's default init (weight_norm(nn.Linear(256, K))): row norms
    about sqrt(256 / (3 * 256)) = 0.577; std 0.02 gives about 0.32."""
    torch.manual_seed(0)
    linear = IBOTHead(64, 4096, hidden_dim=64, bottleneck_dim=256).cls.last_layer.weight.norm(dim=1)
    reference = torch.nn.Linear(256, 4096, bias=False).weight.norm(dim=1)
    assert abs(linear.mean() - reference.mean()) < 0.01 and abs(linear.mean() - 0.577) < 0.01
    normal = IBOTHead(64, 4096, hidden_dim=64, bottleneck_dim=256, prototype_init="trunc_normal")
    assert abs(normal.cls.last_layer.weight.norm(dim=1).mean() - 0.32) < 0.01


def _tiny_ibot(*overrides):
    # iBOT's own head (the embedded default's differs, see configs/defaults.yaml)
    reference_head = ["ibot.shared_head=true", "ibot.separate_patch_mlp=false", "ibot.shared_head_teacher=true",
                      "ibot.head_norm=none"]
    return build_method(load_config(None, ["model.arch=vit_test", "ibot.out_dim=32", "ibot.head_hidden_dim=16",
                                           "ibot.head_bottleneck_dim=8", *reference_head, *overrides]))


def _forward_backward(method):
    batch = {"global_crops": torch.randn(2, 3, 3, 32, 32), "local_crops": torch.randn(4, 3, 3, 16, 16),
             "masks": torch.rand(2, 3, 4, 4) < 0.5}
    losses = method(batch, {"teacher_temp": 0.04, "teacher_patch_temp": 0.07, "step": 0, "micro_step": 0})
    (losses["cls"] + losses["mim"]).backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert method.teacher.training is False and method.student.training is True


def test_unshared_head_with_ibots_shared_teacher_head():
    """iBOT's default --shared_head_teacher: the student's patch prototypes have no teacher twin; the
    teacher scores patches with its [CLS] prototypes, so the patch center has out_dim entries."""
    method = _tiny_ibot("ibot.shared_head=false")
    student = {n for n, _ in method.student.named_parameters()}
    teacher = {n for n, _ in method.teacher.named_parameters()}
    assert student - teacher == {"head.last_layer2.weight"} and teacher <= student
    assert method.center_patch.shape == (32,)
    _forward_backward(method)
    assert method.student.head.last_layer2.weight.grad.abs().sum() > 0


def test_separate_heads_on_both_sides():
    method = _tiny_ibot("ibot.shared_head=false", "ibot.separate_patch_mlp=true", "ibot.shared_head_teacher=false",
                        "ibot.patch_out_dim=24")
    assert {n for n, _ in method.student.named_parameters()} == {n for n, _ in method.teacher.named_parameters()}
    assert method.center_patch.shape == (24,)
    _forward_backward(method)


def test_param_groups_decay_and_layer_scales():
    method = _tiny_ibot()
    # iBOT (bytedance/ibot utils.py get_params_groups): only biases and 1-D parameters are exempt
    by_name = {n: g for g in param_groups(method, layer_decay=0.5) for n in g["names"]}
    for name in ("student.backbone.norm.weight", "student.backbone.blocks.0.attn.qkv.bias"):
        assert by_name[name]["wd_scale"] == 0.0, name
    for name in ("student.backbone.pos_embed", "student.backbone.cls_token", "student.backbone.mask_token",
                 "student.backbone.blocks.0.attn.qkv.weight"):
        assert by_name[name]["wd_scale"] == 1.0, name
    # timm's convention, switchable: the embeddings exempt too
    groups = param_groups(method, layer_decay=0.5, decay_embeddings=False)
    by_name = {n: g for g in groups for n in g["names"]}
    for name in ("student.backbone.pos_embed", "student.backbone.cls_token", "student.backbone.mask_token"):
        assert by_name[name]["wd_scale"] == 0.0, name
    depth = len(method.student.backbone.blocks)
    assert layer_id("backbone.blocks.1.mlp.fc1.weight", depth) == 2
    assert by_name["student.backbone.patch_embed.proj.weight"]["lr_scale"] == 0.5 ** (depth + 1)
    assert by_name["student.head.cls.mlp.0.weight"]["lr_scale"] == 1.0
    assert by_name["student.head.cls.last_layer.weight"]["lr_factor"] == "last_layer_lr_factor"
    # DINOv2's patch_embed_lr_mult: the patch embedding alone, on top of layer decay
    by_name = {n: g for g in param_groups(method, layer_decay=0.5, patch_embed_lr_mult=0.2) for n in g["names"]}
    assert by_name["student.backbone.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.2 * 0.5 ** (depth + 1))
    assert by_name["student.backbone.pos_embed"]["lr_scale"] == 0.5 ** (depth + 1)
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in method.student.parameters())
    # iBOT freezes every prototype layer ("last_layer" in the name), last_layer2 included
    groups = param_groups(_tiny_ibot("ibot.shared_head=false"))
    assert {n for g in groups if g["lr_factor"] for n in g["names"]} == {
        "student.head.cls.last_layer.weight", "student.head.last_layer2.weight"}


def test_schedules_are_pure_functions_of_the_step():
    assert cosine(0, 100, 1.0, 0.0) == 1.0 and cosine(100, 100, 1.0, 0.0) == 0.0
    assert math.isclose(cosine(50, 100, 1.0, 0.0), 0.5)
    assert warmup_cosine(0, 100, 1.0, 0.0, 10) == 0.0 and warmup_cosine(10, 100, 1.0, 0.1, 10) == 1.0
    cfg = load_config(None, ["schedule.steps=1000", "ibot.freeze_last_layer_steps=10",
                             "ibot.teacher_temp_warmup_steps=100"])
    s = Schedules.from_config(cfg, method_class(cfg.method))
    assert s.at(0)["momentum"] == cfg.ibot.ema_momentum[0] and s.at(1000)["momentum"] == cfg.ibot.ema_momentum[1]
    # iBOT's two teacher temperatures with main_ibot.py's defaults: [CLS] 0.04 -> 0.04, patches 0.04 -> 0.07,
    # both warmed up linearly over the same steps
    from trainer.methods.ibot import IBOTConfig

    i = IBOTConfig()
    assert tuple(i.teacher_temp) == (0.04, 0.04) and tuple(i.teacher_patch_temp) == (0.04, 0.07)
    cfg = load_config(None, ["ibot.teacher_temp=[0.04,0.04]", "ibot.teacher_patch_temp=[0.04,0.07]",
                             "ibot.teacher_temp_warmup_steps=100"])
    s2 = Schedules.from_config(cfg, method_class(cfg.method))
    assert [s2.at(k)["teacher_temp"] for k in (0, 50, 100, 200)] == [0.04] * 4
    patch = [s2.at(k)["teacher_patch_temp"] for k in (0, 50, 100, 200)]
    assert patch[0] == 0.04 and math.isclose(patch[1], 0.055) and patch[2] == patch[3] == 0.07
    assert s.at(9)["last_layer_lr_factor"] == 0.0 and s.at(10)["last_layer_lr_factor"] == 1.0
    assert s.at(500) == s.at(500)


def ibot_interpolate_pos_encoding(pos_embed, patch_size, w, h, npatch):
    """A transcription of bytedance/ibot models/vision_transformer.py interpolate_pos_encoding."""
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = torch.nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode='bicubic',
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def test_local_crop_position_embeddings_follow_ibot():
    """Local crops: iBOT's bicubic resampling at scale (n + 0.1) / N without antialias, not timm's."""
    torch.manual_seed(0)
    vit = build_vit("vit_test", img_size=64, patch_size=8).eval()
    timm_vit = build_vit("vit_test", img_size=64, patch_size=8, pos_interp="timm").eval()
    timm_vit.load_state_dict(vit.state_dict())
    for size in (24, 40, 64):
        x = torch.randn(2, 3, size, size)
        tokens = vit.patch_embed(x)
        expected = ibot_interpolate_pos_encoding(vit.pos_embed, 8, size, size, (size // 8) ** 2)
        ours = vit._pos_embed(tokens) - torch.cat([vit.cls_token.expand(2, -1, -1), tokens.flatten(1, 2)], 1)
        torch.testing.assert_close(ours, expected.expand(2, -1, -1), atol=1e-6, rtol=1e-6)
        if size != 64:  # timm's antialiased resize is a different function of the table
            other = timm_vit._pos_embed(tokens) - torch.cat([vit.cls_token.expand(2, -1, -1),
                                                              tokens.flatten(1, 2)], 1)
            assert (other - ours).abs().max() > 1e-3


def mae_sincos(embed_dim, grid_size):
    """A transcription of MAE's util/pos_embed.py get_2d_sincos_pos_embed(cls_token=True), which
    MaskAlign's models_pretrain.py uses."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.
        omega = 1. / 10000**omega
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_sincos_position_table_is_maes_and_fixed():
    vit = build_vit("vit_test", img_size=32, patch_size=4, pos_embed="sincos")
    expected = torch.from_numpy(mae_sincos(32, 8)).float().unsqueeze(0)
    torch.testing.assert_close(vit.pos_embed.data, expected)
    assert vit.fixed_parameters() == {"pos_embed"}
    assert build_vit("vit_test", img_size=32).fixed_parameters() == set()
    cfg = load_config(None, ["model.arch=vit_test", "ibot.out_dim=32", "ibot.head_hidden_dim=16",
                             "ibot.head_bottleneck_dim=8"])
    method = build_method(cfg)
    method.student.backbone.pos_embed_kind = "sincos"  # as MaskAlign builds it: lr 0, no decay
    by_name = {n: g for g in param_groups(method) for n in g["names"]}
    assert by_name["student.backbone.pos_embed"]["lr_scale"] == 0.0
    assert by_name["student.backbone.pos_embed"]["wd_scale"] == 0.0


class IBOTCustomSequential(torch.nn.Sequential):
    """bytedance/ibot models/head.py CustomSequential: BatchNorm1d over the channels of [B, N, C]."""
    bn_types = (torch.nn.BatchNorm1d,)

    def forward(self, input):
        for module in self:
            dim = len(input.shape)
            if isinstance(module, self.bn_types) and dim > 2:
                perm = list(range(dim - 1))
                perm.insert(1, dim - 1)
                inv_perm = list(range(dim)) + [1]
                inv_perm.pop(1)
                input = module(input.permute(*perm)).permute(*inv_perm)
            else:
                input = module(input)
        return input


def test_head_batch_norm_is_ibots():
    """ibot.head_norm bn: iBOT's --norm_in_head bn (BatchNorm1d in train mode, CustomSequential over all
    tokens), for forward and backward, on [CLS] and patch tokens together."""
    torch.manual_seed(0)
    head = IBOTHead(24, 40, hidden_dim=16, bottleneck_dim=8, norm="bn")
    ours = head.cls.mlp
    layers = []
    for m in ours:
        if isinstance(m, torch.nn.Linear):
            lin = torch.nn.Linear(m.in_features, m.out_features)
            lin.load_state_dict(m.state_dict())
            layers.append(lin)
        elif isinstance(m, torch.nn.GELU):
            layers.append(torch.nn.GELU())
        else:
            bn = torch.nn.BatchNorm1d(m.weight.numel())
            with torch.no_grad():
                bn.weight.copy_(torch.randn(bn.weight.shape))
                bn.bias.copy_(torch.randn(bn.bias.shape))
                m.weight.copy_(bn.weight)
                m.bias.copy_(bn.bias)
            layers.append(bn)
    ref = IBOTCustomSequential(*layers).train()
    cls, patch = torch.randn(6, 24, requires_grad=True), torch.randn(6, 5, 24, requires_grad=True)
    h_cls, h_patch = head.bottlenecks(cls, patch)
    expected = torch.nn.functional.normalize(ref(torch.cat([cls.unsqueeze(1), patch], 1)), dim=-1)
    torch.testing.assert_close(torch.cat([h_cls.unsqueeze(1), h_patch], 1), expected, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(expected)
    (torch.cat([h_cls.unsqueeze(1), h_patch], 1) * g).sum().backward()
    ours_grads = [cls.grad.clone(), patch.grad.clone()]
    cls.grad = patch.grad = None
    (expected * g).sum().backward()
    for a, b in zip(ours_grads, [cls.grad, patch.grad]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_batch_norm_head_sees_tokens_grouped_as_ibot():
    """With batch norm the student's head runs on all tokens of the global crops, then on all tokens of the
    local crops, as iBOT's MultiCropWrapper does; the losses equal that computation done by hand."""
    from trainer.methods.ibot import ibot_losses

    method = _tiny_ibot("ibot.head_norm=bn")
    g = torch.Generator().manual_seed(0)
    batch = {"global_crops": torch.randn(2, 3, 3, 32, 32, generator=g), "local_crops": torch.randn(4, 3, 3, 16, 16,
                                                                                                     generator=g),
             "masks": torch.rand(2, 3, 4, 4, generator=g) < 0.5}
    values = {"teacher_temp": 0.04, "teacher_patch_temp": 0.07}
    center = (method.center.clone(), method.center_patch.clone())
    ours = method(batch, values)
    method.center.copy_(center[0])
    method.center_patch.copy_(center[1])
    with torch.no_grad():
        s_g = method.student.backbone.forward_features(batch["global_crops"].flatten(0, 1),
                                                       batch["masks"].flatten(0, 1))
        s_l = method.student.backbone.forward_features(batch["local_crops"].flatten(0, 1))
        t = method.teacher.backbone.forward_features(batch["global_crops"].flatten(0, 1))
        head = method.student.head
        g_cls, g_patch = head(s_g["cls"], s_g["patch"])  # all tokens of the global crops at once
        l_cls, _ = head(s_l["cls"], s_l["patch"])  # all tokens of the local crops at once
        t_cls, t_patch = method.teacher.head(t["cls"], t["patch"])
        masks = batch["masks"].flatten(2)
        expected = ibot_losses(torch.cat([g_cls, l_cls]), g_patch[masks.flatten(0, 1)], masks, t_cls,
                               t_patch.flatten(0, 1), *center, 0.1, 0.04, 0.07)
    torch.testing.assert_close(ours["cls"].detach(), expected["cls"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours["mim"].detach(), expected["mim"], atol=1e-5, rtol=1e-4)


def test_lr_cosine_can_end_before_the_run():
    """optim.decay_steps: DALL-E's dVAE anneals its step size over 1.2M of 3M updates, then holds it."""
    cfg = load_config(None, ["schedule.steps=300", "optim.warmup_steps=10", "optim.decay_steps=100",
                             "optim.lr=1e-3", "optim.min_lr=1e-5"])
    s = Schedules.from_config(cfg, method_class(cfg.method))
    assert s.at(10)["lr"] == 1e-3 and math.isclose(s.at(55)["lr"], (1e-3 + 1e-5) / 2)
    assert s.at(100)["lr"] == s.at(299)["lr"] == 1e-5
    whole = Schedules.from_config(load_config(None, ["schedule.steps=300", "optim.warmup_steps=10"]),
                                  method_class("ibot"))
    assert whole.at(100)["lr"] > whole.at(200)["lr"] > whole.at(299)["lr"]  # 0: the cosine spans the run
    with pytest.raises(ConfigError, match="optim.decay_steps"):
        load_config(None, ["optim.warmup_steps=10", "optim.decay_steps=5"])
