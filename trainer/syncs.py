"""Count what would make the host wait for a GPU, on any device (the CPU included).

On a GPU these block the Python thread until the GPU has caught up, so the host can no longer run
ahead queueing kernels: reading a value (`.item()`, `.tolist()`, `bool(t)`), ops whose output size
depends on the data (`nonzero`, boolean-mask indexing, `masked_select`, `unique`,
`repeat_interleave` without `output_size`, `bincount`), device-to-host copies (`.cpu()`) and blocking
host-to-device copies (`torch.tensor(..., device=...)`). `SyncCounter` records each with the line of
project code that caused it; on the CPU it counts what the same code would do on a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
# `torch.tensor(..., device=HOST)`: made on the host on purpose (a scalar for the device), so no copy,
# where the same call with the run's device (the CPU too, on this machine) counts as one
HOST = torch.device("cpu")
# ops that read device memory on the host before they can return
READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
         "unique_consecutive", "is_nonzero", "equal", "bincount", "histc"}


def _op(func) -> str:
    return func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


class SyncCounter(TorchDispatchMode):
    """with SyncCounter() as c: ...; c.total, c.by_site ({(what, 'file:line'): n})."""

    def __init__(self):
        super().__init__()
        self.by_site: collections.Counter = collections.Counter()
        self._patches = contextlib.ExitStack()
        self._depth = 0

    @property
    def total(self) -> int:
        return sum(self.by_site.values())

    def _site(self) -> str:
        """'file:line' of the project code that caused it, with DeepSpeed's own line where it was inside."""
        inner = None
        for frame in reversed(traceback.extract_stack()[:-3]):
            path = Path(frame.filename)
            if "deepspeed" in path.parts and inner is None:
                inner = "deepspeed/" + "/".join(path.parts[path.parts.index("deepspeed") + 1:]) + f":{frame.lineno}"
            if ROOT in path.parents and path.name != "syncs.py" and ".venv" not in path.parts:
                here = f"{path.relative_to(ROOT)}:{frame.lineno}"
                return f"{here} ({inner})" if inner else here
        return inner or "?"

    def record(self, what: str) -> None:
        if self._depth == 0:  # a Python-level read that dispatches its own op counts once
            self.by_site[(what, self._site())] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op(func)
        if name in READS or (name == "repeat_interleave" and not (kwargs or {}).get("output_size")) \
                or (name in ("index", "index_put", "index_put_") and _bool_index(args)):
            self.record(name if name not in ("index", "index_put", "index_put_") else f"{name} (boolean mask)")
        return func(*args, **(kwargs or {}))

    def _wrap(self, owner, attr: str, what: str, when=lambda *a, **k: True) -> None:
        real = getattr(owner, attr)
        counter = self

        def wrapped(*args, **kwargs):
            if when(*args, **kwargs):
                counter.record(what)
            counter._depth += 1
            try:
                return real(*args, **kwargs)
            finally:
                counter._depth -= 1

        setattr(owner, attr, wrapped)
        self._patches.callback(setattr, owner, attr, real)

    def __enter__(self):
        self._wrap(torch.Tensor, "tolist", "tolist")
        self._wrap(torch.Tensor, "item", "item")
        self._wrap(torch.Tensor, "cpu", "cpu")
        # torch.tensor(data, device=...) from host data: a blocking host-to-device copy on a GPU
        self._wrap(torch, "tensor", "torch.tensor(..., device=)",
                   lambda *a, **k: k.get("device") is not None and k["device"] is not HOST)
        return super().__enter__()

    def __exit__(self, *exc):
        self._patches.close()
        self._patches = contextlib.ExitStack()
        return super().__exit__(*exc)
