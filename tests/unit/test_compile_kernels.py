"""Every Triton kernel compiles for an H100 (sm_90) without a GPU, as the runtime would compile it,
with no shipped autotune config spilling or falling back from wgmma (scripts/compile_kernels.py)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

KERNELS = {"_attn_fwd", "_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq",
           "_softmax_ce_fwd", "_softmax_ce_bwd", "_hard_ce_fwd", "_hard_ce_bwd"}
MATMUL_KERNELS = {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"}


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_without_spills_and_with_hgmma(tmp_path):
    out = tmp_path / "compiled.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the GPU's kernels and configs
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compiled here, not found in a cache
    p = subprocess.run([sys.executable, "scripts/compile_kernels.py", "--subset", "ci", "--json", str(out), "--quiet",
                        "-j", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert {r["kernel"] for r in results} == KERNELS  # every kernel of models/kernels/ was launched and compiled
    assert {r["target"] for r in results} == {"sm_90"}
    assert not [r for r in results if r["error"]]
    assert all(r["local_bytes"] == 0 and r["stack_bytes"] == 0 for r in results)  # no spills
    assert all(r["shared_bytes"] <= r["shared_limit"] for r in results)
    for r in results:
        if r["kernel"] in MATMUL_KERNELS:  # Hopper's wgmma; mma.sync only where every wgmma tile spills
            mixed_allowed = r["kernel"] == "_attn_bwd_dkdv" and ("D=88" in r["case"] or "bias" in r["case"])
            assert r["hgmma"] > 0 and (r["hmma"] == 0 or mixed_allowed), r
        else:  # row reductions: the softmax-CE's matmuls are cuBLAS's (torch), outside the kernels
            assert r["hgmma"] == r["hmma"] == 0, r
    # both tile widths and every layout of the subset, each with its shipped configs
    cases = {r["case"] for r in results if r["kernel"] == "_attn_fwd"}
    assert cases == {"attention D=64 bf16 fixed", "attention D=64 bf16 bias", "attention D=88 bf16 fixed",
                     "attention D=88 bf16 varlen"}
    fwd64 = [r for r in results if r["kernel"] == "_attn_fwd" and r["case"] == "attention D=64 bf16 fixed"]
    fwd88 = [r for r in results if r["kernel"] == "_attn_fwd" and r["case"] == "attention D=88 bf16 fixed"]
    assert len(fwd64) == 6 and len(fwd88) == 3  # the width-64 and width-128 lists of models/kernels/attention_triton.py
