"""Run under torchrun with 2 ranks: ZeRO-3's gradient norm with its invalid-norm sentinel made on the
host (trainer.engine.sentinel_on_host) equals DeepSpeed's own, finite and not, and a step whose
gradients are not finite is still skipped."""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from common import finish
from trainer.engine import init_distributed, sentinel_on_host
from trainer.syncs import HOST

DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
      "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}


def engine(patched: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "weight_decay": 0.0}]
    e, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=DS)
    if patched:
        sentinel_on_host(e.optimizer)
    return e


def step(e, scale: float) -> dict:
    x = torch.arange(12, dtype=torch.float32).reshape(2, 6) / 7 + dist.get_rank()
    loss = e(x).square().sum() * scale
    e.backward(loss)
    before = [p.ds_tensor.detach().clone() for p in e.module.parameters()]
    e.step()
    moved = any(not torch.equal(b, p.ds_tensor) for b, p in zip(before, e.module.parameters()))
    return {"norm": float(e.get_global_grad_norm()), "moved": moved, "device": str(e.optimizer.device)}


def main(report_path):
    init_distributed()
    seen = {}
    real = torch.tensor

    def watching(*args, **kwargs):
        if "device" in kwargs:
            seen[kwargs["device"] is HOST] = seen.get(kwargs["device"] is HOST, 0) + 1
        return real(*args, **kwargs)

    report = {}
    for patched in (False, True):
        e = engine(patched)
        torch.tensor = watching
        try:
            report[str(patched)] = {"finite": step(e, 1.0), "inf": step(e, float("inf"))}
        finally:
            torch.tensor = real
    report["host_sentinels"] = seen.get(True, 0)
    if dist.get_rank() == 0:
        with open(report_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
    finish()
