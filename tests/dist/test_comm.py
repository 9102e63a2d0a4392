"""ZeRO-3 traffic per step on 2 CPU ranks (scripts/bench_comm.py): what is gathered equals the
analytic count, packing the crops halves the blocks' gathers, a replicated frozen teacher is never
gathered, and the gradients are reduce-scattered once."""

import json
from collections import defaultdict
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_gathers_match_the_analytic_count_packing_halves_them_replication_removes_the_teachers(tmp_path):
    out = tmp_path / "comm.json"
    p = subprocess.run([sys.executable, "scripts/bench_comm.py", "--ranks", "2", "--regimes", "release", "--steps", "1",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    results = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    t = {case: defaultdict(float, r["totals"]) for case, r in results.items()}  # a part a case lacks: 0
    for case, r in results.items():
        # every byte the parameter coordinator gathered went through an all-gather we counted
        assert abs(t[case]["all_gather"] - t[case]["gathered_per_step"]) < 1, case
        # the gradients: one reduce-scatter of every trainable parameter per step, in bf16
        assert t[case]["reduce_scatter"] == r["analytic_reduce_scatter"] == 2 * r["parameters"]["trainable"], case
        # blocks, EMA teacher and frozen teacher: gathered once per call (and the student's again in the backward)
        for part in ("student blocks", "EMA teacher", "frozen teacher"):
            measured, analytic = t[case][f"gathered_per_step {part}"], t[case][f"analytic_gathered_per_step {part}"]
            assert abs(measured - analytic) <= 0.02 * analytic + 1, (case, part, measured, analytic)
        # the rest of the student (embeddings, heads) at most once per call
        rest = "gathered_per_step student embeddings + heads"
        assert 0 < t[case][rest] <= t[case]["analytic_" + rest]
    assert results["ibot_per_resolution"]["block_passes_per_step"] == 2  # global crops, then local crops
    assert results["ibot_packed"]["block_passes_per_step"] == 1  # all crops in one packed sequence
    per_res, packed = t["ibot_per_resolution"], t["ibot_packed"]
    assert per_res["gathered_per_step student blocks"] == 2 * packed["gathered_per_step student blocks"] > 0
    partitioned, replicated = t["ibot_clip_partitioned"], t["ibot_clip_replicated"]
    # one forward per step: every module it calls, once (its final norm, unused, is never gathered)
    clip_bytes = partitioned["analytic_gathered_per_step frozen teacher"]
    assert partitioned["gathered_per_step frozen teacher"] == clip_bytes > 0.9 * 2 * results[
        "ibot_clip_partitioned"]["parameters"]["frozen teacher"]
    assert replicated["gathered_per_step frozen teacher"] == 0 and results["ibot_clip_replicated"]["replicated"]
    # nothing else changes: the student and the EMA teacher are gathered alike
    for part in ("student blocks", "EMA teacher"):
        assert partitioned[f"gathered_per_step {part}"] == replicated[f"gathered_per_step {part}"]
