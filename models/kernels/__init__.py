"""Fused kernels (Triton) and their PyTorch references, chosen by `run.kernels`."""

from __future__ import annotations

import os


def triton_available() -> tuple[bool, str]:
    """(can Triton kernels run in this process?, why not)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "the triton package is not installed"
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter, slowly)"
