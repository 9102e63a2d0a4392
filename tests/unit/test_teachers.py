"""Frozen teachers: open_clip files through the real loading path, DINO state dicts, clear errors."""

from pathlib import Path

import pytest
import timm
import torch

from models.teachers import FrozenTeacher, TeacherWeightsError, load_teacher_weights, save_clip, tiny_clip
from trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def clip_model():
    return tiny_clip(seed=3).eval()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_open_clip_file_loads_and_matches_open_clip(tmp_path, clip_model, suffix):
    path = save_clip(clip_model, tmp_path / f"clip{suffix}")
    teacher = FrozenTeacher("clip_vit_tiny")
    sha = load_teacher_weights(teacher, path)
    assert len(sha) == 64 and teacher.weights_sha256 == sha
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = teacher.vit.forward_features(x)[:, 0] @ clip_model.visual.proj  # ln_post([CLS]) @ proj
        ref = clip_model.visual(x)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training  # always eval (DeepSpeed #4922)


def test_per_block_features_and_cls_attention_match_open_clip(tmp_path, clip_model):
    teacher = FrozenTeacher("clip_vit_tiny")
    load_teacher_weights(teacher, save_clip(clip_model, tmp_path / "clip.safetensors"))
    visual = clip_model.visual
    captured = {}
    blocks = visual.transformer.resblocks
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o)) for k, b in enumerate(blocks)]
    hooks.append(blocks[-1].register_forward_pre_hook(lambda m, i: captured.__setitem__("last_in", i[0])))
    images = torch.randn(2, 3, 32, 32)
    # the teacher receives student-normalised images and re-normalises them with CLIP's statistics
    student_view = (images * torch.tensor(teacher.std).view(1, 3, 1, 1) + torch.tensor(teacher.mean).view(1, 3, 1, 1)
                    - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        visual(images)
        out = teacher(student_view, (4, 4), MEAN, STD, blocks=[0, -1], attention=True)
    for h in hooks:
        h.remove()
    batch_first = getattr(visual.transformer, "batch_first", True)
    as_bnc = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    torch.testing.assert_close(out["blocks"][0], as_bnc(captured[0])[:, 1:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["blocks"][1], as_bnc(captured[len(blocks) - 1])[:, 1:], atol=1e-4, rtol=1e-4)
    y = blocks[-1].ln_1(as_bnc(captured["last_in"]))
    _, weights = blocks[-1].attn(y, y, y, need_weights=True, average_attn_weights=True)  # nn.MultiheadAttention
    torch.testing.assert_close(out["cls_attn"], weights[:, 0, 1:], atol=1e-5, rtol=1e-4)


def test_teacher_resizes_to_the_student_grid(tmp_path, clip_model):
    teacher = FrozenTeacher("clip_vit_tiny")
    load_teacher_weights(teacher, save_clip(clip_model, tmp_path / "clip.pt"))
    out = teacher(torch.randn(2, 3, 48, 48), (3, 3), MEAN, STD, blocks=[-1], attention=True)
    assert out["blocks"][0].shape == (2, 9, 64) and out["cls_attn"].shape == (2, 9)


def test_wrong_architecture_names_path_arch_and_keys(tmp_path):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    wider = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=3, width=32, head_width=16, patch_size=8, image_size=32),
                 text_cfg=CLIPTextCfg(context_length=8, vocab_size=100, width=16, heads=2, layers=1))
    path = save_clip(wider, tmp_path / "other.pt")
    with pytest.raises(TeacherWeightsError) as e:
        load_teacher_weights(FrozenTeacher("clip_vit_tiny"), path)
    msg = str(e.value)
    assert str(path) in msg and "clip_vit_tiny" in msg
    assert "missing: vit.blocks.3." in msg and "shape" in msg


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherWeightsError, match="cannot read"):
        load_teacher_weights(FrozenTeacher("clip_vit_tiny"), bad)
    with pytest.raises(TeacherWeightsError, match="not found"):
        load_teacher_weights(FrozenTeacher("clip_vit_tiny"), tmp_path / "absent.pt")


def test_dino_checkpoint_as_frozen_teacher(tmp_path):
    """A DINO training checkpoint ({"teacher": {"backbone.*", "head.*"}}) of a ViT-S/16."""
    dino = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    state = {"teacher": {**{f"backbone.{k}": v for k, v in dino.state_dict().items()},
                         "head.mlp.0.weight": torch.zeros(4, 384)}}
    torch.save(state, tmp_path / "dino.pth")
    teacher = FrozenTeacher("vit_small_patch16_224.dino", antialias=True)  # timm's own resampling
    load_teacher_weights(teacher, tmp_path / "dino.pth")
    assert teacher.mean == MEAN  # the .dino tag's ImageNet statistics
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = dino.forward_intermediates(x, indices=[11], output_fmt="NLC", intermediates_only=True)[0]
        torch.testing.assert_close(teacher(x, (4, 4), MEAN, STD, [-1])["blocks"][0], ref, atol=1e-4, rtol=1e-4)
        # the default, as MaskAlign's resize_pos_embed: bicubic to the new grid, no antialias
        plain = FrozenTeacher("vit_small_patch16_224.dino")
        load_teacher_weights(plain, tmp_path / "dino.pth")
        pos = dino.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
        pos = torch.nn.functional.interpolate(pos, (4, 4), mode="bicubic", align_corners=False)
        dino.pos_embed.data = torch.cat([dino.pos_embed[:, :1], pos.permute(0, 2, 3, 1).reshape(1, 16, -1)], 1)
        dino.patch_embed.img_size, dino.patch_embed.grid_size = (64, 64), (4, 4)
        ref = dino.forward_intermediates(x, indices=[11], output_fmt="NLC", intermediates_only=True)[0]
        torch.testing.assert_close(plain(x, (4, 4), MEAN, STD, [-1])["blocks"][0], ref, atol=1e-4, rtol=1e-4)

    small = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=2, patch_size=8)
    torch.save(small.state_dict(), tmp_path / "small.pth")
    with pytest.raises(TeacherWeightsError, match=r"depth 12.*missing: vit\.blocks\.2\."):
        load_teacher_weights(FrozenTeacher("vit_small_patch16_224.dino"), tmp_path / "small.pth")


def test_config_refuses_a_missing_teacher_file_before_training(tmp_path):
    with pytest.raises(ConfigError, match="teacher.clip.weights.*needs a local weights file"):
        load_config(ROOT / "configs" / "maskalign_vit_tiny.yaml", ["teacher.clip.weights=null"])
    with pytest.raises(ConfigError, match="file not found; make one with: python scripts/make_tiny_clip.py"):
        load_config(ROOT / "configs" / "maskalign_vit_tiny.yaml", [f"teacher.clip.weights={tmp_path}/x.pt"])
    path = save_clip(tiny_clip(), tmp_path / "c.pt")
    with pytest.raises(ConfigError, match="teacher.clip.blocks: block 4 does not exist"):
        load_config(ROOT / "configs" / "maskalign_vit_tiny.yaml", [f"teacher.clip.weights={path}",
                                                                    "teacher.clip.blocks=[0,4]"])
    with pytest.raises(ConfigError, match="teacher.clip.arch"):
        load_config(ROOT / "configs" / "ibot_clip_vit_tiny.yaml", [f"teacher.clip.weights={path}",
                                                                   "teacher.clip.arch=ViT-X-99"])
    with pytest.raises(ConfigError, match="local_crops.number"):
        load_config(ROOT / "configs" / "maskalign_vit_tiny.yaml", [f"teacher.clip.weights={path}",
                                                                    "data.local_crops.number=2"])
    cfg = load_config(ROOT / "configs" / "maskalign_vit_tiny.yaml", [f"teacher.clip.weights={path}"])
    assert cfg.method == "maskalign"


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-B-16-quickgelu", "ViT-L-14", "ViT-L-14-quickgelu", "ViT-H-14",
                                  "ViT-g-14"])
def test_open_clip_names_match_open_clip_towers(name):
    """Every open_clip name builds a tower whose converted open_clip state dict fits key for key and
    shape for shape, with the same activation and normalisation (checked on the meta device)."""
    import open_clip
    from open_clip.model import _build_vision_tower
    from timm.models.vision_transformer import checkpoint_filter_fn

    from models.teachers import build_teacher_vit

    cfg = open_clip.get_model_config(name)
    with torch.device("meta"):
        tower = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
        ours = build_teacher_vit(name)
    converted = checkpoint_filter_fn({f"visual.{k}": v for k, v in tower.state_dict().items()}, ours)
    assert {k: v.shape for k, v in converted.items() if not k.startswith("head.")} == \
        {k: v.shape for k, v in ours.state_dict().items()}
    assert type(tower.transformer.resblocks[0].mlp.gelu).__name__ == type(ours.blocks[0].mlp.act).__name__
    with torch.device("meta"):
        teacher = FrozenTeacher(name)
    assert teacher.mean == tuple(open_clip.OPENAI_DATASET_MEAN) and teacher.std == tuple(open_clip.OPENAI_DATASET_STD)
