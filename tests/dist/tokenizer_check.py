"""Run under torchrun with 2 ranks (ZeRO-3): BEiT's frozen tokenizer is partitioned, never changes,
stays out of the optimizer and the checkpoint, and a second engine restored from the checkpoint
continues with the same losses as the first.

argv: report.json, tokenizer file, checkpoint directory.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from common import finish, gathered
from models.dvae import read_encoder_file
from trainer.checkpoint import Checkpointer
from trainer.config import load_config, to_dict
from trainer.ds_config import build_ds_config
from trainer.engine import apply_schedule, build_engine, init_distributed

ROOT = Path(__file__).resolve().parents[2]


def batch(step: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    return {"global_crops": torch.randn(1, 4, 3, 32, 32, generator=g).bfloat16(),
            "second_crops": torch.randint(0, 256, (1, 4, 3, 16, 16), generator=g, dtype=torch.uint8),
            "masks": torch.rand(1, 4, 4, 4, generator=g) < 0.4}


def step(engine, i: int) -> float:
    apply_schedule(engine.optimizer, {"lr": 1e-3, "weight_decay": 0.05, "last_layer_lr_factor": 1.0})
    out = engine(batch(i), {"step": i, "micro_step": i})
    engine.backward(out["mim"])
    engine.step()
    return out["mim"].item()


def main(report_path, tokenizer_path, ckpt_dir):
    init_distributed()
    cfg = load_config(ROOT / "configs" / "beit_vit_tiny.yaml", [
        "run.precision=bf16", "model.arch=vit_test", "data.batch_size=4", f"beit.tokenizer={tokenizer_path}",
        "beit.vocab_size=32", "model.sharded_init=true"])
    ds = build_ds_config("zero3.json", cfg, dist.get_world_size())
    engine, _ = build_engine(cfg, ds, seed=0)
    method = engine.module
    tok = method.tokenizer
    params = list(tok.parameters())
    local, total = sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
    _, from_file = read_encoder_file(tokenizer_path)
    before = gathered(tok)
    matches_file = all(torch.equal(before[f"encoder.{k}"], v.to(before[f"encoder.{k}"].dtype))
                       for k, v in from_file.items())
    losses = [step(engine, i) for i in range(2)]
    ckpt_dir = Path(ckpt_dir)
    ckpt = Checkpointer(ckpt_dir, keep=1)
    ckpt.save(engine, 2, {"config": json.dumps(to_dict(cfg)), "tokenizer_sha256": tok.weights_sha256})
    losses += [step(engine, i) for i in range(2, 4)]
    after = gathered(tok)
    in_optimizer = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}

    # A second engine, built like a new process would, restored from the checkpoint.
    engine2, _ = build_engine(cfg, ds, seed=1)  # another seed: everything trainable must come from the file
    ckpt.load_engine(engine2, ckpt_dir / "step00000002")
    resumed = [step(engine2, i) for i in range(2, 4)]
    if dist.get_rank() == 0:
        Path(report_path).write_text(json.dumps({
            "world": dist.get_world_size(), "local_fraction": local / total, "matches_file": matches_file,
            "unchanged": all(torch.equal(before[k], after[k]) for k in before),
            "no_grads": all(p.grad is None and not p.requires_grad for p in params),
            "eval": not tok.training, "in_optimizer": any(id(p) in in_optimizer for p in params),
            "losses": losses, "resumed": resumed, "sha256": tok.weights_sha256}))
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
    finish()
