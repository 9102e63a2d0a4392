"""run.compile on the CPU (inductor): compiled tiny runs train as the eager ones do, with the graphs and
breaks counted; a run resumes from and into a compiled one; the Triton attention stays inside a graph."""

import shutil

import pytest
import torch
from conftest import launch_run

from trainer.config import ConfigError, load_config
from trainer.ds_config import build_ds_config

pytestmark = pytest.mark.slow

STEPS = 10
COMMON = (f"schedule.steps={STEPS}", "log.every_steps=1", "model.arch=vit_test", "data.batch_size=8",
          "data.num_workers=0", "checkpoint.every_steps=5", "checkpoint.keep=3")
METHODS = {"ibot": ("ibot_vit_tiny", ("ibot.out_dim=64", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16")),
           "beit": ("beit_vit_tiny", ("model.grad_checkpointing=1",))}  # recomputation: the compiled forward again
# fp32 on the CPU: a compiled graph fuses and reorders the same fp32 arithmetic, so losses move in their last
# bits and drift apart slowly (seen: at most 8e-6 relative over 10 iBOT steps, 2e-7 for BEiT)
FP32_RTOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def inductor_cache(tmp_path_factory):
    """One inductor cache for the module's runs (a graph compiled once, then loaded: seconds, not tens)."""
    import os

    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_COMPILE_THREADS")}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # no pool of compile workers on 2 cores
    yield
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run.steps("step", "loss")}


def assert_close(a: dict, b: dict, rtol: float) -> None:
    assert sorted(a) == sorted(b)
    worst = max(abs(a[s] - b[s]) / abs(b[s]) for s in a)
    assert worst <= rtol, (worst, a, b)


def run(tmp_path, name: str, method: str, frozen_files, *extra: str):
    config, own = METHODS[method]
    tokenizer = (f"beit.tokenizer={frozen_files['tokenizer']}",) if method == "beit" else ()
    return launch_run(tmp_path / name, config, *COMMON, *own, *tokenizer, *extra)


@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_blocks_train_as_eager_under_zero3_in_one_graph(tmp_path, frozen_files, method):
    """iBOT (global and local crops: two graphs, one per crop size) and BEiT (one; with activation
    checkpointing), each block compiled under ZeRO-3, gathered whole; no graph break; the losses of 10
    steps are the eager run's."""
    eager = run(tmp_path, "eager", method, frozen_files)
    compiled = run(tmp_path, "compiled", method, frozen_files, "run.compile=blocks")
    assert_close(losses(compiled), losses(eager), FP32_RTOL)
    (counts,) = [r for r in compiled.records if "compile_graphs" in r]  # logged once, after step 2
    assert counts["step"] == 2 and counts["compile_graph_breaks"] == 0
    assert counts["compile_graphs"] == {"ibot": 2, "beit": 1}[method]
    assert "each gathered whole by ZeRO-3" in compiled.stderr and "about" in compiled.stderr  # compile time, once
    assert compiled.stderr.count("s compiling);") == 1
    if method == "ibot":  # resume into a compiled run, and from one: the state is the same module's
        for source, into, flag in ((eager, "into", "run.compile=blocks"), (compiled, "from", "run.compile=off")):
            resumed_dir = tmp_path / f"resumed_{into}"
            shutil.copytree(source.out / "checkpoints" / "step00000005", resumed_dir / "checkpoints" / "step00000005")
            resumed = run(tmp_path, f"resumed_{into}", method, frozen_files, flag)
            assert "resumed from" in resumed.stderr
            assert_close(losses(resumed), {s: v for s, v in losses(source).items() if s > 5}, FP32_RTOL)


def test_compiled_model_below_zero3(tmp_path, frozen_files):
    """run.compile model: the student's networks whole (ZeRO stage 2, so bf16 on the CPU): no graph break,
    one graph per crop size. bf16: the compiled graph keeps fused intermediates in fp32 where eager rounds
    each op to bf16, so the curves agree loosely (seen: 0.1% at step 1, 1.7% by step 10)."""
    bf16 = ("run.precision=bf16", "--ds_config", "zero2.json")
    eager = run(tmp_path, "eager", "ibot", frozen_files, *bf16)
    compiled = run(tmp_path, "compiled", "ibot", frozen_files, *bf16, "run.compile=model")
    a, b = losses(compiled), losses(eager)
    assert abs(a[1] - b[1]) / b[1] < 5e-3
    assert_close(a, b, 5e-2)
    (counts,) = [r for r in compiled.records if "compile_graphs" in r]
    assert counts["compile_graph_breaks"] == 0 and counts["compile_graphs"] == 2


def test_compiling_the_whole_model_under_zero3_stops_before_training():
    cfg = load_config(None, ["run.compile=model"])
    with pytest.raises(ConfigError, match="zero_optimization.stage: 3 with run.compile model"):
        build_ds_config("zero3.json", cfg, 1)


def test_the_triton_attention_is_one_op_inside_a_compiled_graph():
    """The kernels as torch.library custom ops (TRITON_INTERPRET=1 on the CPU: the same Triton programs):
    a function around them compiles whole (fullgraph: a break would raise), and its outputs and gradients,
    the bias's too, are the eager ones'."""
    from models.kernels import triton_available
    from models.kernels.attention_triton import flash_attention, flash_attention_varlen

    assert triton_available()[0], "tests/conftest.py sets TRITON_INTERPRET=1 without a GPU"
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 20, 16, generator=g).requires_grad_() for _ in range(3))
    bias = (torch.randn(2, 20, 20, generator=g) * 0.1).requires_grad_()
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)

    def f(q, k, v, bias):
        fixed = flash_attention(q * 2, k, v, bias=bias)
        packed = flash_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, 13)
        return (fixed.sin().sum() + packed.square().sum()) * 0.5

    outs = []
    for fn in (torch.compile(f, fullgraph=True), f):
        loss = fn(q, k, v, bias)
        grads = torch.autograd.grad(loss, (q, k, v, bias))
        outs.append((loss, *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
