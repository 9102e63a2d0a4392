"""Whether this GPU machine runs mimscale right, in about ten minutes (scripts/gpu_validate.py is the
command line; `size` "cpu" runs the same code at tiny shapes in Triton's interpreter, for CI).

Sections, each a list of rows (section, name, ok, and the figures that decided it):
  env      versions, nvidia-smi, where Triton's cache is (a network file system makes every rank
           compile slowly and can corrupt it)
  kernels  each Triton kernel against an fp32 reference at production shapes in bf16, forward and
           backward; passes within 2x the error of PyTorch's own bf16 SDPA (or 2x bf16 rounding)
           at the same shapes; the start-up self-check at each head dim, also inside zero.Init;
           the deferred colour work against PIL
  speed    time and peak memory of each kernel against PyTorch SDPA (flash, memory-efficient) and
           the naive loss
  plan     the memory planner against torch.cuda.max_memory_allocated at ViT-L shapes
  train    ibot_l16 on builtin:digits with run.kernels triton and torch (first losses alike, step
           time and its breakdown, MFU, peak memory against the plan), 8-step smoke runs of BEiT-L
           and ibot_h14, and a 2-rank run when 2 GPUs are visible
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import ROOT

SECTIONS = ("kernels", "speed", "plan", "train")

# (production, --cpu-smoke) sizes
ATTENTION = {
    "gpu": dict(B=64, H=16, N=(197, 257), D=(64, 80, 88, 104, 128), bias_B=128),
    "cpu": dict(B=2, H=2, N=(17, 26), D=(16, 24), bias_B=2),
}
PACKED = {"gpu": [(16, 2, 197, 10, 37), (16, 2, 257, 10, 50)], "cpu": [(2, 2, 17, 2, 5)]}  # images x (G x N + L x n)
SOFTMAX_K = {"gpu": (8192, 65536, 131072), "cpu": (300, 2100)}
HARD_K = {"gpu": 8192, "cpu": 300}
RUN = {
    "gpu": dict(
        config="configs/ibot_l16_in22k.yaml",
        steps=25,
        batch=32,
        smokes=[("BEiT-L", "configs/beit_vit_l16_in22k.yaml"), ("ibot_h14", "configs/ibot_h14_in22k.yaml")],
    ),
    # a model small enough for Triton's interpreter; the BEiT smoke at its tiny size
    "cpu": dict(
        config="configs/ibot_vit_tiny.yaml",
        steps=3,
        batch=4,
        extra=["model.arch=vit_test", "model.patch_size=8", "ibot.out_dim=64", "ibot.head_hidden_dim=32",
               "ibot.head_bottleneck_dim=16"],
        smokes=[],
    ),
}


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def check(name: str, ours, reference, tolerance: float, extra: dict | None = None) -> dict:
    """ours / reference: lists of tensors (outputs, then gradients)."""
    errors = [rel_err(a, b) for a, b in zip(ours, reference)]
    worst = max(errors)
    return {
        "section": "kernels",
        "name": name,
        "error": worst,
        "tolerance": tolerance,
        "ok": worst <= tolerance,
        **(extra or {}),
    }


def run_grads(fn, inputs, weights_seed=0):
    import torch

    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    y = fn(*xs)
    g = torch.Generator(device="cpu").manual_seed(weights_seed)
    w = torch.randn(y.shape, generator=g).to(y.device, torch.float32)
    (y.float() * w).sum().backward()
    return [y.detach()] + [x.grad for x in xs if x.requires_grad]


def attention_checks(size: str, device) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from models.kernels.attention import attention_reference, attention_varlen_reference
    from models.kernels.attention_triton import flash_attention, flash_attention_varlen

    a, rows = ATTENTION[size], []
    bf16 = torch.bfloat16

    def fp32(fn):  # the reference: fp32 math on the same bf16 inputs
        return lambda *x, **k: fn(*(t.float() for t in x[:3]), *x[3:], **k)

    for n in a["N"]:
        for d in a["D"]:
            for bias in (False, True):
                if bias and (n != a["N"][0] or d != a["D"][0]):
                    continue  # BEiT's case: N = 197 (ViT-B/16), one head dim
                b = a["bias_B"] if bias else a["B"]
                q, k, v = (torch.randn(b, a["H"], n, d, device=device, dtype=bf16) for _ in range(3))
                extra = [torch.randn(a["H"], n, n, device=device)] if bias else []
                ref = run_grads(
                    lambda *x: fp32(attention_reference)(*x[:3], bias=x[3] if bias else None), [q, k, v, *extra]  # noqa: B023 (called at once)
                )
                ours = run_grads(lambda *x: flash_attention(*x[:3], bias=x[3] if bias else None), [q, k, v, *extra])  # noqa: B023 (called at once)
                sdpa = run_grads(
                    lambda *x: F.scaled_dot_product_attention(*x[:3], attn_mask=x[3].to(x[0].dtype) if bias else None),  # noqa: B023 (called at once)
                    [q, k, v, *extra],
                )
                tol = max(2 * max(rel_err(s, r) for s, r in zip(sdpa, ref)), 8 * 2**-8)  # 8 bf16 ulps at least
                rows.append(check(f"attention B={b} H={a['H']} N={n} D={d}{' bias' if bias else ''}", ours, ref, tol))
    for images, g, n_global, loc, n_local in PACKED[size]:
        lens = ([n_global] * g + [n_local] * loc) * images
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        q, k, v = (
            torch.randn(sum(lens), a["H"], 64 if size == "gpu" else 16, device=device, dtype=bf16) for _ in range(3)
        )
        ref = run_grads(lambda *x: fp32(attention_varlen_reference)(*x, cu), [q, k, v])  # noqa: B023 (called at once)
        ours = run_grads(lambda *x: flash_attention_varlen(*x, cu, n_global), [q, k, v])  # noqa: B023 (called at once)
        rows.append(check(f"packed crops {images} x ({g} x {n_global} + {loc} x {n_local})", ours, ref, 2 * 2**-7))
    return rows


def loss_checks(size: str, device) -> list[dict]:
    import torch

    from models.kernels.softmax_ce import (
        fused_linear_softmax_ce,
        fused_linear_softmax_ce_reference,
        hard_ce_reference,
        hard_ce_triton,
    )

    rows, R, C = [], (4096 if size == "gpu" else 40), (256 if size == "gpu" else 24)
    for k in SOFTMAX_K[size]:
        h = torch.nn.functional.normalize(torch.randn(R, C, device=device), dim=-1).bfloat16()
        w = torch.nn.functional.normalize(torch.randn(k, C, device=device), dim=-1).bfloat16()
        teacher, center = torch.randn(R, k, device=device) * 5, torch.zeros(k, device=device)
        ref = run_grads(
            lambda a, b: fused_linear_softmax_ce_reference(a.float(), b.float(), teacher, center, 0.1, 0.04), [h, w]  # noqa: B023 (called at once)
        )
        ours = run_grads(lambda a, b: fused_linear_softmax_ce(a, b, teacher, center, 0.1, 0.04), [h, w])  # noqa: B023 (called at once)
        rows.append(check(f"fused softmax-CE R={R} K={k}", ours, ref, 2 * 2**-7))
    k = HARD_K[size]
    x = (torch.randn(R, k, device=device) * 3).bfloat16()
    labels = torch.randint(0, k, (R,), device=device)
    rows.append(
        check(
            f"hard-label CE K={k}",
            run_grads(lambda a: hard_ce_triton(a, labels), [x]),
            run_grads(lambda a: hard_ce_reference(a.float(), labels), [x]),
            2 * 2**-7,
        )
    )
    return rows


def self_checks(size: str, device) -> list[dict]:
    import deepspeed
    import torch.distributed as dist

    from models.kernels import CheckShapes, resolve

    rows = []
    for d in ATTENTION[size]["D"]:
        for inside in (False, True):
            shapes = CheckShapes(
                d,
                tokens=(ATTENTION[size]["N"][0], 50 if size == "gpu" else 5),
                classes=(SOFTMAX_K[size][0],),
                hard_classes=(HARD_K[size],),
            )
            resolve.cache_clear()
            start = time.perf_counter()
            if inside:
                if not dist.is_initialized():
                    from trainer.engine import init_distributed

                    init_distributed()
                ds = {"train_batch_size": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
                with deepspeed.zero.Init(config_dict_or_path=ds):
                    impl, why = resolve("auto", shapes, str(device))
            else:
                impl, why = resolve("auto", shapes, str(device))
            rows.append(
                {
                    "section": "kernels",
                    "name": f"self-check D={d}{' inside zero.Init' if inside else ''}",
                    "ok": impl == "triton",
                    "why": why,
                    "seconds": time.perf_counter() - start,
                }
            )
    return rows


def colour_check(device) -> dict:
    import torch
    from PIL import Image
    from torchvision.transforms import functional as F

    from data import photometric as P
    from data.transforms import MultiCrop

    g = torch.Generator().manual_seed(0)
    img = Image.fromarray(torch.randint(0, 256, (240, 320, 3), generator=g, dtype=torch.uint8).numpy())
    crop = MultiCrop(photometric="device", resize="torch")
    crops, rows = [], []
    for seed in range(8):
        torch.manual_seed(seed)
        v = crop(img)
        crops += v.local_crops
        rows += v.local_params
    got = P.apply_batch(torch.stack(crops).to(device), torch.stack(rows)).cpu()
    want = torch.stack([F.pil_to_tensor(P.apply_pil(F.to_pil_image(c), r)) for c, r in zip(crops, rows)])
    return {
        "section": "kernels",
        "name": "deferred colour work against PIL (8 x local crops)",
        "ok": bool(torch.equal(got, want)),
        "error": float((got.float() - want.float()).abs().max()),
    }


def speed_rows(size: str, device) -> list[dict]:
    """ms and peak MiB of our kernels against PyTorch's SDPA back ends and the naive loss."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.kernels.attention_triton import flash_attention
    from models.kernels.softmax_ce import fused_linear_softmax_ce, fused_linear_softmax_ce_reference

    def measure(fn, *xs) -> tuple[float, float]:
        def once():
            ys = [x.detach().clone().requires_grad_() for x in xs]
            fn(*ys).float().sum().backward()

        once()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start, n = time.perf_counter(), 5 if size == "gpu" else 1
        for _ in range(n):
            once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
        return 1000 * (time.perf_counter() - start) / n, peak

    a, rows = ATTENTION[size], []
    q, k, v = (torch.randn(a["B"], a["H"], a["N"][1], a["D"][0], device=device, dtype=torch.bfloat16) for _ in range(3))
    cases = {"triton": lambda *x: flash_attention(*x)}
    backends = {
        "sdpa flash": SDPBackend.FLASH_ATTENTION,
        "sdpa memory-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa math": SDPBackend.MATH,
    }
    for name, backend in backends.items():
        cases[name] = lambda *x, b=backend: _sdpa(sdpa_kernel, b, F, *x)
    for name, fn in cases.items():
        try:
            ms, mib = measure(fn, q, k, v)
            rows.append(
                {
                    "section": "speed",
                    "name": f"attention {tuple(q.shape)} {name}",
                    "ms": ms,
                    "peak_mib": mib,
                    "ok": True,
                }
            )
        except RuntimeError as e:  # a back end this device or dtype lacks
            rows.append(
                {
                    "section": "speed",
                    "name": f"attention {tuple(q.shape)} {name}",
                    "ok": True,
                    "skipped": str(e).splitlines()[0][:120],
                }
            )
    R, C, K = (4096, 256, SOFTMAX_K[size][1]) if size == "gpu" else (40, 24, SOFTMAX_K[size][1])
    h = torch.randn(R, C, device=device).bfloat16()
    w = torch.randn(K, C, device=device).bfloat16()
    t, c = torch.randn(R, K, device=device), torch.zeros(K, device=device)
    for name, fn in (("fused", fused_linear_softmax_ce), ("naive", fused_linear_softmax_ce_reference)):
        ms, mib = measure(lambda a, b, f=fn: f(a, b, t, c, 0.1, 0.04), h, w)
        rows.append(
            {"section": "speed", "name": f"softmax-CE R={R} K={K} {name}", "ms": ms, "peak_mib": mib, "ok": True}
        )
    # each against its baseline measured just now: attention against SDPA's flash back end (the first
    # that ran, if flash did not), the fused loss against the naive one
    for prefix, baseline in (("attention", " sdpa"), ("softmax-CE", " naive")):
        group = [r for r in rows if r["name"].startswith(prefix) and "ms" in r]
        base = next((r for r in group if baseline in r["name"]), None)
        for r in group:
            if base is not None:
                r["time_vs_baseline"] = r["ms"] / base["ms"]
                r["memory_vs_baseline"] = r["peak_mib"] / base["peak_mib"] if base["peak_mib"] else float("nan")
                r["baseline"] = base["name"]
    return rows


def _sdpa(sdpa_kernel, backend, F, q, k, v):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def plan_rows(size: str, device) -> list[dict]:
    from trainer.plan.measured import backbone_case

    cases = ["vit_large:224:32:0", "vit_large:224:32:1"] if size == "gpu" else [
        "vit_small:112:16:0", "vit_small:112:16:1"]
    rows = []
    for case in cases:
        r = backbone_case(case, device)
        rows.append(
            {
                "section": "plan",
                "name": f"planner vs measured {case}",
                **r,
                "ok": abs(r["allocator_error"]) < 0.15 if device.type == "cuda" else abs(r["error"]) < 0.15,
            }
        )
    return rows


def train_rows(size: str, device, out_dir: Path) -> list[dict]:
    import torch

    r, rows = RUN[size], []
    # (not this process's rendezvous: the self-check's process group holds its port)
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in rendezvous}, "PYTHONPATH": str(ROOT)}
    losses = {}
    for kernels in ("triton", "torch"):
        out = out_dir / f"step_{kernels}.json"
        cmd = [
            sys.executable,
            "scripts/bench_step.py",
            "--config",
            r["config"],
            "--steps",
            str(r["steps"]),
            "--out",
            str(out),
            "data.train_shards=builtin:digits",
            "data.val_shards=builtin:digits",
            f"data.batch_size={r['batch']}",
            f"run.kernels={kernels}",
            *r.get("extra", []),
            "model.sharded_init=false",
        ]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        row = {
            "section": "train",
            "name": f"{Path(r['config']).stem} run.kernels={kernels}",
            "ok": p.returncode == 0,
            "command": shlex.join(cmd),
        }
        if p.returncode == 0:
            result = json.loads(out.read_text())
            s = result["summary"]
            losses[kernels] = [x["loss"] for x in result["records"][:3]]
            row.update(
                {
                    k: s.get(k)
                    for k in (
                        "step_time_s",
                        "images_per_s",
                        "mfu",
                        "max_memory_gib",
                        "max_rss_gib",
                        "planned_memory_gib",
                        "phase_share",
                    )
                }
            )
        else:
            row["error_tail"] = (p.stdout + p.stderr)[-2000:]
        rows.append(row)
    if len(losses) == 2:
        diff = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(losses["triton"], losses["torch"]))
        rows.append(
            {
                "section": "train",
                "name": "first losses, triton against torch",
                "error": diff,
                "tolerance": 0.02,
                "ok": diff <= 0.02,
                "losses": losses,
            }
        )
    for name, config in r["smokes"]:
        cmd = [
            sys.executable,
            "launch.py",
            "--config",
            config,
            f"run.output_dir={out_dir / name}",
            "schedule.steps=8",
            "data.train_shards=builtin:digits",
            "data.val_shards=null",
            "data.batch_size=8",
            "eval.knn_at_end=false",
            "log.pictures=false",
            "log.every_steps=4",
        ]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        rows.append(
            {
                "section": "train",
                "name": f"8-step smoke {name}",
                "ok": p.returncode == 0,
                "command": shlex.join(cmd),
                **({} if p.returncode == 0 else {"error_tail": p.stderr[-2000:]}),
            }
        )
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "launch.py",
            "--config",
            r["config"],
            f"run.output_dir={out_dir / 'two_ranks'}",
            "schedule.steps=8",
            "data.train_shards=builtin:digits",
            "data.val_shards=null",
            f"data.batch_size={r['batch']}",
            "eval.knn_at_end=false",
            "log.pictures=false",
            "run.kernels=triton",
            "model.sharded_init=false",
        ]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        rows.append(
            {
                "section": "train",
                "name": "2 ranks (NCCL, ZeRO-3 gathers, streams)",
                "ok": p.returncode == 0,
                "command": shlex.join(cmd),
                **({} if p.returncode == 0 else {"error_tail": p.stderr[-2000:]}),
            }
        )
    return rows


def environment(device) -> dict:
    import deepspeed
    import torch
    import triton

    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True) if device.type == "cuda" else None
    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    fs = subprocess.run(
        ["stat", "-f", "-c", "%T", str(cache.parent if not cache.exists() else cache)], capture_output=True, text=True
    ).stdout.strip()
    return {
        "section": "env",
        "name": "environment",
        "ok": fs not in ("nfs", "lustre", "gpfs", "fuseblk"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "deepspeed": deepspeed.__version__,
        "cuda": torch.version.cuda,
        "triton_cache": str(cache),
        "triton_cache_fs": fs,
        "nvidia_smi": smi.stdout if smi is not None else None,
    }


def validate(size: str, skip: tuple[str, ...] = ()) -> tuple[list[dict], float]:
    """Every section but `skip` on `size` ("gpu": production shapes on CUDA; "cpu": tiny ones, with
    TRITON_INTERPRET=1 set before the kernels were imported) -> (the rows, the seconds it took). A
    section that crashes is one failed row; the others still run."""
    import torch

    device = torch.device("cuda" if size == "gpu" else "cpu")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))
    start, rows = time.perf_counter(), [environment(device)]
    sections = {
        "kernels": lambda: (attention_checks(size, device) + loss_checks(size, device) + self_checks(size, device)
                            + [colour_check(device)]),
        "speed": lambda: speed_rows(size, device),
        "plan": lambda: plan_rows(size, device),
    }
    with tempfile.TemporaryDirectory(prefix="gpu_validate_") as tmp:
        sections["train"] = lambda: train_rows(size, device, Path(tmp))
        for name, fn in sections.items():
            if name in skip:
                continue
            t0 = time.perf_counter()
            torch.manual_seed(0)  # the same inputs every run
            try:
                got = fn()
            except Exception as e:  # noqa: BLE001  (one failing section must not hide the others)
                got = [{"section": name, "name": f"{name} (crashed)", "ok": False,
                        "error_text": f"{type(e).__name__}: {e}"}]
            for r in got:
                r.setdefault("section_seconds", time.perf_counter() - t0)
            rows += got
    return rows, time.perf_counter() - start


def table(rows: list[dict]) -> list[str]:
    """One line per row: section, check, ok/FAILED and its figures."""
    lines = [f"{'section':8} {'check':58} {'result':>8}  figures"]
    for r in rows:
        figures = ", ".join(f"{k} {v:.3g}" for k, v in r.items() if isinstance(v, float) and k != "section_seconds")
        lines.append(f"{r['section']:8} {r['name'][:58]:58} {'ok' if r['ok'] else 'FAILED':>8}  {figures}")
    return lines


def device_label(size: str) -> str:
    """What the result file is named after: the GPU's name, or cpu_smoke."""
    import torch

    return "cpu_smoke" if size == "cpu" else torch.cuda.get_device_name(0).replace(" ", "_")
