"""Triton kernels against their PyTorch references (on the CPU: Triton's interpreter, see conftest)."""

import pytest
import torch

import models.kernels as kernels_module
import models.kernels.attention_triton as attention_triton_module
from models.kernels import (
    CheckShapes,
    KernelFault,
    get_attention,
    get_softmax_ce,
    resolve,
    self_check,
    triton_available,
)
from models.kernels.attention import attention_reference, attention_triton
from models.kernels.softmax_ce import (
    fused_linear_softmax_ce,
    fused_linear_softmax_ce_reference,
    softmax_ce_reference,
    softmax_ce_triton,
)
from trainer.config import ConfigError, load_config

pytestmark = pytest.mark.skipif(not triton_available()[0], reason=triton_available()[1])

# fp32: summation order only. bf16 inputs: the same fp32 math; gradients are rounded to bf16 once.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=1e-5)}
GRAD_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}


@pytest.mark.parametrize("rows,K", [(7, 1000), (3, 64), (2, 2500), (1, 1), (0, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_ce_matches_reference(rows, K, dtype):
    g = torch.Generator().manual_seed(rows * 1000 + K)
    student = (torch.randn(rows, K, generator=g) * 4).to(dtype)
    teacher = (torch.randn(rows, K, generator=g) * 4).to(dtype)
    center = torch.randn(K, generator=g) * 0.3
    grad_out = torch.randn(rows, generator=g)
    results = []
    for fn in (softmax_ce_triton, softmax_ce_reference):
        s = student.clone().requires_grad_()
        loss = fn(s, teacher, center, 0.1, 0.04)
        loss.backward(grad_out)
        results.append((loss, s.grad))
    (loss, grad), (ref_loss, ref_grad) = results
    assert loss.dtype == torch.float32 and loss.shape == (rows,) and grad.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    torch.testing.assert_close(grad.float(), ref_grad.float(), **GRAD_TOL[dtype])


def test_softmax_ce_is_stable_for_sharp_teachers():
    """Logits of +-1e4 after temperature: no inf/nan where the reference is finite."""
    s = torch.randn(4, 300) * 50
    t = torch.randn(4, 300) * 50
    s.requires_grad_()
    loss = softmax_ce_triton(s, t, torch.zeros(300), 0.01, 0.01)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    torch.testing.assert_close(loss, softmax_ce_reference(s, t, torch.zeros(300), 0.01, 0.01), atol=1e-2, rtol=1e-5)


def test_ibot_with_triton_kernels_trains_like_torch():
    """The tiny iBOT model, 4 AdamW steps, with the Triton kernels (attention and loss) or the
    PyTorch references: the same losses."""
    from trainer.engine import build_method

    losses, centers = {}, {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        cfg = load_config(None, ["model.arch=vit_test", "ibot.out_dim=256", "ibot.head_hidden_dim=32",
                                 "ibot.head_bottleneck_dim=16", f"run.kernels={impl}"])
        method = build_method(cfg)
        assert (method.loss_fn is fused_linear_softmax_ce) == (impl == "triton")
        assert (method.student.backbone.blocks[0].attn.attn_fn is attention_triton) == (impl == "triton")
        opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
        g = torch.Generator().manual_seed(1)
        out = []
        for step in range(4):
            batch = {"global_crops": torch.randn(2, 4, 3, 32, 32, generator=g),
                     "local_crops": torch.randn(2, 4, 3, 16, 16, generator=g),
                     "masks": torch.rand(2, 4, 4, 4, generator=g) < 0.4}
            values = {"teacher_temp": 0.04, "teacher_patch_temp": 0.07, "step": step, "micro_step": step}
            terms = method(batch, values)
            loss = terms["cls"] + terms["mim"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append([terms["cls"].item(), terms["mim"].item()])
        losses[impl] = torch.tensor(out)
        centers[impl] = torch.cat([method.center, method.center_patch])  # from the loss pass with triton
    torch.testing.assert_close(losses["triton"], losses["torch"], atol=1e-4, rtol=1e-4)
    assert centers["torch"].abs().max() > 1e-3  # they moved
    torch.testing.assert_close(centers["triton"], centers["torch"], atol=1e-5, rtol=1e-4)


def test_kernel_dispatch(monkeypatch):
    assert get_softmax_ce("torch") is softmax_ce_reference and get_softmax_ce("triton") is softmax_ce_triton
    assert get_softmax_ce("triton", fused_linear=True) is fused_linear_softmax_ce
    assert get_attention("triton") is attention_triton
    if not torch.cuda.is_available():  # auto: the references without CUDA, even where the interpreter could run
        assert get_softmax_ce("auto") is softmax_ce_reference and get_attention("auto") is attention_reference
        assert resolve("auto", 64) == ("torch", "no CUDA device")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="run.kernels: 'triton' cannot run here: no CUDA device"):
            load_config(None, ["run.kernels=triton"])


def test_auto_takes_the_kernels_where_their_self_check_passes(monkeypatch):
    """'auto' on a device where the kernels run (here the interpreter's CPU): the self-check passes
    and picks them; a kernel that disagrees with its reference makes 'auto' fall back, saying which."""
    self_check(80, "cpu")  # raises on any disagreement
    resolve.cache_clear()
    assert resolve("auto", 80, "cpu") == ("triton", "")
    flash = attention_triton_module.flash_attention
    monkeypatch.setattr(attention_triton_module, "flash_attention",
                        lambda q, k, v, bias=None: flash(q, k, v, bias) * 1.1)
    resolve.cache_clear()
    impl, why = resolve("auto", 80, "cpu")
    assert impl == "torch" and "failed their self-check on cpu" in why and "attention N=50 output" in why
    resolve.cache_clear()


def test_self_check_at_the_runs_shapes_and_a_broken_context_stops(monkeypatch):
    """Issue 28 (4): the check runs at the shapes it is given (several K tiles, several row chunks),
    says what it checked, and a CUDA error that leaves the context unusable stops the run (one line)
    instead of falling back onto a broken context; an ordinary failure still falls back."""
    shapes = CheckShapes(24, tokens=(65, 17), classes=(2500,), hard_classes=(1100,))
    assert shapes.describe() == ("head dim 24, tokens 65/17 (fixed, packed, biased), softmax-CE K 2500, "
                                 "hard CE K 1100")
    resolve.cache_clear()
    assert resolve("auto", shapes, "cpu") == ("triton", "")
    for error, fatal in ((RuntimeError("CUDA error: an illegal memory access was encountered"), True),
                         (RuntimeError("Triton Error [CUDA]: unspecified launch failure"), True),
                         (RuntimeError("out of resource: shared memory, Required: 200000"), False)):
        def broken(shapes, device, error=error):
            raise error

        monkeypatch.setattr(kernels_module, "self_check", broken)
        resolve.cache_clear()
        if fatal:
            with pytest.raises(KernelFault, match="broke the CUDA context on cpu .*head dim 24.*run.kernels=torch"):
                resolve("auto", shapes, "cpu")
        else:
            assert resolve("auto", shapes, "cpu")[0] == "torch"
    resolve.cache_clear()


def _softmax_ce_pair(student, teacher, center, rows, grad_out, fns=(softmax_ce_triton, softmax_ce_reference)):
    results = []
    for fn in fns:
        s = student.clone().requires_grad_()
        total = torch.zeros(teacher.shape[1])
        loss = fn(s, teacher, center, 0.1, 0.04, teacher_rows=rows, teacher_sum=total)
        loss.backward(grad_out)
        results.append((loss, s.grad, total))
    return results


@pytest.mark.parametrize("n_teacher,rows", [(40, 17), (40, 40), (9, 0), (5, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_ce_pairs_teacher_rows_and_sums_every_teacher_row(n_teacher, rows, dtype):
    """Student row i against teacher row teacher_rows[i]; the column sums (the center statistics)
    cover every teacher row, paired or not, including when no row is paired at all."""
    g = torch.Generator().manual_seed(n_teacher * 100 + rows)
    K = 700
    teacher = (torch.randn(n_teacher, K, generator=g) * 4).to(dtype)
    student = (torch.randn(rows, K, generator=g) * 4).to(dtype)
    pick = torch.randperm(n_teacher, generator=g)[:rows]
    (loss, grad, total), (ref_loss, ref_grad, ref_total) = _softmax_ce_pair(
        student, teacher, torch.randn(K, generator=g) * 0.3, pick, torch.randn(rows, generator=g))
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    torch.testing.assert_close(grad.float(), ref_grad.float(), **GRAD_TOL[dtype])
    torch.testing.assert_close(total, teacher.float().sum(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(total, ref_total, atol=1e-4, rtol=1e-5)


def test_softmax_ce_refuses_sums_over_a_repeated_teacher_row():
    t = torch.randn(4, 10)
    with pytest.raises((ValueError, RuntimeError), match="names a teacher row twice"):  # (a device assert)
        softmax_ce_triton(torch.randn(2, 10), t, torch.zeros(10), 0.1, 0.04, torch.tensor([1, 1]), torch.zeros(10))
    with pytest.raises(ValueError, match="pass teacher_rows"):
        softmax_ce_triton(torch.randn(2, 10), t, torch.zeros(10), 0.1, 0.04)
    with pytest.raises(ValueError, match="contiguous fp32"):
        softmax_ce_triton(torch.randn(4, 10), t, torch.zeros(10), 0.1, 0.04, teacher_sum=torch.zeros(10).bfloat16())


# --------------------------------------------------------------------------- attention

ATT_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
           torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _attention_case(q, k, v, fn, ref, bias=None):
    """fn and ref: the same output and q, k, v gradients; with `bias` (passed as bias=) also its
    gradient, in its dtype, where it requires one (and none where it does not)."""
    grad_out = torch.randn_like(q)
    grads = []
    for f in (fn, ref):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        if bias is None:
            out = f(*xs)
        else:
            b = bias.detach().clone().requires_grad_(bias.requires_grad)
            out = f(*xs, bias=b)
            xs.append(b)
        out.backward(grad_out)
        grads.append((out, *(x.grad for x in xs)))
    if bias is not None and not bias.requires_grad:
        assert grads[0][-1] is None and grads[1][-1] is None
        grads = [g[:-1] for g in grads]
    dtype = q.dtype
    for i, (mine, theirs) in enumerate(zip(*grads)):
        assert mine.dtype == (bias.dtype if i == 4 else dtype)
        torch.testing.assert_close(mine.float(), theirs.float(), **ATT_TOL[dtype])


@pytest.mark.parametrize("D", [64, 80, 88, 104, 128])
@pytest.mark.parametrize("N", [37, 50])
def test_flash_attention_head_dims_and_odd_lengths(D, N):
    from models.kernels.attention_triton import flash_attention

    g = torch.Generator().manual_seed(D * 100 + N)
    q, k, v = (torch.randn(2, 2, N, D, generator=g) for _ in range(3))
    _attention_case(q, k, v, flash_attention, attention_reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attention_half_precision(dtype):
    from models.kernels.attention_triton import flash_attention

    def ref(q, k, v):  # fp32 math on the same half-precision inputs, cast back like the kernel
        return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 65, 80, generator=g).to(dtype) for _ in range(3))
    _attention_case(q, k, v, flash_attention, ref)


@pytest.mark.parametrize("D", [32, 24])
@pytest.mark.parametrize("N", [17, 50])
def test_flash_attention_bias_and_its_gradient(N, D):
    """BEiT's relative position bias [H, N, N], shared by the batch (B=3: its gradient is summed
    over the sequences), through attention_triton; odd lengths and a head dim of 24 (masked)."""
    g = torch.Generator().manual_seed(D * 100 + N)
    q, k, v = (torch.randn(3, 2, N, D, generator=g) for _ in range(3))
    bias = (torch.randn(2, N, N, generator=g) * 2).requires_grad_()
    _attention_case(q, k, v, attention_triton, attention_reference, bias)


def test_flash_attention_bias_half_precision():
    """bf16 q, k, v with an fp32 bias: its gradient comes back in fp32."""
    def ref(q, k, v, bias):  # fp32 math on the same bf16 inputs, cast back like the kernel
        return attention_reference(q.float(), k.float(), v.float(), bias=bias).to(q.dtype)

    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 2, 50, 24, generator=g).bfloat16() for _ in range(3))
    bias = (torch.randn(2, 50, 50, generator=g) * 2).requires_grad_()
    _attention_case(q, k, v, attention_triton, ref, bias)


def test_flash_attention_bias_without_gradient_and_as_a_view():
    """A bias that needs no gradient (none is computed), given as BEiT gathers it: a permuted,
    non-contiguous view of a [N, N, H] table. A mask sends the call to the reference, bias and all."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 3, 17, 32, generator=g) for _ in range(3))
    bias = torch.randn(17, 17, 3, generator=g).permute(2, 0, 1)
    assert not bias.is_contiguous()
    _attention_case(q, k, v, attention_triton, attention_reference, bias)
    mask = torch.rand(2, 1, 17, 17, generator=g) > 0.3
    out = attention_triton(q, k, v, mask, bias)
    scores = (q @ k.transpose(-1, -2) * 32 ** -0.5 + bias).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out, scores.softmax(-1) @ v, **ATT_TOL[torch.float32])
    with pytest.raises(ValueError, match=r"bias must be \[H, N, N\] = \[3, 17, 17\]"):
        attention_triton(q, k, v, bias=bias[:1])


def test_flash_attention_on_strided_qkv_views():
    """The model hands in q, k, v unbound from one qkv projection: non-contiguous views."""
    from models.kernels.attention_triton import flash_attention

    qkv = torch.randn(2, 33, 3, 2, 64).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D], as models.vit.Attention
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    _attention_case(q, k, v, flash_attention, attention_reference)


def test_flash_attention_varlen_is_block_diagonal():
    from models.kernels.attention import attention_varlen_reference
    from models.kernels.attention_triton import flash_attention_varlen

    lens = [50, 10, 37, 1, 17]  # uneven segments, e.g. global and local crops packed together
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(sum(lens), 2, 88, generator=g) for _ in range(3))
    _attention_case(q, k, v, lambda *x: flash_attention_varlen(*x, cu, max(lens)),
                    lambda *x: attention_varlen_reference(*x, cu))


def test_bench_kernels_runs_its_real_code_at_tiny_size(tmp_path):
    """The GPU benchmark's code path, on CPU tensors in the interpreter (its timings mean nothing here)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "k.json"
    env = {**os.environ, "PYTHONPATH": str(root), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "scripts/bench_kernels.py", "--quick", "--out", str(out)], cwd=root,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["versions"]["triton"] and r["device"] and "bench_kernels.py --quick" in r["command"]
    assert all(row["triton_s"] > 0 and row["ratio_vs_best_sdpa"] > 0 for row in r["attention"])
    assert r["packed"][0]["ratio"] > 0 and r["softmax_ce"][0]["speedup"] > 0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_packed_multicrop_forward_equals_separate_forwards(impl):
    """Global crops (masked) and local crops in one packed pass: the same outputs and gradients
    as one forward per resolution."""
    from models.kernels import get_attention, get_attention_varlen
    from models.vit import build_vit

    torch.manual_seed(0)
    vit = build_vit("vit_test", img_size=32, patch_size=8, attn_fn=get_attention(impl),
                    varlen_fn=get_attention_varlen(impl))
    with torch.no_grad():
        vit.mask_token.normal_()
    g = torch.Generator().manual_seed(1)
    views = [(torch.randn(4, 3, 32, 32, generator=g), torch.rand(4, 4, 4, generator=g) < 0.4),
             (torch.randn(6, 3, 16, 16, generator=g), None)]
    packed = vit.forward_features_packed(views)
    loss = sum(o["cls"].square().sum() + o["patch"].sum() for o in packed)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in vit.named_parameters()}
    vit.zero_grad()
    separate = [vit.forward_features(x, m) for x, m in views]
    sum(o["cls"].square().sum() + o["patch"].sum() for o in separate).backward()
    for a, b in zip(packed, separate):
        torch.testing.assert_close(a["cls"], b["cls"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a["patch"], b["patch"], atol=1e-5, rtol=1e-5)
    for n, p in vit.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_packed_stochastic_depth_is_per_image():
    from models.vit import Packed, _packed_block, build_vit

    vit = build_vit("vit_test", img_size=32, patch_size=8, drop_path_rate=0.5).train()
    block = vit.blocks[-1]
    lengths = [17, 17, 5, 5, 5]
    image = torch.repeat_interleave(torch.arange(5), torch.tensor(lengths))
    packed = Packed(torch.tensor([0, 17, 34, 39, 44, 49], dtype=torch.int32), 17, image, 5)
    x = torch.randn(1, 49, 32)
    torch.manual_seed(0)
    dropped_per_image = set()
    for _ in range(20):
        delta = (_packed_block(block, x, packed) - x)[0].abs().sum(-1)  # 0 where both branches dropped
        for i in range(5):
            zero = delta[image == i] == 0
            assert bool(zero.all()) or not bool(zero.any())  # an image is dropped whole or not at all
            dropped_per_image.add((i, bool(zero.all())))
    assert len(dropped_per_image) > 5  # images differ in what was dropped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hard_label_ce_matches_cross_entropy(dtype):
    from models.kernels.softmax_ce import hard_ce_reference, hard_ce_triton

    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(9, 1500, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 1500, (9,), generator=g)
    grad_out = torch.randn(9, generator=g)
    results = []
    for fn in (hard_ce_triton, hard_ce_reference):
        x = logits.clone().requires_grad_()
        loss = fn(x, labels)
        loss.backward(grad_out)
        results.append((loss, x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], **TOL[dtype])
    torch.testing.assert_close(results[0][1].float(), results[1][1].float(), **GRAD_TOL[dtype])
    with pytest.raises(ValueError, match="labels must lie in"):
        hard_ce_triton(logits, torch.full((9,), 1500))


@pytest.mark.parametrize("paired", [False, True])
def test_fused_linear_softmax_ce_matches_linear_then_loss(paired):
    g = torch.Generator().manual_seed(6)
    hidden = torch.nn.functional.normalize(torch.randn(50, 24, generator=g), dim=-1)
    weight = torch.nn.functional.normalize(torch.randn(700, 24, generator=g), dim=-1)
    teacher = torch.randn(80 if paired else 50, 700, generator=g) * 5
    rows = torch.randperm(80, generator=g)[:50] if paired else None  # 30 teacher rows only summed
    center = torch.randn(700, generator=g) * 0.1
    grad_out = torch.randn(50, generator=g)
    results = []
    for fn in (fused_linear_softmax_ce, fused_linear_softmax_ce_reference):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        total = torch.zeros(700)
        kw = {"chunk_rows": 16} if fn is fused_linear_softmax_ce else {}  # 4 chunks
        loss = fn(h, w, teacher, center, 0.1, 0.04, rows, total, **kw)
        loss.backward(grad_out)
        results.append((loss, h.grad, w.grad, total))
    for mine, ref in zip(*results):
        torch.testing.assert_close(mine, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(results[0][3], teacher.sum(0), atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------- on a GPU, at full size

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("L,D", [(197, 64), (257, 64), (257, 80), (257, 88), (257, 104), (257, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_flash_attention_on_gpu(L, D, dtype, bias):
    from models.kernels.attention_triton import flash_attention

    def ref(q, k, v, **kw):
        return attention_reference(q.float(), k.float(), v.float(), **kw).to(q.dtype)

    q, k, v = (torch.randn(4, 16, L, D, device="cuda", dtype=dtype) for _ in range(3))
    b = torch.randn(16, L, L, device="cuda").requires_grad_() if bias else None  # BEiT's: fp32
    _attention_case(q, k, v, flash_attention, ref, b)


@pytest.mark.gpu
@gpu
def test_packed_multicrop_attention_on_gpu():
    from models.kernels.attention import attention_varlen_reference
    from models.kernels.attention_triton import flash_attention_varlen

    lens = ([257, 257] + [37] * 10) * 4
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lens), 16, 64, device="cuda", dtype=torch.float32) for _ in range(3))
    _attention_case(q, k, v, lambda *x: flash_attention_varlen(*x, cu, 257),
                    lambda *x: attention_varlen_reference(*x, cu))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("K", [8192, 65536])
def test_softmax_ce_on_gpu(K):
    s = (torch.randn(512, K, device="cuda") * 4).bfloat16()
    t = (torch.randn(512, K, device="cuda") * 4).bfloat16()
    c = torch.randn(K, device="cuda") * 0.1
    results = []
    for fn in (softmax_ce_triton, softmax_ce_reference):
        x = s.clone().requires_grad_()
        loss = fn(x, t, c, 0.1, 0.04)
        loss.sum().backward()
        results.append((loss, x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(results[0][1].float(), results[1][1].float(), **GRAD_TOL[torch.bfloat16])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("K", [8192, 65536])
def test_fused_linear_softmax_ce_with_pairing_and_sums_on_gpu(K):
    """iBOT's MIM shape: 4096 masked rows paired into 8192 teacher rows, the center sums over all."""
    g = torch.Generator().manual_seed(K)
    h = torch.nn.functional.normalize(torch.randn(4096, 256, generator=g), dim=-1).cuda().bfloat16()
    w = torch.nn.functional.normalize(torch.randn(K, 256, generator=g), dim=-1).cuda().bfloat16()
    t = (torch.randn(8192, K, generator=g) * 4).cuda().bfloat16()
    c = torch.randn(K, device="cuda") * 0.1
    rows = torch.randperm(8192, generator=g)[:4096].cuda()
    results = []
    for fn in (fused_linear_softmax_ce, fused_linear_softmax_ce_reference):
        x, y, total = h.clone().requires_grad_(), w.clone().requires_grad_(), torch.zeros(K, device="cuda")
        loss = fn(x, y, t, c, 0.1, 0.04, rows, total)
        loss.sum().backward()
        results.append((loss, x.grad.float(), y.grad.float(), total))
    (loss, gh, gw, total), (ref_loss, ref_gh, ref_gw, ref_total) = results
    torch.testing.assert_close(loss, ref_loss, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(gh, ref_gh, **GRAD_TOL[torch.bfloat16])
    torch.testing.assert_close(gw, ref_gw, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(total, ref_total, atol=1e-1, rtol=1e-4)  # fp32 sums of 8192 rows, any order


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("head_dim", [64, 80, 88])
def test_auto_picks_the_kernels_on_this_gpu(head_dim):
    self_check(head_dim, "cuda")  # raises with the kernel's name if one disagrees or fails to compile
    resolve.cache_clear()
    assert resolve("auto", head_dim) == ("triton", "")
    # at production shapes: ViT-L/16 and /14 crops, iBOT's K, BEiT's vocabulary
    resolve.cache_clear()
    shapes = CheckShapes(head_dim, tokens=(197, 257, 37, 50), classes=(8192, 65536), hard_classes=(8192,))
    assert resolve("auto", shapes) == ("triton", "")


def test_the_declared_triton_range_is_the_tested_one(monkeypatch):
    """Issue 28 (12): pyproject declares the Triton range the kernels are tested with, and a Triton
    outside it is refused (auto falls back to the references, saying why) instead of half-working."""
    import re
    from pathlib import Path

    import tomllib
    import triton

    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    triton_dep = next(d for d in deps if d.startswith("triton"))
    low, high = kernels_module.TESTED_TRITON
    assert re.match(rf"triton>={low[0]}\.{low[1]},<{high[0]}\.{high[1]};", triton_dep), triton_dep
    monkeypatch.setattr(triton, "__version__", "3.1.0")
    ok, why = triton_available()
    assert not ok and "triton 3.1.0 is outside the range the kernels are tested with (>=3.8,<3.9)" in why


def test_fused_softmax_ce_backward_keeps_bf16_operands():
    """Issue 28 (9): the backward's dL/dW GEMMs take the bf16 operands (tensor cores) instead of fp32
    copies of each [chunk, K] gradient block, and the result still matches the reference."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            shapes = [(tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor)]
            self.ops.append((str(func), shapes, kwargs.get("dtype")))
            return out

    g = torch.Generator().manual_seed(0)
    K, R, C = 700, 40, 24
    hidden = torch.nn.functional.normalize(torch.randn(R, C, generator=g), dim=-1).bfloat16().requires_grad_()
    weight = torch.nn.functional.normalize(torch.randn(K, C, generator=g), dim=-1).bfloat16().requires_grad_()
    teacher, center = torch.randn(R, K, generator=g) * 5, torch.zeros(K)
    loss = fused_linear_softmax_ce(hidden, weight, teacher, center, 0.1, 0.04, chunk_rows=16)
    rec = Record()
    with rec:
        loss.sum().backward()
    fp32_blocks = [op for op in rec.ops if op[0].startswith("aten._to_copy") and op[2] == torch.float32
                   and K in op[1][0][0]]
    assert not fp32_blocks, fp32_blocks
    mms = [op for op in rec.ops if op[0].split(".")[1] in ("mm", "addmm", "addmm_")]
    assert mms and all(dtype == torch.bfloat16 for op in mms for _, dtype in op[1]), mms
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    fused_linear_softmax_ce_reference(h, w, teacher, center, 0.1, 0.04).sum().backward()
    torch.testing.assert_close(weight.grad.float(), w.grad.float(), atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(hidden.grad.float(), h.grad.float(), atol=5e-2, rtol=5e-2)
