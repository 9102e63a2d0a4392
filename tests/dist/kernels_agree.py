"""Run under torchrun with 2 ranks (Triton's interpreter, TRITON_INTERPRET=1): `run.kernels: auto`
resolves to the same kernels with and without `model.sharded_init` (the check runs before
`zero.Init`), and when one rank's self-check fails every rank falls back to the references."""

import json
import sys

import torch.distributed as dist

import models.kernels
from common import TINY, finish
from trainer.config import load_config
from trainer.ds_config import build_ds_config
from trainer.engine import agree_on_kernels, build_engine, init_distributed


def built(sharded: bool) -> dict:
    cfg = load_config(None, TINY + ["run.kernels=auto", f"model.sharded_init={str(sharded).lower()}"])
    engine, _ = build_engine(cfg, build_ds_config("zero3.json", cfg, dist.get_world_size()), seed=0)
    method = engine.module
    attn = method.student.backbone.blocks[0].attn.attn_fn
    return {"attention": attn.__name__, "pack_crops": method.pack_crops,
            "loss_fn": method.loss_fn.__name__}


def main(report_path):
    init_distributed()
    report = {"dense": built(False), "sharded": built(True)}
    # Rank 1's check fails (as a GPU whose compiler rejects a kernel would): both ranks fall back.
    real = models.kernels.self_check

    def failing(shapes, device):
        if dist.get_rank() == 1:
            raise AssertionError("attention N=17 output: forced to fail by the test")
        return real(shapes, device)

    models.kernels.self_check = failing
    models.kernels.resolve.cache_clear()
    cfg = load_config(None, TINY + ["run.kernels=auto"])
    from trainer.methods import check_shapes

    report["agreed"] = agree_on_kernels(cfg, "cpu")
    report["shapes"] = check_shapes(cfg).describe()
    report["forced"] = built(False)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, report)
    if dist.get_rank() == 0:
        json.dump(out, open(report_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
    finish()
