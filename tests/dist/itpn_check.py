"""Run under torchrun with 2 ranks (ZeRO-3): iTPN with each teacher trains its loss terms; the EMA
teacher pairs the backbone only, is partitioned and updated without any collective. (Resuming
exactly, with either teacher: tests/dist/test_resume.py.)

argv: report.json, tiny CLIP file. For each teacher (ema, clip): 2 steps.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from common import collectives_during, finish
from trainer.config import load_config
from trainer.ds_config import build_ds_config
from trainer.engine import apply_schedule, build_engine, init_distributed

ROOT = Path(__file__).resolve().parents[2]


def batch(step: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    return {"global_crops": torch.randn(1, 4, 3, 32, 32, generator=g).bfloat16()}


def step(engine, ema, i: int, weights: dict) -> float:
    apply_schedule(engine.optimizer, {"lr": 1e-3, "weight_decay": 0.05, "last_layer_lr_factor": 1.0})
    out = engine(batch(i), {"step": i, "micro_step": i})
    loss = sum(w * out[k] for k, w in weights.items())
    engine.backward(loss)
    engine.step()
    if ema is not None:
        ema.update(0.99)
    return loss.item()


def run(teacher: str, clip_file: str) -> dict:
    cfg = load_config(ROOT / "configs" / "itpn_hivit_tiny.yaml", [
        "run.precision=bf16", "model.arch=hivit_test", "data.batch_size=4", f"itpn.teacher={teacher}",
        "itpn.fpn_dim=16", "itpn.decoder_dim=32", "itpn.decoder_depth=1", "itpn.decoder_heads=2", "itpn.mfm_dim=16",
        "itpn.mfm_heads=2", "teacher.clip.arch=clip_vit_tiny", f"teacher.clip.weights={clip_file}"])
    ds = build_ds_config("zero3.json", cfg, dist.get_world_size())
    engine, ema = build_engine(cfg, ds, seed=0)
    method = engine.module
    weights = method.loss_weights
    report = {"terms": sorted(weights)}
    if ema is not None:
        teachers = list(method.teacher.parameters())
        report["ema_pairs_backbone_only"] = all(n.startswith("backbone.") for n in ema.names)
        report["ema_partitioned"] = all(t.ds_tensor.numel() < t.ds_numel for t in teachers if t.ds_numel >= 2)
        report["ema_collectives"] = collectives_during(lambda: ema.update(0.99))
        report["teacher_is_cast_of_shadow"] = all(
            torch.equal(t.ds_tensor.data, sh.view_as(t.ds_tensor).to(t.ds_tensor.dtype))
            for t, sh in zip(ema.teachers, ema.shadow))
    else:
        report["frozen_in_optimizer"] = any(
            id(p) in {id(q) for g in engine.optimizer.param_groups for q in g["params"]}
            for p in method.clip_teacher.parameters())
    report["losses"] = [step(engine, ema, i, weights) for i in range(2)]
    return report


def main(report_path, clip_file):
    init_distributed()
    out = {"world": dist.get_world_size()}
    for teacher in ("ema", "clip"):
        out[teacher] = run(teacher, clip_file)
    if dist.get_rank() == 0:
        Path(report_path).write_text(json.dumps(out))
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
    finish()
