"""Fine-tuning's parts without a run: which labelled images, the training view, a pretrained backbone
fitted into the classifier (BEiT's shared relative position bias, other grids), the seeded mixing."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from data.labels import LabelError, balanced_subset, read_key_list
from data.transforms import ClassifyCrop, _posterize
from models.vit import build_vit
from trainer.methods.finetune import adapt, host_generators, resize_rel_table


def test_a_label_fraction_is_class_balanced_seeded_and_order_free():
    labels = {f"k{i:04d}": i % 7 for i in range(700)}
    chosen = balanced_subset(labels, 0.1, seed=3)
    assert len(chosen) == 70 and all(sum(labels[k] == c for k in chosen) == 10 for c in range(7))
    shuffled = dict(sorted(labels.items(), key=lambda kv: hash(kv[0]) % 97))
    assert balanced_subset(shuffled, 0.1, seed=3) == chosen  # not the shards' order
    assert balanced_subset(labels, 0.1, seed=4) != chosen
    assert len(balanced_subset({"a": 0, "b": 1, "c": 1}, 0.01, seed=0)) == 2  # at least one per class


def test_a_key_list_takes_imagenet_file_names_and_refuses_missing_ones(tmp_path):
    known = {"n01440764_10026": 0, "n01440764_10027": 0}
    listed = tmp_path / "1percent.txt"
    listed.write_text("# iBOT's list\nn01440764/n01440764_10026.JPEG\nn01440764_10027\n")
    assert read_key_list(listed, known) == ["n01440764_10026", "n01440764_10027"]
    listed.write_text("n01440764_99999.JPEG\n")
    with pytest.raises(LabelError, match="1 images that are not in the training shards, e.g. n01440764_99999"):
        read_key_list(listed, known)


def test_the_training_view_is_a_function_of_the_seed_and_leaves_the_global_generators_alone():
    crop = ClassifyCrop(32, (0.4, 1.0), flip_p=0.5)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    random.seed(1)
    np.random.seed(1)
    before = random.random(), np.random.rand()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(5)
    a = crop(img).global_crops[0]
    assert (random.random(), np.random.rand()) == before
    torch.manual_seed(5)
    assert torch.equal(crop(img).global_crops[0], a) and a.shape == (3, 32, 32) and a.dtype == torch.uint8
    torch.manual_seed(6)
    assert not torch.equal(crop(img).global_crops[0], a)
    # timm's "inc1" asks for 0 bits at magnitude 10: black, as older Pillow gave, not Pillow's ValueError
    assert _posterize(img, 0).getextrema() == ((0, 0), (0, 0), (0, 0))


def test_a_shared_relative_bias_goes_into_every_block_and_tables_follow_the_grid():
    beit = build_vit("vit_test", img_size=32, patch_size=8, rel_pos_bias="shared", qkv_bias="qv", pos_embed="none")
    with torch.no_grad():
        beit.rel_pos_bias.relative_position_bias_table.normal_()
    state = beit.state_dict()
    tuned = build_vit("vit_test", img_size=32, patch_size=8, rel_pos_bias="per_block", qkv_bias="qv",
                      pos_embed="none")
    fitted = adapt(state, tuned, pool="avg")
    table = state["rel_pos_bias.relative_position_bias_table"]
    assert all(torch.equal(fitted[f"blocks.{i}.attn.rel_pos.relative_position_bias_table"], table)
               for i in range(len(tuned.blocks)))
    assert not any(k.startswith(("norm.", "rel_pos_bias.")) for k in fitted)
    missing, unexpected = tuned.load_state_dict(fitted, strict=False)
    assert set(missing) <= {"norm.weight", "norm.bias"} and not unexpected
    # another grid (a 48-pixel crop: 6 x 6 patches): the offsets resized, the three [CLS] entries kept
    bigger = resize_rel_table(table, (6, 6))
    assert bigger.shape == (11 * 11 + 3, table.shape[1]) and torch.equal(bigger[-3:], table[-3:])
    assert resize_rel_table(table, (4, 4)) is table


def test_position_embeddings_are_resampled_for_another_crop():
    vit = build_vit("vit_test", img_size=32, patch_size=8)
    bigger = build_vit("vit_test", img_size=48, patch_size=8)
    fitted = adapt(vit.state_dict(), bigger, pool="cls")
    assert fitted["pos_embed"].shape == bigger.pos_embed.shape and "norm.weight" in fitted
    assert torch.equal(fitted["pos_embed"][:, 0], vit.pos_embed[:, 0].detach())  # [CLS]'s own kept


def test_mixing_draws_are_seeded_by_the_step_and_put_back():
    random.seed(0)
    np.random.seed(0)
    with host_generators(seed=1, step=5):
        a = random.random(), np.random.rand()
    after = random.random(), np.random.rand()
    random.seed(0)
    np.random.seed(0)
    assert (random.random(), np.random.rand()) == after
    with host_generators(seed=1, step=5):
        assert (random.random(), np.random.rand()) == a
    with host_generators(seed=1, step=6):
        assert (random.random(), np.random.rand()) != a


@pytest.mark.parametrize("model_type", ["vit", "dinov2", "beit"])
def test_a_transformers_directory_is_read_as_the_same_network(tmp_path, model_type):
    """finetune.init=<a transformers directory> (models/hf_names.py from_hf_state): a random ViTModel
    (with the pooler hub checkpoints have), Dinov2Model (layer-scale) or BeitModel (per-block relative
    bias, q/v biases, layer-scale) read into our ViT computes the same tokens."""
    import transformers

    from models.vit import vit_options
    from trainer.methods.finetune import init_record, read_init

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                  layer_norm_eps=1e-6, hidden_act="gelu")
    torch.manual_seed(0)
    if model_type == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(intermediate_size=64, **common))
    elif model_type == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(mlp_ratio=2, layerscale_value=0.5, **common))
    else:
        model = transformers.BeitModel(transformers.BeitConfig(
            intermediate_size=64, use_relative_position_bias=True, use_absolute_position_embeddings=False,
            layer_scale_init_value=0.5, use_mean_pooling=False, **common), add_pooling_layer=False)
    with torch.no_grad():  # no tensor at its init value: a zero bias or a unit norm would hide a swap
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(tmp_path / "hf")

    rec = init_record(str(tmp_path / "hf"))
    assert (rec["patch"], rec["width"], rec["depth"]) == (8, 32, 2)
    state = read_init(str(tmp_path / "hf"), "auto")
    options = vit_options(state)
    ours = build_vit("vit_test", img_size=32, patch_size=8, layer_scale=None if model_type == "vit" else 1.0,
                     **options)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert missing == ["mask_token"] and not unexpected, (missing, unexpected)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = model(pixel_values=x).last_hidden_state
        mine = ours.eval().forward_features(x)
    assert torch.allclose(mine["cls"], theirs[:, 0], atol=1e-5), (mine["cls"] - theirs[:, 0]).abs().max()
    assert torch.allclose(mine["patch"], theirs[:, 1:], atol=1e-5)
