"""iTPN: HiViT's stages under masking, the pyramid, parameter counts against the reference, the
losses' inputs, configs and the export file."""

from pathlib import Path

import pytest
import torch

from export.itpn import load_itpn, save_itpn
from models.hivit import MlpBlock, PatchMerge, build_hivit
from models.pyramid import FeaturePyramid, HiViTFPN, build_itpn, to_maps
from trainer.config import ConfigError, load_config
from trainer.methods.itpn import feature_target, pixel_loss, pixel_targets

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "itpn_hivit_tiny.yaml"
SMALL = ["model.arch=hivit_test", "itpn.fpn_dim=16", "itpn.decoder_dim=32", "itpn.decoder_depth=1",
         "itpn.decoder_heads=2", "itpn.mfm_dim=16", "itpn.mfm_heads=2"]


def test_stage_and_pyramid_shapes_and_strides():
    torch.manual_seed(0)
    model = HiViTFPN(b := build_hivit("hivit_test", img_size=64, patch_size=16), FeaturePyramid(b.dims, 16, 1))
    x = torch.randn(2, 3, 64, 64)
    out = b.forward_features(x)
    s4, s8, s16 = out["stages"]
    # 4 x 4 patches of 16 pixels; inner tokens 4 x 4 (stride 4), 2 x 2 (stride 8), 1 (stride 16)
    assert s4.shape == (2, 16, 4, 4, 8) and s8.shape == (2, 16, 2, 2, 16) and s16.shape == (2, 16, 32)
    levels = model.forward_features(x)["pyramid"]
    assert [tuple(lv.shape) for lv in levels] == [(2, 16, 1, 1, 16), (2, 16, 2, 2, 16), (2, 16, 4, 4, 16)]
    maps = model.forward_pyramid(x)  # strides 4, 8, 16
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4)]
    # the map's pixel (row 4 i + a, col 4 j + b) is inner token (a, b) of patch (i, j)
    assert torch.equal(maps[0][:, :, 5, 9], levels[2][:, 1 * 4 + 2, 1, 1])
    with pytest.raises(ValueError, match="not the whole"):
        to_maps([levels[0][:, :5]], (4, 4))


def test_masked_patches_never_enter_any_stage():
    """Tokens counted at every block of backbone and pyramid: each stage sees the visible patches'
    tokens only (K x 16, K x 4, K), and what a dropped patch contains changes nothing."""
    torch.manual_seed(0)
    b = build_hivit("hivit_test", img_size=64, patch_size=16)
    pyramid = FeaturePyramid(b.dims, 16, 1)
    seen = []

    def count(module, args):
        x = args[0]
        seen.append((type(module).__name__, x.shape[1] * (x.shape[2] * x.shape[3] if x.dim() == 5 else 1)))

    for m in [*b.blocks, *pyramid.modules()]:
        if isinstance(m, (MlpBlock, PatchMerge)) or type(m).__name__ == "Block":
            m.register_forward_pre_hook(count)
    x = torch.randn(2, 3, 64, 64)
    keep = torch.tensor([[0, 5, 10, 15], [1, 2, 3, 4]])  # K = 4 of 16 patches
    levels = pyramid(b.forward_features(x, keep)["stages"])
    K = 4
    backbone_seen = seen[:len(b.blocks)]
    assert backbone_seen == [("MlpBlock", K * 16), ("PatchMerge", K * 16), ("MlpBlock", K * 4),
                             ("PatchMerge", K * 4), ("Block", K), ("Block", K)]
    assert sorted({n for _, n in seen[len(b.blocks):]}) == [K * 1, K * 4, K * 16]  # pyramid levels: K patches
    assert all(lv.shape[1] == K for lv in levels)
    # a dropped patch's pixels do not reach any output (patch 1 of image 0 is dropped)
    y = x.clone()
    y[0, :, 0:16, 16:32] += 5.0
    again = pyramid(b.forward_features(y, keep)["stages"])
    assert all(torch.equal(a[0], c[0]) for a, c in zip(levels, again))
    # while a kept one does (patch 5 of image 0)
    y[0, :, 16:32, 16:32] += 5.0
    assert not torch.equal(pyramid(b.forward_features(y, keep)["stages"])[2][0], levels[2][0])


# Instantiated from sunsmarterjie/iTPN (commit 638eff4) itpn_pixel/models/models_itpn.py, class iTPN with
# num_outs=3, bridge_mlp_ratio 3, mlp_ratio 4, LayerNorm eps 1e-6: backbone, pyramid (fpn_dim 256).
REFERENCE = {  # (arch, fpn_depth, rpe): (backbone, pyramid)
    ("hivit_base", 2, False): (77_904_000, 4_700_160),
    ("hivit_large", 2, False): (287_373_120, 5_077_504),
    ("hivit_base", 1, True): (78_043_968, 3_648_000),  # itpn_clip's layout: rpe tables, fpn_depth 1
    ("hivit_large", 1, True): (287_723_040, 4_025_344),
}


@pytest.mark.parametrize("key", list(REFERENCE))
def test_parameter_counts_match_the_reference(key):
    arch, fpn_depth, rpe = key
    with torch.device("meta"):
        model = build_itpn({"arch": arch, "image_size": 224, "patch_size": 16, "fpn_dim": 256,
                            "fpn_depth": fpn_depth})
    backbone = sum(p.numel() for p in model.backbone.parameters())
    pyramid = sum(p.numel() for p in model.pyramid.parameters())
    ref_backbone, ref_pyramid = REFERENCE[key]
    assert pyramid == ref_pyramid
    if rpe:  # we build no relative position bias: (2 * 14 - 1)^2 x heads per attention block fewer
        assert abs(backbone - ref_backbone) / ref_backbone < 0.01
    else:
        assert backbone == ref_backbone


def test_pixel_loss_reads_masked_patches_only():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    target = pixel_targets(images, 8)
    assert target.shape == (2, 16, 192)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)  # per-patch normalised
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, :12] = True
    pred = torch.randn_like(target)
    loss = pixel_loss(pred, target, masked)
    pred2 = pred.clone()
    pred2[:, 12:] += 100.0  # visible patches: no effect
    assert torch.equal(pixel_loss(pred2, target, masked), loss)
    pred2[:, 0] += 1.0  # a masked one: counted
    assert pixel_loss(pred2, target, masked) > loss
    expected = ((pred - target) ** 2).mean(-1)[masked].mean()
    assert torch.allclose(loss, expected)


def test_mfm_targets_come_from_the_teachers_matching_stage():
    """EMA teacher: the stride-4 target is stage 1's output, stride 8 stage 2's, stride 16 the main
    stage's; changing the main stage moves only the stride-16 target."""
    from trainer.methods.itpn import ITPN as Method

    cfg = load_config(TINY, SMALL)
    torch.manual_seed(0)
    method = Method.from_config(cfg)
    assert sorted(method.loss_weights) == ["mfm16", "mfm4", "mfm8", "pixel"]
    x = torch.randn(2, 3, 32, 32)
    t = method.teacher_targets(x, (4, 4))
    stages = method.teacher.backbone.forward_features(x)["stages"]
    assert torch.equal(t["mfm4"], feature_target(stages[0])) and t["mfm4"].shape == (2, 16, 16 * 8)
    assert torch.equal(t["mfm8"], feature_target(stages[1])) and t["mfm8"].shape == (2, 16, 4 * 16)
    assert torch.equal(t["mfm16"], feature_target(stages[2])) and t["mfm16"].shape == (2, 16, 32)
    assert torch.allclose(t["mfm4"].view(2, 16, 16, 8).std(-1, unbiased=False), torch.ones(2, 16, 16), atol=1e-3)
    with torch.no_grad():
        for p in method.teacher.backbone.blocks[-1].parameters():
            p.add_(0.5)
    t2 = method.teacher_targets(x, (4, 4))
    assert torch.equal(t2["mfm4"], t["mfm4"]) and torch.equal(t2["mfm8"], t["mfm8"])
    assert not torch.allclose(t2["mfm16"], t["mfm16"])
    # the student's predictions have the targets' shapes, at every patch
    keep = method.visible(2, 16, 0, x.device)
    assert keep.shape == (2, 4)
    preds = method.predict(x, keep)
    assert {k: tuple(v.shape) for k, v in preds.items()} == {
        "pixel": (2, 16, 192), "mfm16": (2, 16, 32), "mfm8": (2, 16, 64), "mfm4": (2, 16, 128)}


def test_clip_teacher_levels_and_pixel_only(tmp_path):
    from conftest import tiny_clip_file

    from trainer.methods.itpn import ITPN as Method

    clip = tiny_clip_file(tmp_path / "clip.safetensors")
    cfg = load_config(TINY, [*SMALL, "itpn.teacher=clip", "teacher.clip.arch=clip_vit_tiny",
                             f"teacher.clip.weights={clip}", "teacher.clip.blocks=[0,-1,-1]",
                             "itpn.mfm_weights=[1.0,0.0,2.0]"])
    method = Method.from_config(cfg)
    method.clip_teacher.load_weights(str(clip))
    assert method.loss_weights == {"pixel": 1.0, "mfm16": 1.0, "mfm4": 2.0} and not hasattr(method, "teacher")
    x = torch.randn(2, 3, 32, 32)
    t = method.teacher_targets(x, (4, 4))
    ref = method.clip_teacher(x, (4, 4), method.input_mean, method.input_std, [0, -1])["blocks"]
    assert torch.equal(t["mfm16"], feature_target(ref[0])) and torch.equal(t["mfm4"], feature_target(ref[1]))
    losses = method({"global_crops": x[None]}, {"micro_step": 0})
    assert set(losses) == {"pixel", "pixel_zero", "mfm16", "mfm4", "mfm_zero"}
    pixel_only = Method.from_config(load_config(TINY, [*SMALL, "itpn.teacher=none"]))
    assert pixel_only.loss_weights == {"pixel": 1.0} and "mfm_decoders" not in pixel_only.student


@pytest.mark.parametrize("overrides,key", [
    (["model.arch=vit_tiny"], "model.arch"),
    (["itpn.mask_ratio=1.0"], "itpn.mask_ratio"),
    (["model.patch_size=6", "data.global_crops.size=36"], "model.patch_size"),
    (["itpn.pixel_weight=0", "itpn.teacher=none"], "itpn.pixel_weight"),
    (["itpn.decoder_dim=40"], "itpn.decoder_dim"),
    (["data.global_crops.number=2", "data.augment.blur_p=[0,0]", "data.augment.solarize_p=[0,0]"],
     "data.global_crops.number"),
])
def test_bad_itpn_configs_are_refused(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert e.value.key == key, str(e.value)


def test_hivit_is_refused_by_the_vit_methods():
    with pytest.raises(ConfigError, match="methods that train a hivit: finetune, itpn"):
        load_config(None, ["model.arch=hivit_tiny"])


def test_export_file_rebuilds_strictly(tmp_path):
    torch.manual_seed(0)
    arch = {"arch": "hivit_test", "image_size": 32, "patch_size": 8, "fpn_dim": 16, "fpn_depth": 1,
            "pos_embed": "learned", "layer_scale": 0.1}
    model = build_itpn(arch).eval()
    path = save_itpn(model.state_dict(), arch, tmp_path / "itpn.safetensors", {"step": 7, "mean": [0.5] * 3})
    loaded, meta = load_itpn(path)
    assert meta["step"] == 7 and meta["itpn_arch"] == arch
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x)["patch"], loaded.forward_features(x)["patch"])
        assert all(torch.equal(a, b) for a, b in zip(model.forward_pyramid(x), loaded.forward_pyramid(x)))
    # a file whose tensors do not match its architecture record is refused, not patched up
    state = model.state_dict()
    state.pop("pyramid.split_8to4.reduction.weight")
    save_itpn(state, arch, tmp_path / "bad.safetensors")
    with pytest.raises(RuntimeError, match="split_8to4"):
        load_itpn(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not an iTPN export"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_itpn(tmp_path / "other.safetensors")


def test_init_is_the_references_everywhere():
    """iTPN's _init_weights over the whole model: linear weights trunc-normal 0.02, biases 0,
    LayerNorms 1 / 0, the pyramid included; the position table starts as MAE's sin-cos table."""
    from models.vit import sincos_pos_embed

    torch.manual_seed(0)
    model = build_itpn({"arch": "hivit_base", "image_size": 224, "patch_size": 16, "fpn_dim": 256, "fpn_depth": 2})
    for part in (model.backbone, model.pyramid):
        linears = [m for m in part.modules() if isinstance(m, torch.nn.Linear)]
        weights = torch.cat([m.weight.flatten() for m in linears])
        assert abs(weights.std().item() - 0.02) < 0.0015, type(part).__name__
        assert all(m.bias is None or not m.bias.any() for m in linears)
        norms = [m for m in part.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert norms and all((m.weight == 1).all() and not m.bias.any() for m in norms)
    assert torch.equal(model.backbone.absolute_pos_embed.data, sincos_pos_embed(512, (14, 14), num_prefix=0))


def test_attention_blocks_take_the_triton_kernel():
    """The main stage uses the ViT's swappable attention core: the Triton kernel (interpreter here)
    gives the reference's outputs and gradients on a HiViT with 64-wide heads."""
    from models.hivit import HiViT
    from models.kernels import get_attention
    from models.kernels.attention import attention_reference

    def build(fn):
        torch.manual_seed(0)
        return HiViT(img_size=64, patch_size=16, embed_dim=128, mlp_depth=1, depth=1, num_heads=2, attn_fn=fn)

    ref, tri = build(attention_reference), build(get_attention("triton"))
    assert tri.blocks[-1].attn.attn_fn is not attention_reference
    x = torch.randn(2, 3, 64, 64)
    keep = torch.tensor([[0, 3, 6, 9, 12, 15], [1, 2, 4, 8, 10, 11]])
    a, b = ref(x, keep), tri(x, keep)
    assert torch.allclose(a, b, atol=1e-4)
    a.square().sum().backward()
    b.square().sum().backward()
    qkv_ref, qkv_tri = ref.blocks[-1].attn.qkv.weight.grad, tri.blocks[-1].attn.qkv.weight.grad
    assert torch.allclose(qkv_ref, qkv_tri, atol=1e-4 * qkv_ref.abs().max().item())
