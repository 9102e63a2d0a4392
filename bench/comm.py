"""ZeRO-3 traffic per optimizer step, counted on CPU ranks (gloo), against the analytic count.

Every collective is counted where it is issued: DeepSpeed's communication backend (its bound
all_gather_into_tensor, reduce_scatter_tensor, ...) and torch.distributed (our own all-reduces),
the outermost call only. Bytes are those of the whole tensor each rank ends up with: the gathered
tensor of an all-gather, the input of a reduce-scatter, the tensor of an all-reduce or broadcast.
Each byte is put down to the part of the step that issued it: the forward of the student, the EMA
teacher or the frozen teacher (module hooks), the backward, the optimizer step, the EMA update.

The analytic count for the forward is `parameters x forward calls` in the model dtype for every
module of the student and teachers (ZeRO-3 gathers a module's parameters at each call), and the
same again for the student's backward; the gradients are reduce-scattered once per step.

Cases: iBOT with per-resolution forwards (run.kernels torch: one backbone call per crop size)
against packed multi-crop (run.kernels triton, the varlen kernel, run in Triton's interpreter
here: one call for all crops); iBOT + CLIP with the frozen teacher partitioned (teacher.clip.replicate
false) against replicated. scripts/bench_comm.py is the command line; each case runs on its ranks
as `torchrun -m bench.comm --worker ...`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from . import ROOT

# The tiny model of tests/dist (ViT with 4 blocks of width 64 at patch 8), with 2 global 32-pixel and 4
# local 16-pixel crops.
TINY = ["run.precision=bf16", "model.arch=vit_test", "model.patch_size=8", "ibot.out_dim=256",
        "ibot.head_hidden_dim=64", "ibot.head_bottleneck_dim=16", "data.batch_size=4",
        "ibot.freeze_last_layer_steps=0"]
CASES = {
    "ibot_per_resolution": ("ibot_vit_tiny.yaml", ["run.kernels=torch"]),
    "ibot_packed": ("ibot_vit_tiny.yaml", ["run.kernels=triton"]),
    "ibot_clip_partitioned": ("ibot_clip_vit_tiny.yaml", ["run.kernels=torch", "teacher.clip.replicate=false"]),
    # sharded construction too: the replicated teacher is then built whole inside zero.Init
    "ibot_clip_replicated": ("ibot_clip_vit_tiny.yaml", ["run.kernels=torch", "teacher.clip.replicate=true",
                                                         "model.sharded_init=true"]),
}
OPS = ("all_gather_into_tensor", "all_gather", "reduce_scatter_tensor", "reduce_scatter", "all_reduce",
       "broadcast", "reduce", "all_to_all_single", "all_reduce_coalesced")
KIND = {"all_gather_into_tensor": "all_gather", "all_gather": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
        "reduce_scatter": "reduce_scatter", "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce",
        "broadcast": "broadcast", "reduce": "reduce", "all_to_all_single": "all_to_all"}


def _nbytes(op: str, args: tuple, kwargs: dict) -> int:
    import torch

    def size(t):
        if isinstance(t, torch.Tensor):
            return t.numel() * t.element_size()
        if isinstance(t, (list, tuple)):
            return sum(size(x) for x in t)
        return 0

    # the whole tensor: an all-gather's output, a reduce-scatter's input, otherwise the (first) tensor
    whole = {"all_gather_into_tensor": ("output_tensor", 0), "all_gather": ("tensor_list", 0),
             "reduce_scatter_tensor": ("input_tensor", 1), "reduce_scatter": ("input_list", 1),
             "all_to_all_single": ("output", 0)}
    key, pos = whole.get(op, ("tensor", 0))
    for k in (key, "input", "tensor", "tensors"):
        if k in kwargs:
            return size(kwargs[k])
    return size(args[pos]) if len(args) > pos else 0


class Counter:
    """Bytes per (phase, kind) of every collective while installed."""

    def __init__(self):
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.phase = "other"
        self._depth = 0

    def wrap(self, owner, op: str) -> None:
        original = getattr(owner, op, None)
        if original is None:
            return

        def counted(*args, **kwargs):
            if self._depth == 0:
                key = (self.phase, KIND[op])
                self.bytes[key] += _nbytes(op, args, kwargs)
                self.calls[key] += 1
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        setattr(owner, op, counted)

    def install(self) -> None:
        import deepspeed.comm.comm as ds_comm
        import torch.distributed as dist

        for op in OPS:
            self.wrap(ds_comm.cdb, op)
            self.wrap(dist, op)

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


def part_of(name: str, frozen: tuple[str, ...]) -> str:
    """The EMA teacher, a frozen teacher (`frozen`: the method's frozen networks), or the student
    with what trains beside it (adapters)."""
    root = name.split(".")[0]
    return "EMA teacher" if root == "teacher" else "frozen teacher" if root in frozen else "student"


def group_of(name: str, frozen: tuple[str, ...]) -> str:
    """Student parameters split: the blocks (what packing gathers once for all crops) and the rest."""
    if part_of(name, frozen) != "student":
        return ""
    return "blocks" if ".blocks." in f"{name}." else "embeddings + heads"


def by_parameters(method, frozen: tuple[str, ...]) -> dict[str, float]:
    """Bytes ZeRO-3's parameter coordinator gathers, per (forward/backward, part of the model): its
    all-gather entry point, wrapped for the rest of this (worker) process. Only parameters not already
    available are gathered."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

    label = {id(p): f"{part_of(n, frozen)} {group_of(n, frozen)}".strip() for n, p in method.named_parameters()}
    out: dict[str, float] = defaultdict(float)
    name = "_PartitionedParameterCoordinator__all_gather_params_"
    original = getattr(Coordinator, name)

    def counted(self, params, forward, quantize=False):
        for p in params:
            if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                out[f"{'forward' if forward else 'backward'}: {label.get(id(p), 'other')}"] += (
                    p.ds_numel * p.ds_tensor.element_size())
        return original(self, params, forward, quantize)

    setattr(Coordinator, name, counted)
    return out


def worker(case: str, regime: str, out: str, steps: int) -> None:
    """Under torchrun: build the case's engine, run 2 warm-up steps, count `steps` steps."""
    import torch
    import torch.distributed as dist

    from trainer.config import load_config
    from trainer.distributed import leave_distributed
    from trainer.ds_config import build_ds_config
    from trainer.engine import apply_schedule, build_engine, init_distributed
    from trainer.methods import frozen_files, replicated_frozen
    from trainer.schedules import Schedules

    config, extra = CASES[case]
    clip = os.environ.get("BENCH_COMM_CLIP")
    overrides = TINY + extra + ([f"teacher.clip.weights={clip}", "teacher.clip.arch=clip_vit_tiny"] if "clip" in case
                                else [])
    init_distributed()
    cfg = load_config(ROOT / "configs" / config, overrides)
    ds = build_ds_config("zero3", cfg, dist.get_world_size())
    if regime == "release":  # what a model much larger than these limits sees: nothing stays gathered
        ds["zero_optimization"].update(stage3_max_live_parameters=0, stage3_max_reuse_distance=0,
                                       stage3_prefetch_bucket_size=0)
    engine, ema = build_engine(cfg, ds, seed=0)
    method, counter = engine.module, Counter()
    frozen, whole = tuple(frozen_files(cfg)), replicated_frozen(cfg)  # whole: outside the engine, never gathered
    schedules = Schedules.from_config(cfg, type(method))
    counter.install()
    gathered = by_parameters(method, frozen)
    forward_calls: dict[str, int] = defaultdict(int)
    params: dict[str, int] = {}
    children: dict[str, list[str]] = {}
    roots = [n for n, _ in method.named_children()] + list(whole)
    for root in roots:
        for name, sub in getattr(method, root).named_modules():
            full = f"{root}.{name}" if name else root
            params[full] = sum(getattr(p, "ds_numel", p.numel()) for p in sub.parameters(recurse=False))
            children[full] = [f"{full}.{c}" for c, _ in sub.named_children()]

            def pre(*_, full=full):
                if counter.phase != "backward":  # not checkpointing's recomputation
                    forward_calls[full] += 1
            sub.register_forward_pre_hook(pre)
    replicated = bool(whole)

    def calls(name: str) -> int:
        """A module's forward calls; one never called itself (a backbone used through forward_features)
        has its own parameters gathered with its children, so it counts as often as they are called."""
        return forward_calls.get(name, 0) or max((calls(c) for c in children[name]), default=0)

    g = torch.Generator().manual_seed(dist.get_rank())
    micro = cfg.data.batch_size
    per_step = []
    for step in range(2 + steps):
        if step == 2:
            counter.reset()
            forward_calls.clear()
            gathered.clear()
        batch = {"global_crops": torch.randn(2, micro, 3, 32, 32, generator=g).bfloat16(),
                 "local_crops": torch.randn(4, micro, 3, 16, 16, generator=g).bfloat16(),
                 "masks": torch.rand(2, micro, 4, 4, generator=g) < 0.4}
        values = schedules.at(step)
        apply_schedule(engine.optimizer, values)
        counter.phase = "forward"
        losses = engine(batch, {**values, "step": step, "micro_step": step})
        counter.phase = "backward"
        engine.backward(sum(w * losses[k] for k, w in method.loss_weights.items()))
        counter.phase = "optimizer step"
        engine.step()
        counter.phase = "EMA update"
        if ema is not None:
            ema.update(values["momentum"])
        counter.phase = "other"
        per_step.append(step)
    e = 2  # bf16
    analytic = defaultdict(float)
    for n in params:
        part = part_of(n, frozen)
        if part == "frozen teacher" and replicated:
            continue
        nbytes = calls(n) * params[n] * e / steps
        analytic[f"forward: {part} {group_of(n, frozen)}".strip()] += nbytes
        if part == "student":  # each forward call's backward gathers again
            analytic[f"backward: student {group_of(n, frozen)}"] += nbytes
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in method.parameters() if p.requires_grad)
    report = {
        "case": case, "regime": regime, "ranks": dist.get_world_size(), "steps": steps, "replicated": replicated,
        "bytes_per_step": {f"{phase} / {kind}": v / steps for (phase, kind), v in sorted(counter.bytes.items())},
        "calls_per_step": {f"{phase} / {kind}": v / steps for (phase, kind), v in sorted(counter.calls.items())},
        "gathered_per_step": {k: v / steps for k, v in sorted(gathered.items())},
        "analytic_gathered_per_step": dict(sorted(analytic.items())),
        "analytic_reduce_scatter": trainable * e,
        # passes through the blocks: calls of the first block's first norm (packed: one for all crops)
        "block_passes_per_step": forward_calls.get("student.backbone.blocks.0.norm1", 0) / steps,
        "parameters": {"trainable": trainable, **{part: sum(v for n, v in params.items() if part_of(n, frozen) == part)
                                                  for part in ("student", "EMA teacher", "frozen teacher")}},
    }
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(report, indent=1) + "\n")
    leave_distributed()


def totals(r: dict) -> dict:
    """Bytes per kind of collective (all phases), and what the coordinator gathered per part of the model."""
    out: dict[str, float] = defaultdict(float)
    for key, v in r["bytes_per_step"].items():
        out[key.split(" / ")[1]] += v
    for which in ("gathered_per_step", "analytic_gathered_per_step"):
        for key, v in r[which].items():
            part = key.split(": ", 1)[1]
            out[f"{which} {part}"] += v
            out[which] += v
    return out


class CaseFailed(RuntimeError):
    """A case's ranks failed; the message has their output."""


def run_case(case: str, regime: str, ranks: int, steps: int, clip: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "BENCH_COMM_CLIP": clip}
        if case == "ibot_packed":
            env.setdefault("TRITON_INTERPRET", "1")
        port = str(29400 + (os.getpid() + ranks + len(case) + len(regime)) % 500)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", port,
               "-m", "bench.comm", "--worker", case, regime, str(out), str(steps)]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if p.returncode:
            raise CaseFailed(f"{case} ({regime}) on {ranks} ranks failed:\n{p.stdout[-2000:]}{p.stderr[-4000:]}")
        return json.loads(out.read_text())


def summarise(results: list[dict]) -> tuple[list[str], dict]:
    """The table of docs/scale.md (KiB per rank per optimizer step; measured / analytic) and the ratios."""
    kib = 1024
    parts = ("student blocks", "student embeddings + heads", "EMA teacher", "frozen teacher")

    def pair(t, part=""):
        m, a = t[f"gathered_per_step {part}".strip()], t[f"analytic_gathered_per_step {part}".strip()]
        return f"{m / kib:.1f} / {a / kib:.1f}"

    head = ["case", "ZeRO-3 limits", "ranks", "block passes", "all-gather", "gathered / analytic",
            *parts, "reduce-scatter / analytic", "all-reduce"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        t = totals(r)
        cells = [r["case"], r["regime"], str(r["ranks"]), f"{r['block_passes_per_step']:.0f}",
                 f"{t['all_gather'] / kib:.1f}", pair(t), *(pair(t, p) for p in parts),
                 f"{t['reduce_scatter'] / kib:.1f} / {r['analytic_reduce_scatter'] / kib:.1f}",
                 f"{t['all_reduce'] / kib:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    by = {(r["case"], r["regime"], r["ranks"]): totals(r) for r in results}
    ratios = {}
    for (case, regime, ranks), t in by.items():
        if case == "ibot_packed" and ("ibot_per_resolution", regime, ranks) in by:
            base = by["ibot_per_resolution", regime, ranks]["gathered_per_step student blocks"]
            mine = t["gathered_per_step student blocks"]
            ratios[f"student block gathers, per-resolution / packed ({regime}, {ranks} ranks)"] = (
                round(base / mine, 3) if mine else None)
        if case == "ibot_clip_replicated" and ("ibot_clip_partitioned", regime, ranks) in by:
            before = by["ibot_clip_partitioned", regime, ranks]["gathered_per_step frozen teacher"]
            ratios[f"frozen teacher KiB gathered, partitioned -> replicated ({regime}, {ranks} ranks)"] = [
                round(before / kib, 1), round(t["gathered_per_step frozen teacher"] / kib, 1)]
    lines += [f"{k}: {v}" for k, v in ratios.items()]
    return lines, ratios


def measure(cases: list[str], ranks: list[int], regimes: list[str], steps: int) -> list[dict]:
    """Every case on every number of ranks in every regime -> one result each, with its totals."""
    with tempfile.TemporaryDirectory() as tmp:
        clip = str(Path(tmp) / "clip.safetensors")
        if any("clip" in c for c in cases):
            from models.teachers import save_clip, tiny_clip

            save_clip(tiny_clip(), clip)
        results = [run_case(c, g, r, steps, clip) for r in ranks for g in regimes for c in cases]
    for r in results:
        r["totals"] = dict(totals(r))
    return results


if __name__ == "__main__":  # a case's rank, under torchrun (run_case)
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
