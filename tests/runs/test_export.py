"""The conversion (export/convert.py, scripts/convert_to_hf.py's one call) and scripts/evaluate.py on real
checkpoints of 2-rank runs (ZeRO-3 and ZeRO-2)."""

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_ibot_cmd, torchrun

from export import convert as hf_convert
from trainer.weights import ExportError

pytestmark = pytest.mark.slow


def evaluate(*args: str) -> str:
    """scripts/evaluate.py on one process -> what it printed."""
    import subprocess

    p = subprocess.run([sys.executable, "scripts/evaluate.py", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def layer_scale_run(tmp_path_factory) -> Path:
    """Layer-scale ViT (large gammas, so the blocks matter to the check), ZeRO-2, bf16, 2 ranks."""
    run = tmp_path_factory.mktemp("ls") / "run"
    torchrun(*tiny_ibot_cmd(run, 3, ["--ds_config", "zero2.json", "run.precision=bf16", "model.layer_scale=0.5"]))
    return run


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO)


@pytest.mark.parametrize("weights", ["teacher", "student"])
def test_ibot_zero3_checkpoint_converts_to_transformers_and_timm(ibot_two_rank_run, tmp_path, caplog, weights):
    from transformers import AutoModel, AutoModelForImageClassification

    from export.backbones import from_backbone, load_backbone
    from trainer.weights import read_backbone

    out = tmp_path / "hf"
    done = hf_convert.convert(ibot_two_rank_run, out, weights)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                    "preprocessor_config.json", "timm_model.safetensors"]
    assert done.hf_class == "ViTModel" and done.timm_name == "vit_small_patch16_224"
    assert "timm.create_model('vit_small_patch16_224', pretrained=True" in done.lines[1]  # what the script prints

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["ViTModel"] and config["mimscale"]["method"] == "ibot"
    assert config["layer_norm_eps"] == 1e-6 and config["image_size"] == 32 and config["patch_size"] == 8
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == [0.485, 0.456, 0.406] and pre["crop_size"] == {"height": 32, "width": 32}

    ours = from_backbone(read_backbone(ibot_two_rank_run, weights))
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "ViTModel"
    # ViTModel builds no [MASK] embedding unless asked: the file's is then unused, and the pooler new.
    assert set(info["unexpected_keys"]) == {"embeddings.mask_token"}, info
    assert sorted(info["missing_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"], info
    model = AutoModel.from_pretrained(out, use_mask_token=True)
    hf = {k: v for k, v in model.state_dict().items()}
    torch.testing.assert_close(hf["embeddings.mask_token"].flatten(), ours.model.mask_token.flatten())
    qkv = ours.model.blocks[1].attn.qkv.weight
    q = next(v for k, v in hf.items() if k.endswith("1.attention.q_proj.weight") or k.endswith("1.attention.attention"
                                                                                             ".query.weight"))
    assert torch.equal(q, qkv[:32])

    classifier, info = AutoModelForImageClassification.from_pretrained(out, num_labels=7, output_loading_info=True)
    assert classifier.config.num_labels == 7
    assert info["missing_keys"] and all(k.startswith("classifier.") for k in info["missing_keys"]), info
    assert [k for k in info["unexpected_keys"] if "mask_token" not in k] == [], info

    from safetensors import safe_open

    with safe_open(str(out / "timm_model.safetensors"), "pt") as f:
        assert "mask_token" not in f.keys() and "pos_embed" in f.keys()

    # Features on real photos: ours, transformers, timm (the script's own check, repeated here).
    x = hf_convert.sample_photos(32, out)
    ref = ours.features(x)
    for path in (out, out / "timm_model.safetensors"):
        got = load_backbone(path).features(x)
        for part in ("cls", "patch"):
            assert hf_convert.relative_error(ref[part], got[part]) <= 1e-4, (path, part)

    card = (out / "README.md").read_text()
    assert f"**{weights}** backbone" in card and "6 steps x global batch 16 (2 ranks) = 96" in card
    assert "launch.py --config" in card and "kNN top-1" in card and "student.head" in card
    left = [line for line in caplog.messages if "left out (pretraining only)" in line]
    assert len(left) == 1 and "student.head" in left[0] and "center" in left[0]


def test_teacher_is_the_default_and_differs_from_the_student(ibot_two_rank_run):
    from trainer.weights import read_backbone

    teacher, student = read_backbone(ibot_two_rank_run), read_backbone(ibot_two_rank_run, "student")
    assert teacher.which == "teacher" and teacher.state.keys() == student.state.keys()
    assert not torch.equal(teacher.state["blocks.0.attn.qkv.weight"], student.state["blocks.0.attn.qkv.weight"])


def test_layer_scale_zero2_checkpoint_becomes_dinov2_in_bf16(layer_scale_run, tmp_path, caplog):
    from transformers import AutoModel, AutoModelForImageClassification

    from trainer.weights import read_backbone

    out = tmp_path / "hf"
    done = hf_convert.convert(layer_scale_run, out, dtype="bf16")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Dinov2Model"] and config["dtype"] == "bfloat16"
    assert config["image_size"] == 32 and config["patch_size"] == 8
    model = AutoModel.from_pretrained(out)
    state = model.state_dict()
    gamma = read_backbone(layer_scale_run).state["blocks.1.ls2.gamma"]
    assert torch.equal(state["encoder.layer.1.layer_scale2.lambda1"].float(), gamma.bfloat16().float())
    _, info = AutoModelForImageClassification.from_pretrained(out, num_labels=3, output_loading_info=True)
    assert all(k.startswith("classifier.") for k in info["missing_keys"]) and not info["unexpected_keys"]
    assert len(done.errors) == 4 and max(done.errors.values()) <= hf_convert.TOLERANCE["bf16"], done.errors
    assert any("check: transformers_cls" in line for line in caplog.messages)  # and logged
    assert "layer-scale" in (out / "README.md").read_text()

    # The student of a ZeRO-2 checkpoint (DeepSpeed's stage-2 layout, both ranks' partitions), fp32, checked.
    hf_convert.convert(layer_scale_run, tmp_path / "student", "student")
    student = read_backbone(layer_scale_run, "student").state["blocks.1.ls2.gamma"]
    got = AutoModel.from_pretrained(tmp_path / "student").state_dict()["encoder.layer.1.layer_scale2.lambda1"]
    assert torch.equal(got, student) and not torch.equal(student, gamma)


def test_layer_scale_with_an_mlp_dinov2_cannot_hold_is_folded_into_a_vit(tmp_path):
    # ViT-g/14's MLP is 6144 / 1408 of its width; transformers' Dinov2Config takes whole ratios only.
    from transformers import AutoModel

    from export.hf import save_hf, save_processor
    from models.vit import VisionTransformer
    from trainer.weights import Backbone

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.5,
                            layer_scale=0.5).eval()
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.2, 2.0)
    config = {"method": "ibot", "model": {"arch": "vit_test"}, "data": {"augment": {"mean": [0.5] * 3,
                                                                                   "std": [0.25] * 3}}}
    b = Backbone(state=dict(vit.state_dict()), config=config, which="teacher", checkpoint=tmp_path, step=1,
                 world_size=1)
    assert save_hf(b, tmp_path / "hf", torch.float32).__name__ == "ViTModel"
    save_processor(b, tmp_path / "hf")
    x = hf_convert.sample_photos(32, tmp_path / "hf")
    hf = AutoModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False)
    with torch.no_grad():
        ours = vit.forward_features(x)
        theirs = hf(pixel_values=x).last_hidden_state
    assert hf_convert.relative_error(ours["cls"], theirs[:, 0]) < 1e-5
    assert hf_convert.relative_error(ours["patch"], theirs[:, 1:]) < 1e-5


def test_check_fails_on_a_wrong_mapping(ibot_two_rank_run, tmp_path, monkeypatch):
    import export.hf

    real = export.hf.to_hf_state

    def swapped(*args, **kwargs):  # q and k of every block exchanged: loads strictly, computes wrong
        out = real(*args, **kwargs)
        for k in [k for k in out if k.endswith("q_proj.weight") or k.endswith("query.weight")]:
            other = k.replace("q_proj", "k_proj").replace("query", "key")
            out[k], out[other] = out[other], out[k]
        return out

    monkeypatch.setattr(export.hf, "to_hf_state", swapped)
    with pytest.raises(ExportError, match="check failed.*transformers_cls"):
        hf_convert.convert(ibot_two_rank_run, tmp_path / "hf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_bad_inputs_stop_with_one_line_and_write_nothing(ibot_two_rank_run, tmp_path):
    tag = ibot_two_rank_run / "checkpoints" / "step00000006"
    out = tmp_path / "out"

    def fails(source, expect: str, **options) -> None:
        with pytest.raises(ExportError) as e:
            hf_convert.convert(source, out, **options)
        assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)[-2000:]
        assert not out.exists() and not list(tmp_path.glob(".out.partial*"))

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, "is not a mimscale checkpoint")
    incomplete = tmp_path / "ckpts" / "step00000006"
    shutil.copytree(tag, incomplete)
    (incomplete / "COMPLETE").unlink()
    fails(incomplete, "incomplete checkpoint")
    poisoned = tmp_path / "poisoned" / "step00000006"
    shutil.copytree(tag, poisoned)

    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))

    torch.save({"x": Payload()}, poisoned / "rank00001.pt")
    fails(poisoned, "not a plain tensor file")
    unknown = tmp_path / "unknown" / "step00000006"
    shutil.copytree(tag, unknown)
    parts = torch.load(unknown / "rank00000.pt", weights_only=True)
    config = json.loads(parts["config"])
    config["model"]["arch"] = "vit_colossal"
    parts["config"] = json.dumps(config)
    torch.save(parts, unknown / "rank00000.pt")
    fails(unknown, "unknown architecture 'vit_colossal'")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists; pass --overwrite"):
        hf_convert.convert(tag, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="exists and is not a directory"):
        hf_convert.convert(tag, out / "keep.txt", overwrite=True)
    missing = tmp_path / "missing" / "step00000006"  # complete-looking, but one rank's optimizer shard is gone
    shutil.copytree(tag, missing)
    next(missing.glob("*rank_1*optim_states.pt")).unlink()
    with pytest.raises(ExportError) as e:
        hf_convert.convert(missing, tmp_path / "out2", "student")
    assert str(e.value).startswith(f"cannot read {missing}"), str(e.value)[-2000:]
    assert not (tmp_path / "out2").exists()


def test_evaluating_the_export_gives_the_run_directorys_numbers(ibot_two_rank_run, tmp_path, digits_dirs):
    out = tmp_path / "hf"
    assert hf_convert.convert(ibot_two_rank_run, out, check_export=False).errors == {}
    data = ["--train", str(digits_dirs["train"]), "--val", str(digits_dirs["val"])]
    results = []
    for source, sink in ((ibot_two_rank_run, ibot_two_rank_run / "metrics.jsonl"),
                         (out, out / "eval_results.jsonl"), (out / "timm_model.safetensors", out /
                                                             "eval_results.jsonl")):
        printed = evaluate("knn", str(source), *data)
        assert "kNN k=20 T=0.07" in printed and f"appended to {sink}" in printed
        record = json.loads(sink.read_text().splitlines()[-1])
        results.append({k: v for k, v in record.items() if k.startswith("knn_")})
        assert record["step"] == 6
    assert results[0] == results[1] == results[2] and len(results[0]) == 8  # 4 ks x top-1/top-5


def test_two_rank_evaluation_equals_one_rank(ibot_two_rank_run, tmp_path, digits_dirs):
    data = ["--train", str(digits_dirs["train"]), "--val", str(digits_dirs["val"])]
    torchrun(str(ROOT / "scripts" / "evaluate.py"), "knn", str(ibot_two_rank_run), *data, "--pool", "cls+avg")
    two = json.loads((ibot_two_rank_run / "metrics.jsonl").read_text().splitlines()[-1])
    evaluate("knn", str(ibot_two_rank_run), *data, "--pool", "cls+avg")
    one = json.loads((ibot_two_rank_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert two["features"] == one["features"] == "[CLS] + mean patch token"
    knn = [{k: v for k, v in r.items() if k.startswith("knn")} for r in (two, one)]
    assert knn[0] == knn[1] and len(knn[0]) == 8


def test_dinov2_protocols_read_the_same_blocks_from_every_kind(ibot_two_rank_run, tmp_path, digits_dirs):
    """DINOv2's linear grid reads the last blocks' tokens through the final norm: the run, its
    transformers export and its timm file give the same ones; both DINOv2 protocols run from the
    command line and append their figures."""
    from export.backbones import load_backbone

    out = tmp_path / "hf"
    hf_convert.convert(ibot_two_rank_run, out, check_export=False)
    kinds = [load_backbone(p) for p in (ibot_two_rank_run, out, out / "timm_model.safetensors")]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = [b.block_tokens(x, 2) for b in kinds]
    for other in tokens[1:]:
        for (c, p), (oc, op) in zip(tokens[0], other):
            assert torch.allclose(c, oc, atol=1e-5) and torch.allclose(p, op, atol=1e-5)
    assert not torch.allclose(tokens[0][0][0], tokens[0][1][0])  # two different blocks
    with pytest.raises(ValueError, match="last 3 blocks of a 2-block"):
        kinds[0].block_tokens(x, 3)

    data = ["--train", str(digits_dirs["train"]), "--val", str(digits_dirs["val"])]
    printed = evaluate("linear-grid", str(ibot_two_rank_run), *data, "--epochs", "1", "--views", "1")
    assert "linear grid: last" in printed and "DINOv2's choice, best on val" in printed
    grid = json.loads((ibot_two_rank_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert grid["eval"] == "linear-grid" and grid["linear_grid_blocks"] in (1, 2)
    assert 0 <= grid["linear_grid_top1"] <= 100
    printed = evaluate("logreg", str(ibot_two_rank_run), *data, "--max-iter", "30")
    assert "logistic regression (C" in printed
    logreg = json.loads((ibot_two_rank_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert logreg["eval"] == "logreg" and 0 <= logreg["logreg_top1"] <= 100 and logreg["logreg_C"] > 0
