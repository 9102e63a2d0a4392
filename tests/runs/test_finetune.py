"""Fine-tuning (method finetune, issue 30) end to end on the digits: from a pretraining run, with a
class-balanced tenth of the labels, evaluated on the held-out split with its best checkpoint kept;
and each bad input stopped before anything is written."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import jpeg_bytes, main_in_process, make_shards, torchrun

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.arch=vit_test", "data.batch_size=8", "data.num_workers=0", "log.tensorboard=false",
        "log.pictures=false"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, digits_dirs) -> tuple[Path, Path]:
    """A 2-step iBOT run of the tiny test ViT on the digits (what is fine-tuned), and the data cache."""
    cache = Path(digits_dirs["train"]).parents[1]
    run = tmp_path_factory.mktemp("pretrain") / "run"
    code = main_in_process("--config", ROOT / "configs" / "ibot_vit_tiny.yaml", f"run.output_dir={run}",
                           f"data.cache_dir={cache}", "schedule.steps=2", "checkpoint.every_steps=2",
                           "eval.knn_at_end=false", "ibot.out_dim=64", "ibot.head_hidden_dim=32",
                           "ibot.head_bottleneck_dim=16", *TINY)
    assert code == 0
    return run, cache


def held_out_digits(cache: Path) -> list:
    """The 300 held-out digits as (PIL image, label), as the shards hold them."""
    from data.pipeline import decode, read_shard
    from data.shards import expand_shards

    seen = Counter()
    urls = expand_shards(str(cache / "digits-64" / "val"))
    samples = [decode(s, seen) for url in urls for s in read_shard(url, seen)]
    return [s for s in samples if s is not None]


def finetune(out: Path, cache: Path, *overrides: str) -> int:
    return main_in_process("--config", ROOT / "configs" / "finetune_vit_tiny.yaml", f"run.output_dir={out}",
                           f"data.cache_dir={cache}", *TINY, *overrides)


def test_finetune_from_a_run_with_a_tenth_of_the_labels(pretrained, tmp_path, capsys):
    run, cache = pretrained
    out = tmp_path / "ft"
    code = finetune(out, cache, f"finetune.init={run}", "finetune.label_fraction=0.1", "schedule.steps=6",
                    "optim.warmup_steps=2", "log.every_steps=1", "eval.knn_every_steps=2", "checkpoint.every_steps=1",
                    "checkpoint.keep=1")
    assert code == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss_ce" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4, 5, 6]
    assert all(0 < r["loss_ce"] < 10 and 0 <= r["train_top1"] <= 1 for r in losses), losses
    held = {r["step"]: r for r in rows if "top1" in r and "loss" not in r}
    assert {2, 4, 6} <= set(held) and all(0 <= r["top1"] <= r["top5"] <= 100 for r in held.values()), held
    summary = rows[-1]
    assert "top1_random_init" in summary and summary["best_top1"] == max(r["top1"] for r in held.values())

    # The labelled tenth: the same share of each class (digits: 10 classes of about 150), recorded.
    keys = (out / "labelled_keys.txt").read_text().split()
    from data.labels import check_labels
    from data.shards import expand_shards

    labels = check_labels(expand_shards(str(Path(cache) / "digits-64" / "train")), 10, "test")
    per_class = Counter(labels[k] for k in keys)
    assert sorted(per_class) == list(range(10)) and max(per_class.values()) - min(per_class.values()) <= 1
    assert 140 <= len(keys) <= 160

    # The best checkpoint survives checkpoint.keep=1 beside the newest, and is complete.
    best_tag, measure, value = (out / "checkpoints" / "best").read_text().split()
    assert measure == "top1" and float(value) == summary["best_top1"]
    assert best_tag == f"step{summary['best_top1_step']:08d}"
    assert (out / "checkpoints" / best_tag / "COMPLETE").is_file()
    kept = sorted(p.name for p in (out / "checkpoints").glob("step*"))
    assert kept == sorted({best_tag, "step00000006"}), kept

    # What it prints: top-1 beside the start, chance and the init's own kNN.
    assert f"fine-tuned top-1 (held-out split): {summary['top1']:.2f}%" in printed
    assert "chance 10.00%" in printed and f"init: {run}; its kNN" in printed

    # Exported (the newest and the best checkpoint), transformers' image-classification pipeline on the
    # held-out digits scores what the run measured (seen: equal to the image).
    from transformers import pipeline

    from export.convert import convert

    held_out = held_out_digits(cache)
    for source, measured in ((out, summary["top1"]), (out / "checkpoints" / "best", summary["best_top1"])):
        export = tmp_path / f"export_{source.name}"
        done = convert(source, export)
        assert done.hf_class == "ViTForImageClassification", done  # finetune.pool: cls on a plain ViT
        classify = pipeline("image-classification", model=str(export))
        predicted = [p[0]["label"] for p in classify([image for image, _ in held_out], top_k=1)]
        accuracy = 100 * sum(p == str(label) for p, (_, label) in zip(predicted, held_out)) / len(held_out)
        assert len(held_out) == 300 and abs(accuracy - measured) <= 0.5, (source, accuracy, measured)


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_the_init_is_the_pretrained_teacher(pretrained, pool):
    """The backbone starts as the run's EMA teacher (finetune.weights auto); under average pooling its
    final norm is replaced by a new fc_norm (BEiT, MAE), with [CLS] it is kept (iBOT); the head is
    scaled by 0.001."""
    run, cache = pretrained
    from trainer.config import load_config
    from trainer.methods import method_class
    from trainer.weights import read_backbone

    cfg = load_config(ROOT / "configs" / "finetune_vit_tiny.yaml", [f"finetune.init={run}", f"data.cache_dir={cache}",
                                                                     f"finetune.pool={pool}", *TINY])
    method = method_class("finetune").from_config(cfg)
    teacher = read_backbone(run, "teacher").state
    ours = method.student["backbone"].state_dict()
    if pool == "avg":
        assert not any(k.startswith("norm.") for k in ours) and "fc_norm" in method.student
    else:
        assert torch.equal(ours["norm.weight"], teacher["norm.weight"]) and "fc_norm" not in method.student
    for key in ("blocks.0.attn.qkv.weight", "pos_embed", "cls_token", "blocks.1.mlp.fc2.bias"):
        assert torch.equal(ours[key], teacher[key]), key
    student = read_backbone(run, "student").state
    assert not torch.equal(ours["blocks.0.attn.qkv.weight"], student["blocks.0.attn.qkv.weight"])
    assert 0.5 * 2e-5 < method.student["head"].weight.std().item() < 1.5 * 2e-5  # N(0, 0.02) x 0.001
    assert (method.student["head"].bias == 0).all()


def test_bad_input_stops_before_anything_is_written(pretrained, tmp_path, capsys):
    run, cache = pretrained
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    from data.shards import write_shard

    write_shard(unlabelled / "shard-0000.tar", [{"__key__": f"x{i}", "jpg": jpeg_bytes(i)} for i in range(4)])
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    make_shards(labelled, 1, 4, extra={0: [{"__key__": "seven", "jpg": jpeg_bytes(7), "cls": 7}]})
    missing = tmp_path / "list.txt"
    missing.write_text("n01440764_10026.JPEG\n")
    # a pretraining run of a method this version does not know
    unknown = tmp_path / "unknown_run"
    shutil.copytree(run, unknown)
    for part in (unknown / "checkpoints").glob("step*/rank*.pt"):
        state = torch.load(part, weights_only=True)
        state["config"] = json.dumps({**json.loads(state["config"]), "method": "mae"})
        torch.save(state, part)
    cases = [
        ([f"data.train_shards={unlabelled}"], "data.train_shards", "have no label"),
        (["finetune.num_classes=3", f"data.train_shards={labelled}"], "finetune.num_classes", "label 7 of seven"),
        ([f"finetune.label_list={missing}"], "finetune.label_list", "not in the training shards"),
        ([f"finetune.init={run}", "model.arch=vit_tiny"], "finetune.init", "this run's model is vit_tiny/8"),
        ([f"finetune.init={tmp_path / 'nowhere'}"], "finetune.init", "does not exist"),
        ([f"finetune.init={unknown}"], "finetune.init", "unknown method 'mae'"),
        (["finetune.auto_augment=rand-m9-mstd0.5-inc"], "finetune.auto_augment", "not a RandAugment policy"),
    ]
    for overrides, key, words in cases:
        out = tmp_path / "out"
        assert finetune(out, cache, *overrides) == 2, overrides
        printed = capsys.readouterr()
        said = printed.out + printed.err
        assert f"{key}:" in said and words in said, (overrides, said)
        assert len([line for line in said.splitlines() if "config error" in line]) == 1, said
        assert not out.exists(), overrides


def test_a_partitioned_build_starts_from_the_teacher_too(pretrained, tmp_path):
    """model.sharded_init (ViT-g/G): the pretrained tensors and the scaled head are written into the
    partitioned parameters (Classifier.partitioned_init_steps), as a whole build writes them."""
    run, cache = pretrained
    report = tmp_path / "report.json"
    torchrun(str(ROOT / "tests" / "dist" / "finetune_sharded_check.py"), str(run), str(cache), str(report))
    r = json.loads(report.read_text())
    assert r["partitioned"] and r["differ"] == [], r
    assert 0.5 * 2e-5 < r["head_std"] < 1.5 * 2e-5 and r["head_bias_zero"], r


def test_an_itpn_run_fine_tunes_its_hivit_without_the_pyramid(tmp_path, digits_dirs):
    """iTPN (seed 004): the classifier is HiViT alone (itpn_clip/modeling_finetune.py: the pyramid is for
    detection and segmentation), its mean token through fc_norm; it starts from the run's student."""
    cache = Path(digits_dirs["train"]).parents[1]
    run = tmp_path / "itpn"
    hivit = ["model.arch=hivit_test", "data.batch_size=8", "data.num_workers=0", "log.tensorboard=false",
             "log.pictures=false"]
    assert main_in_process("--config", ROOT / "configs" / "itpn_hivit_tiny.yaml", f"run.output_dir={run}",
                           f"data.cache_dir={cache}", "schedule.steps=2", "checkpoint.every_steps=2",
                           "eval.knn_at_end=false", *hivit) == 0
    out = tmp_path / "ft"
    code = main_in_process("--config", ROOT / "configs" / "finetune_vit_tiny.yaml", f"run.output_dir={out}",
                           f"data.cache_dir={cache}", f"finetune.init={run}", "finetune.pool=avg", "schedule.steps=3",
                           "optim.warmup_steps=1", "log.every_steps=1", *hivit)
    assert code == 0
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= summary["top1"] <= 100 and "top1_random_init" in summary

    from trainer.config import load_config
    from trainer.methods import method_class
    from trainer.weights import read_backbone

    cfg = load_config(ROOT / "configs" / "finetune_vit_tiny.yaml", [f"finetune.init={run}", f"data.cache_dir={cache}",
                                                                     "finetune.pool=avg", *hivit])
    method = method_class("finetune").from_config(cfg)
    ours = method.student["backbone"].state_dict()
    student = read_backbone(run, "student").state
    assert not any(k.startswith("pyramid.") for k in ours)
    for key in ("absolute_pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.4.attn.qkv.weight"):
        assert torch.equal(ours[key], student[f"backbone.{key}"]), key
    # iTPN's exported file (backbone + pyramid) is an init too: the same backbone
    from export.convert import ITPN_FILE, convert

    convert(run, tmp_path / "itpn_export")
    init = tmp_path / "itpn_export" / ITPN_FILE
    cfg = load_config(ROOT / "configs" / "finetune_vit_tiny.yaml", [f"finetune.init={init}", f"data.cache_dir={cache}",
                                                                     "finetune.pool=avg", *hivit])
    from_file = method_class("finetune").from_config(cfg).student["backbone"].state_dict()
    assert all(torch.equal(from_file[k], v) for k, v in ours.items()), "the iTPN file's backbone differs"

    # Exported as one file (transformers has no HiViT), it scores the run's own held-out top-1.
    from data.pipeline import labelled_batches
    from data.shards import expand_shards
    from data.transforms import normalize
    from export.itpn import CLASSIFIER_FILE, load_hivit_classifier

    convert(out, tmp_path / "export")
    model, meta = load_hivit_classifier(tmp_path / "export" / CLASSIFIER_FILE)
    hits = 0
    for images, labels in labelled_batches(expand_shards(str(cache / "digits-64" / "val")), 32, 100):
        with torch.no_grad():
            logits = model(normalize(images, meta["mean"], meta["std"], torch.float32))
        hits += (logits.argmax(-1) == labels).sum().item()
    assert abs(100 * hits / 300 - summary["top1"]) <= 0.5 and meta["labels"] == [str(i) for i in range(10)]

    # A ViT run cannot start from it (nor the other way round): one line, before the run
    assert main_in_process("--config", ROOT / "configs" / "finetune_vit_tiny.yaml", f"run.output_dir={tmp_path / 'x'}",
                           f"data.cache_dir={cache}", f"finetune.init={run}", *TINY) == 2
    assert not (tmp_path / "x").exists()
    # HiViT has no [CLS]: the other head input stops before the run
    with pytest.raises(Exception, match="no \\[CLS\\] token"):
        load_config(ROOT / "configs" / "finetune_vit_tiny.yaml", ["finetune.pool=cls", *hivit])


def test_a_moving_average_of_the_classifier_is_evaluated_and_exported(pretrained, tmp_path, capsys):
    """finetune.model_ema (BEiT's --model_ema): the engine's shard-local EMA keeps the whole classifier's
    average, evaluated beside it; convert_to_hf.py --weights teacher exports it and scores its figure."""
    run, cache = pretrained
    out = tmp_path / "ft"
    # (and the held-out images resized to 36 before the 32-pixel centre crop, as BEiT's --crop_pct 0.875:
    # the exported image processor does the same, or the pipeline would not score the run's figure)
    assert finetune(out, cache, f"finetune.init={run}", "finetune.model_ema=true", "finetune.model_ema_decay=0.5",
                    "schedule.steps=3", "optim.warmup_steps=1", "eval.knn_every_steps=0",
                    "finetune.eval_crop_pct=0.875") == 0
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= summary["top1_ema"] <= summary["top5_ema"] <= 100
    assert f"top-1 {summary['top1_ema']:.2f}%" in capsys.readouterr().out

    from transformers import pipeline

    from export.convert import convert
    from trainer.weights import read_backbone

    ema, student = read_backbone(out, "teacher").state, read_backbone(out, "student").state
    assert ema.keys() == student.keys() and "head.weight" in ema
    assert not torch.equal(ema["head.weight"], student["head.weight"])  # an average, not a copy
    done = convert(out, tmp_path / "export", weights="teacher")
    assert json.loads((done.out / "preprocessor_config.json").read_text())["size"] == {"shortest_edge": 36}
    classify = pipeline("image-classification", model=str(done.out))
    held_out = held_out_digits(cache)
    predicted = [p[0]["label"] for p in classify([image for image, _ in held_out], top_k=1)]
    accuracy = 100 * sum(p == str(label) for p, (_, label) in zip(predicted, held_out)) / len(held_out)
    assert abs(accuracy - summary["top1_ema"]) <= 0.5, (accuracy, summary)
