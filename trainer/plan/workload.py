"""The config's networks on the meta device, and what one micro-batch of the method runs through them.

A *pass* is one forward of the step: the student's (with gradients: autograd keeps tensors for the
backward) or a teacher's (without: only its outputs stay alive, until the loss). Each pass runs on
meta tensors, so its cost is counted from real shapes by the real module code:

- saved: the bytes autograd keeps for the backward, counted by `saved_tensors_hooks` (each storage
  once, parameters excluded);
- kept: a no-grad pass's outputs (the teacher's targets, iBOT's teacher logits);
- working: the largest input + output of one leaf module (a Linear, a GELU, attention): what is
  alive beside the saved tensors while that module runs, and in the backward the gradients of the
  two (the forward's input and output are saved tensors already);
- unit: the most one block (`units`) keeps for the backward beyond its inputs, which activation
  checkpointing recomputes at once.

Attention is counted as a flash kernel keeps it (q, k, v, output, an fp32 log-sum-exp per row; no
N x N scores): the Triton kernel on a GPU, and PyTorch's CPU and CUDA SDPA kernels, do. On the
meta device SDPA would fall back to its math form, which stores the scores.

The fused softmax-CE head (`run.kernels` triton) holds [1024, K] logits at a time; the PyTorch
reference materialises the student's logits (fp32) for every row that enters the loss.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from trainer.config import Config, files_unchecked

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FUSED_CE_CHUNK_ROWS = 1024  # models/kernels/softmax_ce.py fused_linear_softmax_ce's default


def build_meta(cfg: Config) -> nn.Module:
    """The method module the engine would build for `cfg`, on the meta device, in the run's dtype
    (DeepSpeed casts the module to bf16; the centers stay fp32 as the engine keeps them)."""
    from trainer.methods import method_class

    # The PyTorch references: a Triton kernel would be launched on meta tensors (null pointers). Their
    # memory is the kernels' (flash-style attention below; the fused loss is counted in loss_bytes).
    cfg = copy.deepcopy(cfg)
    cfg.run.kernels = "torch"
    with torch.device("meta"), files_unchecked():  # (shapes only: no weights file is read)
        method = method_class(cfg.method).from_config(cfg)
    method.to(device="meta", dtype=DTYPES[cfg.run.precision])  # (buffers made from NumPy start on the CPU)
    for name in method.fp32_buffers:
        buf = method.get_buffer(name)
        buf.data = buf.data.float()
    return method


@dataclass
class Counts:
    """Parameter counts of the method module, by what the engine does with them."""

    trainable: int  # the optimizer's: student, heads, adapters, decoders, pyramid
    ema: int  # the EMA teacher (`teacher`), a bf16 twin + fp32 shadow of (part of) the student
    frozen: dict[str, int]  # frozen teachers loaded from files (CLIP, BEiT's tokenizer)
    heads: int  # of which projection heads (student + teacher), for the table
    largest_gather: int  # the most parameters one module owns directly: ZeRO-3 gathers module by module
    largest_name: str

    @property
    def total(self) -> int:
        return self.trainable + self.ema + sum(self.frozen.values())


def count_parameters(method: nn.Module, replicated: tuple[str, ...] = ()) -> Counts:
    """`replicated`: frozen networks kept whole outside the engine, which ZeRO-3 never gathers."""
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    ema = sum(p.numel() for p in method.teacher.parameters()) if hasattr(method, "teacher") else 0
    # frozen networks are the children loaded from a file (Method.frozen_files: each has load_weights)
    frozen = {name: sum(p.numel() for p in child.parameters())
              for name, child in method.named_children() if hasattr(child, "load_weights")}
    parts = [getattr(method, n) for n in ("student", "teacher") if hasattr(method, n)]
    heads = sum(p.numel() for part in parts if "head" in part for p in part["head"].parameters())
    name, largest = max(((n, sum(p.numel() for p in m.parameters(recurse=False))) for n, m in method.named_modules()
                         if n.split(".")[0] not in replicated), key=lambda x: x[1])
    return Counts(trainable, ema, frozen, heads, largest, name)


# ----------------------------------------------------------------------------- measuring a pass

class _FlashAttention(torch.autograd.Function):
    """Stands in for SDPA on meta tensors: keeps what a flash kernel keeps."""

    @staticmethod
    def forward(ctx, q, k, v):
        if q.dim() == 4:  # [B, H, N, D] in the token-major layout the kernels write, so [B, N, C] is a view of it
            o = q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).transpose(1, 2)
        else:
            o = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    out = _FlashAttention.apply(q, k, v)
    if isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad:  # BEiT's bias keeps its gradient path
        out = out + attn_mask.sum() * 0
    return out


class _FlashAttentionOnMeta(TorchFunctionMode):
    """SDPA calls inside it go to `_flash_sdpa` (this thread only, whoever holds a reference to SDPA:
    nothing in torch is replaced)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _flash_sdpa(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def flash_attention_on_meta() -> contextlib.AbstractContextManager:
    return _FlashAttentionOnMeta()


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


@dataclass
class PassCost:
    name: str
    grad: bool
    saved: int = 0  # bytes kept for the backward (grad passes)
    kept: int = 0  # bytes of outputs alive until the loss (no-grad passes)
    working: int = 0  # largest leaf-module input + output
    unit: int = 0  # the most one call of a unit (a block) saves beyond its inputs


def _storages(x) -> set[int]:
    if isinstance(x, torch.Tensor):
        return {x.untyped_storage()._cdata}
    if isinstance(x, (list, tuple)):
        return set().union(*map(_storages, x)) if x else set()
    return set()


def measure(name: str, fn: Callable[[], object], grad: bool, modules: nn.Module,
            units: tuple[nn.Module, ...] = ()) -> PassCost:
    """Run `fn` (meta tensors) and count what it keeps; `modules`: where to watch the leaf modules;
    `units`: the modules whose calls checkpointing would recompute one at a time."""
    params = {p.untyped_storage()._cdata for p in modules.parameters()}
    storages: dict[int, int] = {}  # (insertion-ordered: a unit's own storages are the ones added during its call)

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in params:
            storages[s._cdata] = max(storages.get(s._cdata, 0), s.nbytes())
        return t

    working = [0]

    def hook(module, inputs, output):
        working[0] = max(working[0], _nbytes(inputs) + _nbytes(output))

    handles = [m.register_forward_hook(hook) for m in modules.modules() if not list(m.children())]
    unit, starts = [0], []

    def unit_start(module, inputs):
        starts.append((len(storages), _storages(inputs)))

    def unit_end(module, inputs, output):
        first, own_inputs = starts.pop()
        added = list(storages.items())[first:]
        unit[0] = max(unit[0], sum(n for k, n in added if k not in own_inputs))

    for u in units:
        handles += [u.register_forward_pre_hook(unit_start), u.register_forward_hook(unit_end)]
    try:
        with flash_attention_on_meta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.set_grad_enabled(grad):
            out = fn()
    finally:
        for h in handles:
            h.remove()
    cost = PassCost(name, grad, working=working[0], unit=unit[0])
    if grad:
        cost.saved = sum(storages.values())
    else:
        cost.kept = _nbytes(out)
    return cost


# ----------------------------------------------------------------------------- what a step runs

@dataclass
class Shapes:
    """What one micro-batch of `b` images puts through the networks."""

    b: int
    global_n: int
    global_size: int
    local_n: int
    local_size: int
    patch: int
    masked_per_view: int

    @property
    def grid(self) -> int:
        return self.global_size // self.patch

    @property
    def patches(self) -> int:
        return self.grid ** 2


def shapes(cfg: Config, b: int, expected: bool = False) -> Shapes:
    """`expected`: masked rows at their expected number (the FLOP count), not the memory plan's
    worst case (every view masked at the top of data.mask.ratio)."""
    d, m = cfg.data, cfg.data.mask
    N = (d.global_crops.size // cfg.model.patch_size) ** 2
    fraction = 1.0 if m.patches is not None or not expected else m.prob * (m.ratio[0] + m.ratio[1]) / 2 / m.ratio[1]
    masked = m.patches if m.patches is not None else int(N * m.ratio[1] * fraction)
    return Shapes(b, d.global_crops.number, d.global_crops.size, d.local_crops.number, d.local_crops.size,
                  cfg.model.patch_size, masked)


def _images(n: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(n, 3, size, size, device="meta", dtype=dtype)


Call = tuple[str, Callable[[], object], bool, nn.Module]  # (name, run it, with gradients, where its modules are)


def step_calls(method: nn.Module, cfg: Config, b: int, expected: bool = False) -> list[Call]:
    """The passes one micro-batch of `b` images makes, teachers first (as the methods run them):
    the method's own description (trainer/methods/base.py `plan_calls`)."""
    return method.plan_calls(cfg, shapes(cfg, b, expected), DTYPES[cfg.run.precision])


def prototype_rows(method: nn.Module, cfg: Config, b: int, expected: bool = False) -> list[tuple[int, int, int]]:
    """(rows, width, K) of each set of student scores computed inside the loss against a teacher's
    (iBOT's prototypes), which the fused loss may compute in chunks."""
    return [(r, d, k) for r, d, k, soft in method.loss_logits(cfg, shapes(cfg, b, expected)) if soft]


def loss_bytes(method: nn.Module, cfg: Config, b: int, fused: bool) -> int:
    """The logits that exist in the loss of one micro-batch: the fused softmax-CE holds one chunk of
    logits and of their gradient at a time, and in its backward the fp32 sum of dL/dW [K, C] beside
    one chunk's product; the reference materialises them (bf16, an fp32 copy, the fp32 log-softmax
    kept for the backward). Hard labels (BEiT's): fp32 logits and their log-softmax."""
    e = DTYPES[cfg.run.precision].itemsize
    total = 0
    for rows, width, K, soft in method.loss_logits(cfg, shapes(cfg, b)):
        if not soft:
            total += rows * K * 8
        elif fused:
            total += min(rows, FUSED_CE_CHUNK_ROWS) * K * e * 2 + K * width * (4 + e)
        else:
            total += rows * K * (e + 8)
    return total


def step_passes(method: nn.Module, cfg: Config, b: int, units: tuple[nn.Module, ...] = ()) -> list[PassCost]:
    """Every pass of one micro-batch of `b` images, measured on the meta device; `units`: as measure's."""
    return [measure(name, fn, grad, modules, units) for name, fn, grad, modules in step_calls(method, cfg, b)]
