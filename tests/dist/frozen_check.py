"""Run under torchrun with 2 ranks (ZeRO-3, sharded construction): every frozen network of a method
(`frozen_files`: iBOT + CLIP's CLIP tower, BEiT's tokenizer) is partitioned, holds its file's weights,
never changes, has no gradients, stays in eval mode and out of the optimizer, while the method trains 3
steps on the digits through the loop's own pieces; then a checkpoint is saved (tests/dist/test_frozen.py
checks that it holds none of them). With an EMA teacher, rank 0 also writes the gathered teacher
backbone beside the report (`teacher_backbone.pt`): the export must rebuild it from the shadow slices.

argv: report.json, checkpoint directory, config, overrides...
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from common import finish, gathered
from data.digits import resolve_builtin
from data.pipeline import build_train_loader
from data.transforms import normalize_batch
from trainer.config import load_config
from trainer.ds_config import build_ds_config
from trainer.engine import apply_schedule, build_engine, init_distributed
from trainer.methods import frozen_files
from trainer.resume import client_state
from trainer.schedules import Schedules
from trainer.checkpoint import Checkpointer


def main(report_path, ckpt_dir, config, *overrides):
    init_distributed()
    cfg = load_config(config, ["model.sharded_init=true", "data.num_workers=0", *overrides])
    d = cfg.data
    d.train_shards, d.val_shards = resolve_builtin(d.train_shards, d.val_shards, d.cache_dir)
    engine, ema = build_engine(cfg, build_ds_config("zero3.json", cfg, dist.get_world_size()), seed=0)
    method = engine.module
    frozen = {name: getattr(method, name) for name in frozen_files(cfg)}
    report = {"world": dist.get_world_size(), "frozen": {}}
    before = {}
    for name, net in frozen.items():
        params = list(net.parameters())
        before[name] = gathered(net)
        from_file = net.read_weights(frozen_files(cfg)[name])
        report["frozen"][name] = {
            "local_fraction": sum(p.ds_tensor.numel() for p in params) / sum(p.ds_numel for p in params),
            "matches_file": before[name].keys() == from_file.keys() and all(
                torch.equal(before[name][k], from_file[k].to(before[name][k].dtype)) for k in from_file)}

    loader = build_train_loader(d, patch_size=cfg.model.patch_size, seed=0, rank=dist.get_rank(),
                                world_size=dist.get_world_size())
    schedules, batches = Schedules.from_config(cfg, type(method)), iter(loader)
    losses = []
    for step in range(3):
        values = schedules.at(step)
        apply_schedule(engine.optimizer, values)
        out = engine(normalize_batch(next(batches), d.augment.mean, d.augment.std, engine.device, torch.bfloat16),
                     {**values, "step": step, "micro_step": step})
        loss = sum(w * out[k] for k, w in method.loss_weights.items())
        engine.backward(loss)
        engine.step()
        if ema is not None:
            ema.update(values["momentum"])
        losses.append(loss.item())
    report["losses"] = losses
    in_optimizer = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    for name, net in frozen.items():
        after = gathered(net)
        params = list(net.parameters())
        report["frozen"][name].update(
            unchanged=all(torch.equal(before[name][k], after[k]) for k in after),
            no_grads=all(p.grad is None and not p.requires_grad for p in params), eval=not net.training,
            in_optimizer=any(id(p) in in_optimizer for p in params), sha256=net.weights_sha256)
    teacher = {k: v.float() for k, v in gathered(method.teacher.backbone).items()} if ema is not None else None
    Checkpointer(ckpt_dir, keep=1).save(engine, 3, client_state(cfg, method, loader, ema, {}, 0, "frozen_check"))
    if dist.get_rank() == 0:
        if teacher is not None:
            torch.save(teacher, Path(report_path).with_name("teacher_backbone.pt"))
        Path(report_path).write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
    finish()
