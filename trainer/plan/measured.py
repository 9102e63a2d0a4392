"""Measured activation peaks, to check the planner against (scripts/bench_plan.py, tests/unit/test_plan.py).

Two measures of the same forward + backward:

- tensor_peak: the most bytes held at once by the tensors the step's operators return (a
  TorchDispatchMode sees every aten operator's outputs, a finalizer on each output's storage sees
  it freed), plus the inputs the step is given. That is what the planner models: saved tensors,
  gradients, recomputed blocks. It leaves out the scratch buffers a kernel allocates and frees
  inside one operator (oneDNN's reorders, the CPU flash attention's per-thread buffers), so it does
  not depend on which kernels the CPU gets or on the thread count (tests/unit/test_plan.py).
- allocator_peak: what the allocator saw above what existed before: on a GPU
  torch.cuda.max_memory_allocated, on the CPU torch.profiler's memory timeline. On the CPU it adds
  those scratch buffers, which depend on the CPU's instruction set and the number of threads
  (ViT-S/16 at 112 px, batch 16, checkpointing every block: the same 21.6 MiB of tensors, 22.2 MiB
  allocated on one thread and 26.3 MiB on two, on a 2-core Xeon with AVX-512/AMX).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models.vit import build_vit

from . import workload
from .memory import peak_bytes, recompute_bytes


class _LiveTensors(TorchDispatchMode):
    def __init__(self, existing: set[int], held: int):
        super().__init__()
        self.existing, self.live = existing, {}
        self.now = self.peak = held
        self.lock = threading.Lock()  # a CUDA backward runs on the autograd engine's device thread

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key, n = storage._cdata, storage.nbytes()
        with self.lock:
            if n == 0 or key in self.existing or key in self.live:
                return  # (a view or an in-place result: its storage is counted once)
            self.live[key] = n
            self.now += n
            self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        with self.lock:
            self.now -= self.live.pop(key)


def tensor_peak(fn: Callable[[], object], modules: Iterable[nn.Module] = (),
                inputs: Iterable[torch.Tensor] = ()) -> int:
    """Peak bytes of the tensors alive while `fn` runs: what its operators return, plus `inputs`
    (alive throughout). The parameters and buffers of `modules`, and views of them, are not counted."""
    existing = {t.untyped_storage()._cdata for m in modules for t in (*m.parameters(), *m.buffers())}
    inputs = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in inputs}
    mode = _LiveTensors(existing | set(inputs), sum(inputs.values()))
    with mode:
        fn()
    return mode.peak


def allocator_peak(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated above what existed before `fn`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def drop_gradients(model: nn.Module) -> None:
    """Free each gradient as soon as it is complete (ZeRO-3 hands them to its reduce-scatter; the
    planner counts them in their own rows)."""
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))


def backbone_estimate(arch: str, size: int, batch: int, every: int) -> int:
    """The planner's activation bytes for a bare ViT's forward + backward, as memory.activations counts them."""
    with torch.device("meta"):
        m = build_vit(arch, img_size=size).to(torch.bfloat16)
    x = torch.empty(batch, 3, size, size, device="meta", dtype=torch.bfloat16)
    m.set_grad_checkpointing(bool(every), every=every or 1)
    cost = workload.measure(arch, lambda: m.forward_features(x), True, m)
    m.set_grad_checkpointing(False)
    block = workload.measure(arch, lambda: m.forward_features(x), True, m, units=tuple(m.blocks)).unit
    return int(peak_bytes(cost.saved, cost.working, recompute_bytes(block, len(m.blocks), every)))


def backbone_case(case: str, device: torch.device) -> dict:
    """One bf16 forward + backward of a ViT ("arch:image size:batch:checkpoint every k", 0: none):
    the planner's estimate against both measured peaks (the second step of two: the first one
    allocates the kernels' first-call state)."""
    arch, size, batch, every = case.split(":")
    size, batch, every = int(size), int(batch), int(every)
    torch.manual_seed(0)
    with torch.device(device):
        m = build_vit(arch, img_size=size).to(torch.bfloat16)
    m.set_grad_checkpointing(bool(every), every=every or 1)
    drop_gradients(m)
    x = torch.randn(batch, 3, size, size, device=device).to(torch.bfloat16)

    def step():
        out = m.forward_features(x)
        (out["patch"].float().square().mean() + out["cls"].float().mean()).backward()

    step()
    est = backbone_estimate(arch, size, batch, every)
    tensors = tensor_peak(step, [m], [x])
    allocated = allocator_peak(step, device) + x.untyped_storage().nbytes()  # (the input existed before)
    return {"case": case, "arch": arch, "image_size": size, "batch": batch, "checkpoint_every": every,
            "estimate_bytes": est, "tensor_peak_bytes": tensors, "allocator_peak_bytes": allocated,
            "error": est / tensors - 1, "allocator_error": est / allocated - 1}
