"""torchrun --nproc_per_node R tests/dist/reshard_check.py save OUT   (then, on R' ranks)
   torchrun --nproc_per_node R' tests/dist/reshard_check.py load OUT

save: tiny iBOT under ZeRO-3 (bf16), 3 steps with EMA updates, a checkpoint through the project's
Checkpointer, and the consolidated state (fp32 masters, Adam moments, EMA shadow, centers) in
OUT/ref.pt. load: an engine built for a universal load on R' ranks, restored the way trainer/loop.py
does it (trainer/resharding.py), compared with ref.pt; then 4 more steps on one fixed batch, whose
losses must be finite and fall."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from common import TINY, finish, random_batch, train_step
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from trainer import resharding
from trainer.checkpoint import GROUP_KEYS, Checkpointer
from trainer.config import load_config
from trainer.ds_config import build_ds_config
from trainer.engine import build_engine, init_distributed


def consolidated(engine, ema) -> dict:
    R = dist.get_world_size()
    out = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}, "shadow": {}}
    for n, p in engine.module.named_parameters():
        if p.requires_grad:
            out["fp32"][n] = safe_get_full_fp32_param(p).float().clone()
            out["exp_avg"][n] = safe_get_full_optimizer_state(p, "exp_avg").float().clone()
            out["exp_avg_sq"][n] = safe_get_full_optimizer_state(p, "exp_avg_sq").float().clone()
    for n, sh, t in zip(ema.names, ema.shadow, ema.teachers):
        slices = [torch.empty_like(sh) for _ in range(R)]
        dist.all_gather(slices, sh.contiguous())
        out["shadow"][n] = torch.cat(slices)[: t.ds_numel].view(t.ds_shape).clone()
    out["buffers"] = {n: b.float().clone() for n, b in engine.module.named_buffers()}
    out["groups"] = [{k: g[k] for k in GROUP_KEYS} for g in engine.optimizer.param_groups]
    return out


def main():
    mode, out = sys.argv[1], Path(sys.argv[2])
    init_distributed()
    R, r = dist.get_world_size(), dist.get_rank()
    cfg = load_config(None, TINY)
    ds = build_ds_config("zero3.json", cfg, R)
    ckpt = Checkpointer(out / "checkpoints", keep=2)
    source = ckpt.latest()
    if mode == "load":
        ds["checkpoint"] = {"load_universal": True}
    engine, ema = build_engine(cfg, ds, seed=0)
    if mode == "save":
        g = torch.Generator().manual_seed(10 + r)
        for _ in range(3):
            train_step(engine, random_batch(g), weight_decay=0.05)
            ema.update(0.9)
        stream = {"epoch": 2, "consumed": 7 + r, "counters": {"corrupt_image": r}}
        parts = {"ema": ema.state_dict(), "buffers": dict(engine.module.named_buffers()),
                 "rng": {"torch": torch.get_rng_state()}, "summary": {}, "skipped_steps": 0,
                 "data": {"layout": {}, "batches": 3, "streams": [stream]}}
        ckpt.save(engine, 3, parts)
        ref = consolidated(engine, ema)
        if r == 0:
            ref["world"] = R
            torch.save(ref, out / "ref.pt")
        return
    ref = torch.load(out / "ref.pt", weights_only=True)
    assert resharding.saved_world_size(source) == ref["world"] != R
    universal = resharding.convert(source)
    parts = resharding.merged_parts(source, r, R, ema)
    resharding.load_engine(engine, universal)
    ema.load_state_dict(parts["ema"])
    for name, buf in engine.module.named_buffers():
        buf.copy_(parts["buffers"][name])
    now = consolidated(engine, ema)
    report = {"ranks": f"{ref['world']} -> {R}"}
    for key in ("fp32", "exp_avg", "exp_avg_sq", "shadow", "buffers"):
        assert set(now[key]) == set(ref[key]), key
        report[key] = max((now[key][n] - ref[key][n]).abs().max().item() for n in ref[key])
    assert now["groups"] == ref["groups"], (now["groups"], ref["groups"])
    # The teacher's own partitions are the cast of the shadow
    for sh, t in zip(ema.shadow, ema.teachers):
        assert torch.equal(t.ds_tensor.data, sh.to(t.ds_tensor.dtype).view_as(t.ds_tensor))
    assert parts["data"]["restart_epoch"] == 3 and parts["step"] == 3
    assert parts["data"]["counters"].get("corrupt_image", 0) == sum(x for x in range(ref["world"]) if x % R == r)
    batch = random_batch(torch.Generator().manual_seed(99))  # one fixed batch: the loss must fall
    losses = []
    for _ in range(4):
        step = train_step(engine, batch, lr=3e-3)
        ema.update(0.9)
        losses.append(sum(v.item() for v in step.values()))
    report["losses"] = losses
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    if r == 0:
        print("RESHARD " + json.dumps(report))


if __name__ == "__main__":
    main()
    finish()
