"""A fine-tuned classifier exported (export/classifier.py): for each head input and backbone kind, the
transformers class that computes the same logits, and timm's model with its head; checked by the
converter itself against our network (a wrong mapping gives errors of order 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

CASES = {  # name: (finetune.pool, build_vit options, the transformers class)
    "cls": ("cls", {}, "ViTForImageClassification"),
    "cls, layer-scale": ("cls", {"layer_scale": 0.1}, "Dinov2ForImageClassification"),
    "avg": ("avg", {}, "BeitForImageClassification"),
    "avg, BEiT backbone": ("avg", {"layer_scale": 0.1, "rel_pos_bias": "per_block", "qkv_bias": "qv",
                                   "pos_embed": "none"}, "BeitForImageClassification"),
    "cls, BEiT backbone": ("cls", {"rel_pos_bias": "per_block", "qkv_bias": "qv"}, "BeitForImageClassification"),
}


def fine_tuned(tmp_path: Path, pool: str, options: dict, classes: int = 5):
    """A `Backbone` as read_backbone returns a finetune checkpoint: backbone.*, fc_norm.*, head.*, random."""
    from models.vit import build_vit
    from trainer.config import load_config, to_dict
    from trainer.config.fields import files_unchecked
    from trainer.methods.finetune import Classifier
    from trainer.weights import Backbone

    with files_unchecked():  # (the digits' shards are not read)
        cfg = load_config(ROOT / "configs" / "finetune_vit_tiny.yaml", ["model.arch=vit_test", "model.patch_size=8",
                                                                        f"finetune.pool={pool}",
                                                                        f"finetune.num_classes={classes}"])
    torch.manual_seed(0)
    net = Classifier(build_vit("vit_test", img_size=32, patch_size=8, **options), classes, pool, 1.0, None)
    with torch.no_grad():  # nothing at its init value: ones, zeros or a 0.001-scaled head would hide a swap
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    ckpt = tmp_path / "run" / "checkpoints" / "step00000003"
    return Backbone(state=state, config=to_dict(cfg), which="student", checkpoint=ckpt, step=3, world_size=1,
                    summary={"top1": 40.0, "held_out_step": 3, "top1_random_init": 20.0})


@pytest.mark.parametrize("case", list(CASES))
def test_the_exported_classifier_computes_our_logits(tmp_path, case):
    import timm  # noqa: F401  (the printed snippet is run below)

    from export.convert import convert_classifier

    pool, options, hf_class = CASES[case]
    b = fine_tuned(tmp_path, pool, options)
    labels = ["zero", "one", "two", "three", "four"]
    done = convert_classifier(b, tmp_path / "out", "fp32", True, "a test", labels)
    assert done.hf_class == hf_class
    assert set(done.errors) == {"transformers", "timm"} and max(done.errors.values()) < 1e-4, done.errors

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.id2label == dict(enumerate(labels)) and config.mimscale["top1"] == 40.0
    # The timm line the converter prints loads the file strictly, head included.
    line = done.lines[1].split(": ", 1)[1]
    model = eval(line)
    assert model.num_classes == 5
    card = (tmp_path / "out" / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "40.00%" in card


def test_a_wrong_label_file_stops_the_export(tmp_path):
    from export.classifier import read_labels
    from export.convert import convert_classifier
    from trainer.weights import ExportError

    b = fine_tuned(tmp_path, "cls", {})
    with pytest.raises(ExportError, match="names 2 classes, the head has 5"):
        convert_classifier(b, tmp_path / "out", "fp32", True, "a test", ["a", "b"])
    assert not (tmp_path / "out").exists()
    (tmp_path / "labels.txt").write_text("a\n\nb\n")
    with pytest.raises(ExportError, match="none blank"):
        read_labels(tmp_path / "labels.txt")
    with pytest.raises(ExportError, match="--labels"):
        read_labels(tmp_path / "missing.txt")
