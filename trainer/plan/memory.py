"""Per-GPU memory of a run: what DeepSpeed keeps for the ZeRO stage, plus the step's activations.

States, per parameter of each kind (P trainable, E EMA teacher, F frozen teachers; R ranks):

    ZeRO-3                       ZeRO-1/2
    bf16 weights     2P/R        2P
    gradients        2P/R        2P (stage 1) / 2P/R (stage 2)    DeepSpeed 0.19 accumulates them in the
                                                                  model dtype (data_types.grad_accum_dtype)
    fp32 step copy   4 min(sub_group_size, P/R)                   the gradients of one sub-group in fp32
    fp32 master      4P/R        4P/R     } on the CPU (or NVMe) with offload_optimizer, with the
    Adam m, v        8P/R        8P/R     } gradient partition and our EMA shadow
    EMA teacher      2E/R        2E       bf16 working copy
    EMA shadow       4E/R        4E       our fp32 shadow (trainer/ema.py), beside the fp32 masters
    frozen teachers  2F/R        2F       2F under ZeRO-3 too with teacher.clip.replicate (never gathered)

plus, under ZeRO-3, the parameters gathered at once (those DeepSpeed keeps for reuse within
stage3_max_reuse_distance, at least the largest module, and the prefetch bucket) and the gradient
reduce bucket; then the step's activations (workload.py): the student's saved tensors, the
teachers' outputs kept until the loss, the loss's logits, the
largest working set, and under activation checkpointing one block's recomputed activations.

What is not modelled is one row, a rule of thumb: the CUDA context, NCCL buffers and allocator
fragmentation (1 GiB + 10% of the activations). The activation estimate is checked against
measured peaks in tests/unit/test_plan.py (CPU) and bench/results/ (GPU, where one was available).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from trainer.config import Config
from trainer.methods import replicated_frozen

from . import workload

log = logging.getLogger(__name__)

GiB = 2 ** 30
RESERVE_FIXED = 1 * GiB  # CUDA context + NCCL buffers (rule of thumb, not measured here)
RESERVE_FRACTION = 0.10  # allocator fragmentation, as a fraction of the activations


@dataclass
class Zero:
    """The memory-relevant part of a DeepSpeed config."""

    stage: int
    offload_optimizer: str  # none | cpu | nvme
    offload_param: str
    reduce_bucket: int  # elements
    prefetch_bucket: int
    max_live: int
    sub_group: int
    max_reuse: int = 10**9  # stage3_max_reuse_distance: parameters reused within it stay gathered

    @classmethod
    def from_ds(cls, ds: dict) -> Zero:
        z = ds.get("zero_optimization", {})

        def device(key: str) -> str:
            return (z.get(key) or {}).get("device", "none") or "none"

        return cls(int(z.get("stage", 0)), device("offload_optimizer"), device("offload_param"),
                   int(z.get("reduce_bucket_size", 5e8)), int(z.get("stage3_prefetch_bucket_size", 5e7)),
                   int(z.get("stage3_max_live_parameters", 1e9)), int(z.get("sub_group_size", 1e9)),
                   int(z.get("stage3_max_reuse_distance", 1e9)))


@dataclass
class Row:
    name: str
    gpu: float  # bytes per GPU
    host: float = 0.0  # bytes per rank in CPU memory (offload)
    note: str = ""


@dataclass
class Plan:
    config: str
    gpus: int
    gpu_bytes: float
    micro_batch: int
    rows: list[Row]
    counts: workload.Counts
    activations_without_checkpointing: float
    largest_micro_batch: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(r.gpu for r in self.rows)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes

    @property
    def margin(self) -> float:
        return self.gpu_bytes - self.total

    def verdict(self) -> str:
        need = self.total / GiB
        if self.fits:
            line = (f"fits: {need:.1f} of {self.gpu_bytes / GiB:.0f} GiB per GPU at micro-batch {self.micro_batch} "
                    f"({self.margin / GiB:.1f} GiB, {100 * self.margin / self.gpu_bytes:.0f}% to spare)")
        else:
            line = (f"does NOT fit: {need:.1f} GiB per GPU needed at micro-batch {self.micro_batch}, "
                    f"{self.gpu_bytes / GiB:.0f} GiB available ({-self.margin / GiB:.1f} GiB short)")
        if self.largest_micro_batch:
            line += f"; the largest micro-batch that fits is {self.largest_micro_batch}"
        elif self.largest_micro_batch == 0:
            line += "; not even micro-batch 1 fits (more GPUs, offload, or activation checkpointing)"
        return line

    def table(self) -> str:
        c = self.counts
        frozen = ", ".join(f"{k} {v / 1e6:,.1f}M" for k, v in c.frozen.items()) or "none"
        lines = [f"{self.config}: {self.gpus} rank(s) of {self.gpu_bytes / GiB:.0f} GiB, micro-batch "
                 f"{self.micro_batch} per rank",
                 f"parameters: trainable {c.trainable / 1e6:,.1f}M (projection heads, student's and teacher's: "
                 f"{c.heads / 1e6:,.1f}M), "
                 f"EMA teacher {c.ema / 1e6:,.1f}M, frozen {frozen}; largest gather "
                 f"{c.largest_gather / 1e6:,.1f}M ({c.largest_name})",
                 f"{'':44} {'GPU GiB':>9} {'CPU GiB':>9}"]
        for r in self.rows:
            host = f"{r.host / GiB:9.2f}" if r.host else f"{'':9}"
            lines.append(f"  {r.name:42} {r.gpu / GiB:9.2f} {host}  {r.note}")
        lines.append(f"  {'total':42} {self.total / GiB:9.2f}")
        lines += [f"  ({n})" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"config": self.config, "gpus": self.gpus, "gpu_gib": self.gpu_bytes / GiB,
                "micro_batch": self.micro_batch, "total_gib": self.total / GiB, "fits": self.fits,
                "margin_gib": self.margin / GiB, "largest_micro_batch": self.largest_micro_batch,
                "rows": [{"name": r.name, "gpu_gib": r.gpu / GiB, "cpu_gib": r.host / GiB, "note": r.note}
                         for r in self.rows],
                "parameters": {"trainable": self.counts.trainable, "ema": self.counts.ema,
                               "frozen": self.counts.frozen, "heads": self.counts.heads},
                "activations_without_checkpointing_gib": self.activations_without_checkpointing / GiB}


def state_rows(counts: workload.Counts, z: Zero, ranks: int, e: int, replicated: tuple[str, ...] = ()) -> list[Row]:
    """Weights, gradients, optimizer states and teachers per GPU (module docstring); `replicated`:
    the frozen networks kept whole on every rank."""
    P, E, F = counts.trainable, counts.ema, sum(counts.frozen.values())
    shard = ranks if z.stage == 3 else 1
    off_opt, off_par = z.offload_optimizer != "none", z.offload_param != "none"

    def placed(name: str, nbytes: float, offloaded: bool, note: str) -> Row:
        where = z.offload_param if "bf16" in name else z.offload_optimizer
        return Row(name, 0.0 if offloaded else nbytes, nbytes if offloaded else 0.0,
                   note + (f" (offloaded: {where})" if offloaded else ""))

    grads = e * P / (ranks if z.stage >= 2 else 1)
    local = P / ranks if z.stage else P
    rows = [placed("student weights (bf16)", e * P / shard, off_par, f"1/{shard}" if shard > 1 else "whole"),
            placed("gradients", grads, off_opt and z.stage == 3, "partition" if z.stage >= 2 else "whole"),
            placed("fp32 gradients of one sub-group (step)", 4 * min(z.sub_group, local), off_opt,
                   f"sub_group_size {z.sub_group / 1e6:.0f}M"),
            placed("fp32 master weights", 4 * local, off_opt, "partition" if z.stage else "whole"),
            placed("Adam moments (fp32 m, v)", 8 * local, off_opt, "partition" if z.stage else "whole")]
    if E:
        rows += [placed("EMA teacher (bf16)", e * E / shard, off_par, "shard-local" if shard > 1 else "whole"),
                 placed("EMA shadow (fp32)", 4 * E / shard, off_opt, "trainer/ema.py")]
    sharded = {k: v for k, v in counts.frozen.items() if k not in replicated}
    if sharded:
        rows.append(placed("frozen teachers (bf16)", e * sum(sharded.values()) / shard, off_par, ", ".join(sharded)))
    if F - sum(sharded.values()):
        rows.append(Row("frozen teachers (bf16), replicated", e * (F - sum(sharded.values())), 0.0,
                        ", ".join(k for k in counts.frozen if k in replicated) + ": whole, never gathered"))
    if z.stage == 3:
        # DeepSpeed releases a gathered parameter after its module ran unless the parameter trace uses it
        # again within stage3_max_reuse_distance elements: with zero3.json's 1e9 (DeepSpeed's default),
        # a student used by 2 crop sizes and its backward, and a teacher used every step, stay gathered
        # (scripts/bench_comm.py shows it). Bounded by what the step gathers at all.
        gathered = counts.total - sum(v for k, v in counts.frozen.items() if k in replicated)
        prefetch = min(z.prefetch_bucket, z.max_live, counts.total)
        live = min(gathered, max(min(z.max_reuse, gathered), counts.largest_gather) + prefetch)
        rows.append(Row("gathered weights (kept for reuse + prefetch)", e * live, 0.0,
                        f"{min(z.max_reuse, gathered) / 1e6:,.0f}M reuse distance, largest "
                        f"{counts.largest_gather / 1e6:.1f}M, prefetch {prefetch / 1e6:.0f}M"))
    if z.stage >= 2:
        rows.append(Row("gradient reduce bucket", e * min(z.reduce_bucket, P), 0.0,
                        f"{min(z.reduce_bucket, P) / 1e6:.0f}M elements"))
    return rows


@dataclass
class Activations:
    saved: float  # the student's tensors kept for the backward
    kept: float  # teacher outputs alive until the loss
    logits: float  # the loss's logits
    working: float  # the largest working set (a leaf module's input + output, or their gradients)
    recompute: float  # one checkpointed block recomputed in the backward

    @property
    def total(self) -> float:
        return self.saved + self.kept + self.logits + self.working + self.recompute


def recompute_bytes(block: float, depth: int, every: int) -> float:
    """What the backward recomputes at once under checkpointing of every `every`-th of `depth` blocks:
    the largest block's saved tensors beyond its input (the input is what checkpointing keeps). When
    the last block is not checkpointed, its saved tensors are freed before the first recomputation,
    which fits in their place."""
    if not every:
        return 0.0
    return block if (depth - 1) % every == 0 else 0.0


def peak_bytes(saved: float, working: float, recompute: float) -> float:
    """A gradient pass's peak: its saved tensors, the backward's working set (the gradients of the
    largest leaf module's input and output: the two themselves are saved tensors already), and one
    recomputed block."""
    return saved + working + recompute


def activations(method: nn.Module, cfg: Config, b: int, every: int, fused_ce: bool) -> Activations:
    """Peak activation memory of one micro-batch of `b` images with checkpointing of every `every`-th
    student block (0: none). `method` is on the meta device (workload.build_meta)."""
    backbone = method.student["backbone"]
    can_checkpoint = hasattr(backbone, "set_grad_checkpointing")
    blocks = tuple(getattr(backbone, "blocks", ()))
    recompute = 0.0
    if can_checkpoint:
        backbone.set_grad_checkpointing(bool(every), every=every or 1)
    passes = workload.step_passes(method, cfg, b)
    if can_checkpoint and every:
        backbone.set_grad_checkpointing(False)
        block = max(p.unit for p in workload.step_passes(method, cfg, b, units=blocks) if p.grad)
        backbone.set_grad_checkpointing(True, every=every)
        recompute = recompute_bytes(block, len(blocks) or 1, every)
    grad = [p for p in passes if p.grad]
    working = max(p.working for p in passes)
    return Activations(sum(p.saved for p in grad), sum(p.kept for p in passes if not p.grad),
                       workload.loss_bytes(method, cfg, b, fused_ce), working, recompute)


def plans_fused_ce(cfg: Config) -> bool:
    """Whether a GPU run of `cfg` uses the fused softmax-CE: run.kernels triton, or auto (the kernels pass
    their self-check on a CUDA GPU with Triton; models/kernels resolve)."""
    return cfg.run.kernels in ("auto", "triton")


def plan(cfg: Config, ds: dict, gpus: int, gpu_bytes: float, micro_batch: int | None = None,
         method: nn.Module | None = None, fused_ce: bool | None = None, name: str = "", search: bool = True) -> Plan:
    """The per-GPU memory of `cfg` under DeepSpeed config `ds` on `gpus` ranks of `gpu_bytes` each;
    `search`: also find the largest micro-batch that fits."""
    method = method if method is not None else workload.build_meta(cfg)
    fused = plans_fused_ce(cfg) if fused_ce is None else fused_ce
    z = Zero.from_ds(ds)
    e = workload.DTYPES[cfg.run.precision].itemsize
    replicated = tuple(replicated_frozen(cfg))
    counts = workload.count_parameters(method, replicated)
    b = micro_batch or cfg.data.batch_size
    every = cfg.model.grad_checkpointing
    states = state_rows(counts, z, gpus, e, replicated)

    def rows_for(a: Activations) -> list[Row]:
        what = f"checkpointing every {every}" if every else "no checkpointing"
        act = [Row("activations: student (saved for backward)", a.saved, 0.0, what),
               Row("activations: teacher outputs until the loss", a.kept, 0.0, ""),
               Row("activations: loss logits", a.logits, 0.0, "fused softmax-CE chunks" if fused and a.logits else ""),
               Row("activations: largest working set", a.working, 0.0, ""),
               Row("activations: one block recomputed", a.recompute, 0.0, "")]
        reserve = Row("CUDA context, NCCL, fragmentation", RESERVE_FIXED + RESERVE_FRACTION * a.total, 0.0,
                      "rule of thumb")
        return states + [r for r in act if r.gpu] + [reserve]

    configured = activations(method, cfg, b, every, fused)
    rows = rows_for(configured)
    no_ckpt = activations(method, cfg, b, 0, fused).total if every else configured.total
    largest = None
    if search:
        # Every activation is proportional to the micro-batch but for the loss's capped chunks (counted
        # exactly for any b): measure b = 1 and 2, and search on the line through them.
        one, two = (activations(method, cfg, n, every, fused) for n in (1, 2))

        def at(n: int) -> float:
            a = Activations(*(getattr(one, f) + (n - 1) * (getattr(two, f) - getattr(one, f))
                              for f in ("saved", "kept", "logits", "working", "recompute")))
            a.logits = workload.loss_bytes(method, cfg, n, fused)
            return sum(r.gpu for r in rows_for(a))

        largest = largest_micro_batch(at, gpu_bytes)
    notes = []
    if hasattr(method, "pack_crops") and cfg.data.local_crops.number:
        notes.append("packed crops (run.kernels triton) run the same tokens through each block once: the same "
                     "activations, and ZeRO-3 gathers each block once per step instead of once per resolution")
    if not fused and workload.prototype_rows(method, cfg, b):
        notes.append("the PyTorch softmax-CE reference materialises the student's logits (run.kernels torch)")
    if every:
        notes.append(f"without activation checkpointing the activations would take {no_ckpt / GiB:.2f} GiB")
    return Plan(name or cfg.run.output_dir, gpus, gpu_bytes, b, rows, counts, no_ckpt, largest, notes)


def device_memory() -> tuple[float, str]:
    """(bytes one rank may use, what that is): this GPU's memory, or without one the host's RAM
    shared by the ranks of this node (LOCAL_WORLD_SIZE)."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return float(props.total_memory), props.name
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))), "host RAM per rank (no GPU)"


def plan_this_run(cfg: Config, ds: dict, world_size: int, search: bool = False,
                  available: float | None = None, method: nn.Module | None = None) -> Plan:
    """The plan of the run about to start, against this machine's memory (or `available` bytes)."""
    memory, what = device_memory()
    return plan(cfg, ds, world_size, available or memory, search=search, name=f"this run ({what})", method=method)


def warn_if_over(cfg: Config, ds: dict, world_size: int, available: float | None = None,
                 method: nn.Module | None = None) -> Plan:
    """Before the engine is built: a warning (not an error: the plan is an estimate) when the plan
    needs more than the device has. `method`: the meta-device build (workload.build_meta), if made."""
    result = plan_this_run(cfg, ds, world_size, available=available, method=method)
    if not result.fits:
        log.warning("memory plan: %s. The run may fail with out-of-memory; see python scripts/plan_memory.py "
                    "--config ... --gpus %d (a smaller data.batch_size with optim.grad_accum, "
                    "model.grad_checkpointing, or an offload ds_config)", result.verdict(), world_size)
    else:
        log.info("memory plan: %s", result.verdict())
    return result


def largest_micro_batch(total_at, budget: float, limit: int = 1 << 16) -> int:
    """The largest b with total_at(b) <= budget (total_at grows with b), 0 if none: doubling, then bisection."""
    if total_at(1) > budget:
        return 0
    lo, hi = 1, 2
    while hi <= limit and total_at(hi) <= budget:
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total_at(mid) <= budget else (lo, mid)
    return lo
