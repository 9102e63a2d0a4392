"""Every Triton kernel of models/kernels/ compiled for A100 (sm_80) and H100 (sm_90) without a GPU
(scripts/compile_kernels.py is the command line).

Each kernel is compiled exactly as the runtime would compile it on the GPU: the PyTorch wrappers
(`flash_attention`, `flash_attention_varlen`, the softmax-CE autograd functions) run on meta
tensors at real model shapes with every kernel launch intercepted, and each intercepted launch is
bound, specialised (16-byte alignment, integers divisible by 16) and compiled by Triton's own
binder and `triton.compile` for a `GPUTarget`, once per autotune config. The wheel's `cuobjdump`
and `nvdisasm` then give, per kernel x config x target: registers per thread, local memory and
stack (spills), shared memory against the device's limit, and the matrix instructions in the SASS
(HMMA: mma.sync, sm_80 and sm_90; HGMMA: wgmma, sm_90 only). A config has a problem when it does
not compile, spills, needs more shared memory than the device has, or, on sm_90, runs attention
without HGMMA.

Import it with TRITON_INTERPRET unset: the interpreter replaces the kernels it compiles.
"""

from __future__ import annotations

import functools
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import attention_triton, softmax_ce

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}
SMEM_LIMIT = {"sm_80": 166912, "sm_90": 232448}  # bytes per block with the opt-in (A100 163 KiB, H100 227 KiB)
HEAD_DIMS = (64, 80, 88, 104, 128)  # ViT-S/B/L: 64, H/14: 80, g/14: 88, G/14: 104, and 128
# (tokens, heads) of a model with that head dim at 224 pixels: the shapes set which integers are
# divisible by 16, which Triton specialises on.
SHAPES = {64: (197, 16), 80: (257, 16), 88: (257, 16), 104: (257, 16), 128: (257, 12)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
EXTRA_DTYPES = {"fp32": torch.float32}  # run.precision fp32: IEEE dots, no tensor cores; only when asked for
LAYOUTS = ("fixed", "varlen", "bias")  # [B, H, N, D]; packed crops with cu_seqlens; BEiT's relative position bias
ATTENTION = ("_attn_fwd", "_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass
class Launch:
    kernel: str
    case: str  # what the wrapper was run on
    args: tuple
    kwargs: dict
    configs: list[dict]  # one per autotune config, or the launch's own options


@dataclass
class Result:
    kernel: str
    case: str
    target: str
    config: str
    registers: int | None = None
    local_bytes: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    shared_limit: int | None = None
    hmma: int = 0
    hgmma: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def problems(self) -> list[str]:
        if self.error:
            return ["compile error"]
        out = []
        if self.local_bytes or self.stack_bytes:
            out.append("spills")
        if self.shared_bytes > self.shared_limit:
            out.append("shared memory over the limit")
        if self.target == "sm_90" and self.kernel in ATTENTION and self.kernel != "_attn_bwd_delta" and not self.hgmma:
            out.append("no HGMMA on sm_90" + (" (HMMA)" if self.hmma else ""))
        return out


def kernel_names() -> list[str]:
    return sorted(_kernels())


def _kernels() -> dict[str, object]:
    """Every Triton kernel the two kernel modules define, by name."""
    out = {}
    for module in (attention_triton, softmax_ce):
        for name, obj in vars(module).items():
            if isinstance(obj, (Autotuner, JITFunction)):  # kernels and @triton.jit helpers; helpers never launch
                out[name] = obj
    return out


def _config_label(options: dict) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in options.items() if k.startswith("BLOCK"))
    return f"{blocks} w{options.get('num_warps', 4)} s{options.get('num_stages', 3)}".strip()


def capture(run_wrappers) -> list[Launch]:
    """Every kernel launch `run_wrappers()` makes, intercepted (nothing runs)."""
    launches: list[Launch] = []
    kernels = _kernels()

    def interceptor(name, obj, case):
        def run(*args, grid=None, warmup=False, **kwargs):
            if isinstance(obj, Autotuner):  # the configs its pruning offers for this launch
                obj.nargs = dict(zip(obj.arg_names, args))
                configs = [c.all_kwargs() for c in obj.prune_configs(kwargs)]
            else:  # a plain launch: Triton's defaults for what it does not set
                configs = [{"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}]
            launches.append(Launch(name, case[0], args, kwargs, configs))
        return run

    case = [""]
    for name, obj in kernels.items():
        obj.run = interceptor(name, obj, case)
    try:
        for label, fn in run_wrappers():
            case[0] = label
            fn()
    finally:
        for obj in kernels.values():
            del obj.run
    return launches


def model_launches(head_dims=HEAD_DIMS, dtypes=tuple(DTYPES), layouts=LAYOUTS, pairs=None,
                   batch: int = 4) -> list[Launch]:
    """The launches of one training step's attention (forward and backward) and losses, per shape;
    `pairs`: only these (head dim, layout) combinations."""
    meta = torch.device("meta")

    def wrappers():
        for d in head_dims:
            n, h = SHAPES[d]
            for dt_name in dtypes:
                dt = {**DTYPES, **EXTRA_DTYPES}[dt_name]
                for layout in layouts:
                    if pairs and (d, layout) not in pairs:
                        continue

                    def attention(d=d, n=n, h=h, dt=dt, layout=layout):
                        # the custom ops' own functions (the ops would run their fake versions on meta)
                        bias, cu, longest = None, None, 0
                        if layout == "varlen":  # 2 global + 2 local crops of a /16 model packed in one row
                            lengths = [n, n, 37, 37]
                            q, k, v = (torch.empty(sum(lengths), h, d, device=meta, dtype=dt) for _ in range(3))
                            cu = torch.empty(len(lengths) + 1, device=meta, dtype=torch.int32)
                            longest = max(lengths)
                        else:
                            q, k, v = (torch.empty(batch, h, n, d, device=meta, dtype=dt) for _ in range(3))
                            if layout == "bias":
                                bias = torch.empty(h, n, n, device=meta, dtype=dt)
                        o, lse = attention_triton.attention_forward(q, k, v, bias, cu, longest)
                        attention_triton.attention_backward(torch.empty_like(o), q, k, v, o, lse, bias, cu, longest,
                                                            bias is not None)
                    yield f"attention D={d} {dt_name} {layout}", attention
        for dt_name in dtypes:
            dt = {**DTYPES, **EXTRA_DTYPES}[dt_name]

            def losses(dt=dt):
                rows, k = 1024, 8192  # prototypes: iBOT 8192, DINOv2 65536 (same code, larger K loop)
                s = torch.empty(rows, k, device=meta, dtype=dt, requires_grad=True)
                t = torch.empty(rows, k, device=meta, dtype=dt)
                center = torch.empty(k, device=meta, dtype=torch.float32)
                idx = torch.empty(rows, device=meta, dtype=torch.int64)
                for pairing in ((None, None, None), (idx, None, None),
                                (idx, torch.empty(64, device=meta, dtype=torch.int64),
                                 torch.empty(k, device=meta, dtype=torch.float32))):
                    softmax_ce._SoftmaxCE.apply(s, t, center, 0.1, 0.04, *pairing).sum().backward()
                labels = torch.empty(rows, device=meta, dtype=torch.int64)
                softmax_ce._HardCE.apply(s, labels).sum().backward()
            yield f"softmax-CE {dt_name}", losses

    return capture(wrappers)


def _dedupe(launches: list[Launch]) -> list[Launch]:
    """One launch per distinct (kernel, specialisation): the iBOT losses launch the same kernel often."""
    seen, out = set(), []
    for ln in launches:
        kind = tuple((type(a).__name__, str(getattr(a, "dtype", ""))) if isinstance(a, torch.Tensor) or a is None
                     else (type(a).__name__, a % 16 == 0 if isinstance(a, int) else None) for a in ln.args)
        key = (ln.kernel, ln.case, kind, tuple(sorted(ln.kwargs.items())))
        if key not in seen:
            seen.add(key)
            out.append(ln)
    return out


def compile_one(ln: Launch, config: dict, target_name: str) -> Result:
    """Bind, specialise and compile as JITFunction.run does on a GPU, for `target_name`."""
    obj = _kernels()[ln.kernel]
    fn = obj.fn if isinstance(obj, Autotuner) else obj
    res = Result(ln.kernel, ln.case, target_name, _config_label(config), shared_limit=SMEM_LIMIT[target_name])
    target = TARGETS[target_name]
    backend = make_backend(target)
    t0 = time.perf_counter()
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        kwargs = {**ln.kwargs, **config}
        bound, specialization, options = binder(*ln.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - reported per config, the sweep goes on
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        return res
    res.seconds = round(time.perf_counter() - t0, 2)
    res.shared_bytes = int(kernel.metadata.shared)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(BIN / "nvdisasm"), f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    res.registers, res.stack_bytes, res.local_bytes = int(fields["REG"]), int(fields["STACK"]), int(fields["LOCAL"])
    res.hgmma = len(re.findall(r"\bHGMMA\.", sass))
    res.hmma = len(re.findall(r"\bHMMA\.", sass))
    return res


class Selection(NamedTuple):
    """Which launches a sweep compiles (hashable: each worker process captures them once)."""

    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]
    layouts: tuple[str, ...]
    pairs: tuple[tuple[int, str], ...] | None
    kernels: tuple[str, ...] | None


@functools.cache
def _launches(sel: Selection) -> list[Launch]:  # meta tensors: milliseconds
    return select(model_launches(sel.head_dims, sel.dtypes, sel.layouts, sel.pairs), sel.kernels)


def _job(args: tuple[Selection, int, int, str]) -> Result:
    sel, i, c, target = args
    ln = _launches(sel)[i]
    return compile_one(ln, ln.configs[c], target)


def select(launches: list[Launch], kernels: tuple[str, ...] | None) -> list[Launch]:
    out = _dedupe(launches)
    return [ln for ln in out if not kernels or ln.kernel in kernels]


SUBSETS = {  # ci: both tile widths (64; 88 padded to 128), every kernel and shipped config, bf16, sm_90
    "ci": {"head_dims": (64, 88), "dtypes": ("bf16",), "layouts": LAYOUTS, "targets": ("sm_90",),
           "pairs": ((64, "fixed"), (64, "bias"), (88, "fixed"), (88, "varlen"))},
}


def sweep(head_dims, dtypes, layouts, targets, kernels=None, workers: int = 1, pairs=None,
          say=lambda line: None) -> list[Result]:
    """Compile every launch of the selection with every config its autotuner offers, for each target."""
    sel = Selection(tuple(head_dims), tuple(dtypes), tuple(layouts), tuple(pairs) if pairs else None,
                    tuple(kernels) if kernels else None)
    launches = _launches(sel)
    jobs = [(sel, i, c, t) for t in targets for i, ln in enumerate(launches) for c in range(len(ln.configs))]
    say(f"{len(jobs)} compilations ({len(launches)} launches x configs x {len(targets)} targets), "
        f"{workers} process(es)")
    if workers <= 1:
        return [_job(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_job, jobs, chunksize=4))


def table(results: list[Result]) -> str:
    head = (f"{'kernel':16} {'case':30} {'target':6} {'config':34} {'regs':>4} {'spill':>5} {'smem KiB':>8} "
            f"{'HMMA':>4} {'HGMMA':>5}  problems")
    lines = [head, "-" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"{r.kernel:16} {r.case:30} {r.target:6} {r.config:34} {r.error}")
            continue
        spill = r.local_bytes + r.stack_bytes
        lines.append(f"{r.kernel:16} {r.case:30} {r.target:6} {r.config:34} {r.registers:>4} {spill:>5} "
                     f"{r.shared_bytes / 1024:>8.1f} {r.hmma:>4} {r.hgmma:>5}  {', '.join(r.problems)}")
    return "\n".join(lines)
