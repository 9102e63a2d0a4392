"""Fused kernels (Triton) and their PyTorch references, chosen by `run.kernels`."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Messages of CUDA errors that leave the context unusable: every later CUDA call fails the same way,
# so falling back to the references would only move the crash to the first step.
STICKY_CUDA_ERRORS = ("illegal memory access", "illegal address", "unspecified launch failure", "misaligned address",
                      "illegal instruction", "device-side assert", "an illegal", "context is destroyed")


class KernelFault(RuntimeError):
    """The kernels' self-check broke the CUDA context: the run cannot go on in this process."""


@dataclass(frozen=True)
class CheckShapes:
    """What the self-check runs: the run's head dim, its sequence lengths (each crop's tokens), its
    softmax-CE widths K and hard-label CE widths. Two sequences per length and two heads: enough to
    cover every tile loop the kernels have at those sizes in a bounded time."""

    head_dim: int
    tokens: tuple[int, ...] = (50,)
    classes: tuple[int, ...] = (300,)
    hard_classes: tuple[int, ...] = (300,)

    def describe(self) -> str:
        return (f"head dim {self.head_dim}, tokens {'/'.join(map(str, self.tokens))} (fixed, packed, biased), "
                f"softmax-CE K {'/'.join(map(str, self.classes)) or '-'}, "
                f"hard CE K {'/'.join(map(str, self.hard_classes)) or '-'}")


# The Triton releases the kernels are tested with (pyproject.toml declares the same range); older ones
# call None.zero_() in the autotuner's reset_to_zero when BEiT's bias is absent.
TESTED_TRITON = ((3, 8), (3, 9))


def triton_available() -> tuple[bool, str]:
    """(can Triton kernels run in this process?, why not)."""
    try:
        import triton
    except ImportError:
        return False, "the triton package is not installed"
    version = tuple(int(x) for x in triton.__version__.split("+")[0].split(".")[:2])
    low, high = TESTED_TRITON
    if not low <= version < high:
        return False, (f"triton {triton.__version__} is outside the range the kernels are tested with "
                       f"(>={'.'.join(map(str, low))},<{'.'.join(map(str, high))})")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter, slowly)"


def self_check(shapes: CheckShapes | int, device: str | torch.device) -> None:
    """Run the kernels training uses (attention: fixed, fixed with BEiT's relative position bias, and
    packed, at each of the run's sequence lengths; the softmax-CE forward and backward through its
    fused-linear form, in several row chunks, with pairing and column sums, at each K; the hard-label
    CE, BEiT's) on `device` against their references; raise AssertionError naming the kernel and shape
    that disagree (or whatever Triton raises when it cannot compile one). Every tensor is made with
    an explicit dtype and device, so the check means the same inside `deepspeed.zero.Init`."""
    from .attention import attention_reference, attention_varlen_reference
    from .attention_triton import flash_attention, flash_attention_varlen
    from .softmax_ce import (
        fused_linear_softmax_ce,
        fused_linear_softmax_ce_reference,
        hard_ce_reference,
        hard_ce_triton,
    )

    if isinstance(shapes, int):
        shapes = CheckShapes(shapes)
    device, d, heads = torch.device(device), shapes.head_dim, 2
    g = torch.Generator().manual_seed(0)
    f32 = torch.float32

    def rand(*shape, dtype=torch.bfloat16, norm=False):
        x = torch.randn(*shape, generator=g, dtype=f32, device="cpu")
        return (torch.nn.functional.normalize(x, dim=-1) if norm else x).to(device, dtype)

    cases = {}  # name: (kernel, reference, inputs); both get the same inputs (bf16 but BEiT's fp32 bias)
    for n in shapes.tokens:
        cases[f"attention N={n}"] = (flash_attention, attention_reference, [rand(2, heads, n, d) for _ in range(3)])
        cases[f"attention with bias N={n}"] = (
            flash_attention, lambda q, k, v, b: attention_reference(q, k, v, bias=b),
            [rand(2, heads, n, d) for _ in range(3)] + [rand(heads, n, n, dtype=f32)])
    lengths = [n for n in shapes.tokens for _ in range(2)]
    cu = torch.tensor([0] + lengths, dtype=torch.int32, device="cpu").cumsum(0, dtype=torch.int32).to(device)
    total, longest = int(sum(lengths)), max(lengths)
    cases["packed attention"] = (lambda *x: flash_attention_varlen(*x, cu, longest),
                                 lambda *x: attention_varlen_reference(*x, cu),
                                 [rand(total, heads, d) for _ in range(3)])
    sums = []
    rows_n, teacher_n, width = 40, 48, 64  # 40 student rows in chunks of 16: three chunks, the last one short
    for k in shapes.classes:
        teacher, center = rand(teacher_n, k, dtype=f32) * 5, rand(k, dtype=f32) * 0.1
        rows = torch.randperm(teacher_n, generator=g)[:rows_n].to(device)
        pair = [torch.zeros(k, dtype=f32, device=device) for _ in range(2)]
        sums.append((k, pair))
        cases[f"fused linear softmax-CE K={k}"] = (
            lambda h, w, t=teacher, c=center, r=rows, s=pair[0]: fused_linear_softmax_ce(
                h, w, t, c, 0.1, 0.04, r, s, chunk_rows=16),
            lambda h, w, t=teacher, c=center, r=rows, s=pair[1]: fused_linear_softmax_ce_reference(
                h, w, t, c, 0.1, 0.04, r, s),
            [rand(rows_n, width, norm=True), rand(k, width, norm=True)])
    for k in shapes.hard_classes:
        labels = torch.randint(0, k, (rows_n,), generator=g).to(device)
        cases[f"hard-label CE K={k}"] = (lambda x, y=labels: hard_ce_triton(x, y),
                                         lambda x, y=labels: hard_ce_reference(x, y), [rand(rows_n, k) * 3])
    for name, (kernel, reference, inputs) in cases.items():
        outs = []
        for fn in (kernel, reference):
            xs = [x.clone().requires_grad_() for x in inputs]
            y = fn(*xs).float()
            weights = torch.linspace(-1, 1, y.numel(), dtype=f32, device="cpu").to(device).view_as(y)
            (y * weights).sum().backward()
            outs.append([y] + [x.grad.float() for x in xs])
        for i, (a, b) in enumerate(zip(*outs)):
            what = "output" if i == 0 else f"gradient {i}"
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2, msg=lambda m, n=name, x=what: f"{n} {x}: {m}")
    for k, (kernel_sum, reference_sum) in sums:
        torch.testing.assert_close(kernel_sum, reference_sum, atol=1e-3, rtol=1e-4,
                                   msg=lambda m, k=k: f"softmax-CE column sums differ at K={k}: {m}")


@contextlib.contextmanager
def outside_zero_init():
    """DeepSpeed's `zero.Init` patches the tensor constructors (floats become bf16 even with an explicit
    dtype=float32, the device is filled in): suspend that while the check runs, if it is active
    (DeepSpeed's own switch, the one `deepspeed.initialize` uses inside the context)."""
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    if zero is None or zero.top_level_context is None:
        yield
        return
    zero.shutdown_init_context()
    try:
        yield
    finally:
        zero.restore_init_context()


def context_broken(error: BaseException) -> bool:
    """Whether `error` is a CUDA error after which this process cannot use the GPU again."""
    text = f"{type(error).__name__}: {error}".lower()
    return ("cuda" in text or "accelerator" in text) and any(s in text for s in STICKY_CUDA_ERRORS)


@functools.cache
def resolve(impl: str, shapes: CheckShapes | int, device: str = "cuda") -> tuple[str, str]:
    """('triton' or 'torch', why) for `run.kernels: impl`. 'auto' is 'triton' where Triton can run on
    `device` (a CUDA GPU, or the CPU under TRITON_INTERPRET=1) and `self_check` passes there at
    `shapes` (a CheckShapes, or a head dim for the toy shapes), so a kernel that cannot compile on this
    GPU costs the speed, not the run; the references otherwise; `why` says why it fell back. A check
    that breaks the CUDA context raises KernelFault: nothing could run on that context."""
    if impl != "auto":
        return impl, ""
    if isinstance(shapes, int):
        shapes = CheckShapes(shapes)
    ok, why = triton_available()
    if not ok or (torch.device(device).type == "cuda" and not torch.cuda.is_available()):
        why = why or "no CUDA device"
        log.info("run.kernels auto: the PyTorch references (%s)", why)
        return "torch", why
    start = time.perf_counter()
    try:
        with outside_zero_init():
            self_check(shapes, device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()  # an asynchronous launch failure surfaces here, not later in step 1
    except Exception as e:  # any failure means: do not train with the kernels here
        if context_broken(e):
            raise KernelFault(f"the Triton kernels' self-check broke the CUDA context on {device} "
                              f"({shapes.describe()}): {type(e).__name__}: {str(e).splitlines()[0]}; "
                              "rerun with run.kernels=torch") from e
        why = f"the Triton kernels failed their self-check on {device}: {type(e).__name__}: {e}"
        log.warning("run.kernels auto: the PyTorch references (%s)", why)
        return "torch", why
    log.info("run.kernels auto: the Triton kernels (self-check passed on %s in %.1f s: %s)", device,
             time.perf_counter() - start, shapes.describe())
    return "triton", ""


# ----------------------------------------------------------------------------- choosing an implementation


def _entry(table: dict, impl: str, what: str):
    name = resolve(impl, 64)[0]
    if name not in table:
        raise ValueError(f"{what} implementation {impl!r} is not one of {sorted(table)} or 'auto'")
    return table[name]


def get_attention(impl: str = "auto"):
    """The attention function for `impl`: 'torch', 'triton', or 'auto' (`resolve`)."""
    from .attention import IMPLEMENTATIONS

    return _entry(IMPLEMENTATIONS, impl, "attention")


def get_attention_varlen(impl: str = "auto"):
    """The packed (cu_seqlens) attention for `impl`, chosen like `get_attention`."""
    from .attention import VARLEN_IMPLEMENTATIONS

    return _entry(VARLEN_IMPLEMENTATIONS, impl, "attention")


def get_softmax_ce(impl: str = "auto", fused_linear: bool = False):
    """The loss for `impl`: 'torch', 'triton' or 'auto' (`resolve`). With `fused_linear`, the variant
    that takes (hidden, prototype weight) instead of logits."""
    from .softmax_ce import FUSED_LINEAR_IMPLEMENTATIONS, IMPLEMENTATIONS

    return _entry(FUSED_LINEAR_IMPLEMENTATIONS if fused_linear else IMPLEMENTATIONS, impl, "softmax-CE")


def get_hard_ce(impl: str = "auto"):
    """The hard-label cross-entropy (BEiT) for `impl`, chosen like `get_softmax_ce`."""
    from .softmax_ce import HARD_CE_IMPLEMENTATIONS

    return _entry(HARD_CE_IMPLEMENTATIONS, impl, "hard-label CE")
