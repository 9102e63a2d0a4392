"""Benchmarks: what scripts/bench_*.py, scripts/gpu_validate.py and scripts/plan_memory.py measure,
each against a baseline measured in the same run; results in bench/results/ (docs/benchmarks.md).

Every result file carries `record()`: the device, the versions and the command that wrote it.
This package sits above the others (it drives trainer/, export/, evaluation/); nothing imports it.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def device_name() -> str:
    """The GPU(s) where there are, else the CPU model and its cores."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record(script: str, argv: list[str] | None, *modules: str) -> dict:
    """device, versions (python, torch and `modules`) and the command line of `script`."""
    import torch

    return {"device": device_name(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         **{m: version(m) for m in modules}},
            "command": shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])}


def write(path: str | Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")  # (str: paths, dtypes)
    return path
