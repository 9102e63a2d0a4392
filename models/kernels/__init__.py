"""Fused kernels (Triton) and their PyTorch references, chosen by `run.kernels`."""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)


def triton_available() -> tuple[bool, str]:
    """(can Triton kernels run in this process?, why not)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "the triton package is not installed"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter, slowly)"


def self_check(head_dim: int, device: str | torch.device) -> None:
    """Run the kernels training uses (attention: fixed, fixed with BEiT's relative position bias, and
    packed; the softmax-CE forward and backward, through its fused-linear form, with pairing and
    column sums; the hard-label CE, BEiT's) once at a small size on `device` against their
    references; raise AssertionError naming the kernel that disagrees (or whatever Triton raises
    when it cannot compile one)."""
    from .attention import attention_reference, attention_varlen_reference
    from .attention_triton import flash_attention, flash_attention_varlen
    from .softmax_ce import (
        fused_linear_softmax_ce,
        fused_linear_softmax_ce_reference,
        hard_ce_reference,
        hard_ce_triton,
    )

    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.bfloat16, norm=False):
        x = torch.randn(*shape, generator=g)
        return (torch.nn.functional.normalize(x, dim=-1) if norm else x).to(device, dtype)

    cu = torch.tensor([0, 13, 50, 87], dtype=torch.int32, device=device)
    teacher, center = rand(40, 300, dtype=torch.float32) * 5, rand(300, dtype=torch.float32) * 0.1
    rows = torch.randperm(40, generator=g)[:30].to(device)
    sums = [torch.zeros(300, device=device) for _ in range(2)]
    labels = torch.randint(0, 300, (30,), generator=g).to(device)
    cases = {  # name: (kernel, reference, inputs); both get the same inputs (bf16 but BEiT's fp32 bias)
        "attention": (flash_attention, attention_reference, [rand(2, 2, 50, head_dim) for _ in range(3)]),
        "packed attention": (lambda *x: flash_attention_varlen(*x, cu, 50),
                             lambda *x: attention_varlen_reference(*x, cu), [rand(87, 2, head_dim) for _ in range(3)]),
        "fused linear softmax-CE": (
            lambda *x: fused_linear_softmax_ce(*x, teacher, center, 0.1, 0.04, rows, sums[0]),
            lambda *x: fused_linear_softmax_ce_reference(*x, teacher, center, 0.1, 0.04, rows, sums[1]),
            [rand(30, 24, norm=True), rand(300, 24, norm=True)]),
        # last, so that the cases above draw the inputs they drew before it was added
        "attention with bias": (flash_attention, lambda q, k, v, b: attention_reference(q, k, v, bias=b),
                                [rand(2, 2, 50, head_dim) for _ in range(3)] + [rand(2, 50, 50, dtype=torch.float32)]),
        "hard-label CE": (lambda x: hard_ce_triton(x, labels), lambda x: hard_ce_reference(x, labels),
                          [rand(30, 300) * 3]),
    }
    for name, (kernel, reference, inputs) in cases.items():
        outs = []
        for fn in (kernel, reference):
            xs = [x.clone().requires_grad_() for x in inputs]
            y = fn(*xs).float()
            (y * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
            outs.append([y] + [x.grad.float() for x in xs])
        for i, (a, b) in enumerate(zip(*outs)):
            what = "output" if i == 0 else f"gradient {i}"
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2, msg=lambda m, n=name, x=what: f"{n} {x}: {m}")
    torch.testing.assert_close(sums[0], sums[1], atol=1e-3, rtol=1e-4, msg="softmax-CE column sums differ")


@functools.cache
def resolve(impl: str, head_dim: int, device: str = "cuda") -> tuple[str, str]:
    """('triton' or 'torch', why) for `run.kernels: impl`. 'auto' is 'triton' where Triton and a CUDA
    device exist and `self_check` passes there (so a kernel that cannot compile on this GPU costs
    the speed, not the run), and the references otherwise; `why` says why it fell back."""
    if impl != "auto":
        return impl, ""
    ok, why = triton_available()
    if not ok or (torch.device(device).type == "cuda" and not torch.cuda.is_available()):
        why = why or "no CUDA device"
        log.info("run.kernels auto: the PyTorch references (%s)", why)
        return "torch", why
    try:
        self_check(head_dim, device)
    except Exception as e:  # any failure means: do not train with the kernels here
        why = f"the Triton kernels failed their self-check on {device}: {type(e).__name__}: {e}"
        log.warning("run.kernels auto: the PyTorch references (%s)", why)
        return "torch", why
    log.info("run.kernels auto: the Triton kernels (self-check passed on %s, head dim %d)", device, head_dim)
    return "triton", ""
