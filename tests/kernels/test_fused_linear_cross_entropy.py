"""fused_linear_cross_entropy(_stats) against an fp64 torch reference.

Both row paths run in one process: ``_backend="triton"`` (the Triton kernel; on CPU through the
interpreter, which tests/conftest.py enables) and ``_backend="torch"`` (the chunked torch path).
Shapes are tiny and ``_chunk_rows`` small so that the multi-chunk logic is exercised cheaply.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sft_plugins.kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_stats
from sft_plugins.kernels._backend import triton_runs_on

N, H, V = 40, 32, 300
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "torch"] if triton_runs_on(torch.device(DEV)) else ["torch"]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _reference(h, w, y, *, bias=None, ignore_index=-100, reduction="mean", softcap=None,
               logit_scale=1.0, label_smoothing=0.0, num_items_in_batch=None):
    z = h @ w.t()
    if bias is not None:
        z = z + bias
    z = z * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    if reduction == "mean" and num_items_in_batch is not None:
        s = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="sum",
                            label_smoothing=label_smoothing)
        return s / float(num_items_in_batch)
    return F.cross_entropy(z, y, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def _leaf(t: torch.Tensor, dev: str = DEV, grad: bool = True) -> torch.Tensor:
    return t.detach().clone().to(dev).requires_grad_(grad)


def _inputs(dtype, *, n_ignored=8, bias=False, frozen=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g) * 0.7
    w = torch.randn(V, H, generator=g) / H**0.5 * 2.0
    b = torch.randn(V, generator=g) * 0.3 if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    if n_ignored:
        perm = torch.randperm(N, generator=g)[:n_ignored]
        y[perm] = -100
    # round once to the test dtype so the reference sees exactly the same numbers
    h, w = h.to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    return h, w, b, y


CASES = {
    "plain": dict(),
    "no_ignored": dict(n_ignored=0),
    "softcap": dict(softcap=3.0),
    "smoothing": dict(label_smoothing=0.1),
    "bias": dict(bias=True),
    "logit_scale": dict(logit_scale=0.5),
    "frozen": dict(frozen=True),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "none_frozen": dict(reduction="none", frozen=True),
    "none_bias": dict(reduction="none", bias=True, softcap=4.0),
    "num_items_int": dict(num_items_in_batch=57),
    "num_items_tensor": dict(num_items_in_batch="tensor"),
    "everything": dict(bias=True, softcap=2.5, logit_scale=1.3, label_smoothing=0.2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_grads_match_fp64(backend, dtype, case):
    spec = dict(CASES[case])
    n_ignored = spec.pop("n_ignored", 8)
    has_bias = spec.pop("bias", False)
    frozen = spec.pop("frozen", False)
    if spec.get("num_items_in_batch") == "tensor":
        spec["num_items_in_batch"] = torch.tensor(61)  # on CPU: "another device" when on CUDA
    h, w, b, y = _inputs(dtype, n_ignored=n_ignored, bias=has_bias, seed=list(CASES).index(case))

    # fp64 reference on the same (rounded) inputs
    hr = _leaf(h.double(), "cpu")
    wr = _leaf(w.double(), "cpu", not frozen)
    br = _leaf(b.double(), "cpu") if b is not None else None
    ref = _reference(hr, wr, y, bias=br, **spec)

    ho = _leaf(h)
    wo = _leaf(w, grad=not frozen)
    bo = _leaf(b) if b is not None else None
    out = fused_linear_cross_entropy(ho, wo, y.to(DEV), bias=bo, _backend=backend,
                                     _chunk_rows=12, **spec)
    assert out.dtype == torch.float32
    assert out.shape == ref.shape
    tol = TOL[dtype]
    assert _rel(out.detach().cpu(), ref.detach()) < tol

    if ref.dim() == 0:  # grad_output != 1 exercises the backward scaling
        (ref * 0.7).backward()
        (out * 0.7).backward()
    else:  # arbitrary upstream gradient, so per-token scaling is really tested
        up = torch.rand(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
        ref.backward(up)
        out.backward(up.float().to(DEV))
    assert ho.grad.dtype == dtype and torch.isfinite(ho.grad).all()
    assert _rel(ho.grad.cpu(), hr.grad) < tol
    if frozen:
        assert wo.grad is None
    else:
        assert wo.grad.dtype == dtype
        assert _rel(wo.grad.cpu(), wr.grad) < tol
    if b is not None:
        assert _rel(bo.grad.cpu(), br.grad) < tol
    # ignored rows get exactly zero hidden gradient
    assert (ho.grad.cpu()[y == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_labels_ignored_gives_zero_not_nan(backend, reduction):
    h, w, b, _ = _inputs(torch.float32, bias=True)
    y = torch.full((N,), -100)
    ho, wo, bo = (_leaf(t) for t in (h, w, b))
    out = fused_linear_cross_entropy(ho, wo, y.to(DEV), bias=bo, reduction=reduction,
                                     _backend=backend)
    assert torch.isfinite(out).all() and (out == 0).all()
    out.sum().backward()
    for t in (ho, wo, bo):
        assert t.grad is not None and torch.isfinite(t.grad).all() and (t.grad == 0).all()
    out = fused_linear_cross_entropy(h.to(DEV), w.to(DEV), y.to(DEV), num_items_in_batch=0,
                                     _backend=backend)
    assert float(out.detach()) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stats_match_reference(backend, dtype):
    softcap, scale, smoothing = 3.0, 1.2, 0.1
    h, w, _, y = _inputs(dtype, seed=7)
    # make a few rows hit their argmax, so is_top1 has both values
    z64 = (h.double() @ w.double().t()) * scale
    y[:5] = z64[:5].argmax(-1)
    hr = _leaf(h.double(), "cpu")
    z = softcap * torch.tanh((hr @ w.double().t()) * scale / softcap)
    ref = F.cross_entropy(z, y, reduction="none", label_smoothing=smoothing)
    p = torch.softmax(z, -1)
    ent_ref = -(p * torch.log_softmax(z, -1)).sum(-1)
    valid = y != -100
    top1_ref = (z.argmax(-1) == y) & valid

    ho = _leaf(h)
    st = fused_linear_cross_entropy_stats(ho, w.to(DEV), y.to(DEV), softcap=softcap,
                                          logit_scale=scale, label_smoothing=smoothing,
                                          _backend=backend, _chunk_rows=16)
    tol = TOL[dtype]
    assert st.loss.shape == (N,) and st.entropy.shape == (N,) and st.is_top1.dtype == torch.bool
    assert not st.entropy.requires_grad and not st.is_top1.requires_grad
    assert _rel(st.loss.detach().cpu(), ref.detach()) < tol
    assert _rel(st.entropy.cpu()[valid], ent_ref.detach()[valid]) < tol
    assert (st.entropy.cpu()[~valid] == 0).all()
    assert torch.equal(st.is_top1.cpu(), top1_ref)
    assert st.is_top1[:5].all()
    (st.loss.sum()).backward()
    ref.sum().backward()
    assert _rel(ho.grad.cpu(), hr.grad) < tol

    # reduced loss from the stats variant equals the plain function's
    st2 = fused_linear_cross_entropy_stats(h.to(DEV), w.to(DEV), y.to(DEV), reduction="mean",
                                           softcap=softcap, logit_scale=scale,
                                           label_smoothing=smoothing, _backend=backend)
    assert st2.loss.dim() == 0
    mref = float(ref.detach()[valid].mean())
    assert abs(float(st2.loss.detach()) - mref) < tol * mref


@pytest.mark.parametrize("dw_accum", ["fp32", "native"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dw_accumulation_modes(backend, dw_accum):
    h, w, _, y = _inputs(torch.bfloat16, seed=3)
    hr, wr = _leaf(h.double(), "cpu"), _leaf(w.double(), "cpu")
    _reference(hr, wr, y).backward()
    ho, wo = _leaf(h), _leaf(w)
    fused_linear_cross_entropy(ho, wo, y.to(DEV), _backend=backend, _chunk_rows=8,
                               _dw_accum=dw_accum).backward()
    assert wo.grad.dtype == torch.bfloat16
    # Triton's interpreter converts fp32 to bf16 by truncation, not round-to-nearest (half of the values
    # differ): with native accumulation over 5 chunks that bias shows (1.02e-2 here; torch path 3.5e-3)
    tol = 1.5e-2 if backend == "triton" and DEV == "cpu" else 1e-2
    assert _rel(wo.grad.cpu(), wr.grad) < tol


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton unavailable")
def test_triton_multi_block_rows(monkeypatch):
    """Rows longer than one block (the online max / sum-exp across blocks), several rows/program."""
    monkeypatch.setenv("SFT_PLUGINS_CE_BLOCK_V", "128")  # 300 = 2 full blocks + a masked tail
    monkeypatch.setenv("SFT_PLUGINS_CE_PROGRAMS_PER_SM", "3")  # CPU: a grid of 3 programs
    h, w, _, y = _inputs(torch.float32, seed=5)
    hr, wr = _leaf(h.double(), "cpu"), _leaf(w.double(), "cpu")
    ref = _reference(hr, wr, y, softcap=2.0, label_smoothing=0.05)
    ref.backward()
    ho, wo = _leaf(h), _leaf(w)
    st = fused_linear_cross_entropy_stats(ho, wo, y.to(DEV), reduction="mean", softcap=2.0,
                                          label_smoothing=0.05, _backend="triton")
    st.loss.backward()
    assert _rel(st.loss.detach().cpu(), ref.detach()) < 2e-5
    assert _rel(ho.grad.cpu(), hr.grad) < 2e-5
    assert _rel(wo.grad.cpu(), wr.grad) < 2e-5


def _jumping_rows():
    """fp32 inputs whose logits' row max climbs > 60 above the first 128-wide block's, twice: at vocab
    150 (second block) and 290 (the masked tail block); some labels sit on the jumps."""
    h, w, _, y = _inputs(torch.float32, seed=31)
    h[:, 0] = 1.0
    w[:, 0] = 0.0
    w[150, 0], w[290, 0] = 70.0, 140.0
    y[:5], y[5:10] = 290, 150
    return h, w, y


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton unavailable")
@pytest.mark.parametrize("softcap", [None, 200.0], ids=["plain", "softcap"])
def test_one_pass_rebases_rows_whose_max_jumps(monkeypatch, softcap):
    # the one-pass kernel stores exp(z - ref) against the first block's max; a later block whose max is
    # more than 60 above it (e^60) must rescale what was written, not overflow
    monkeypatch.setenv("SFT_PLUGINS_CE_BLOCK_V", "128")
    h, w, y = _jumping_rows()
    hr, wr = _leaf(h.double(), "cpu"), _leaf(w.double(), "cpu")
    z = hr @ wr.t()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    ref = F.cross_entropy(z, y, reduction="none")
    valid = y != -100
    ent_ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    ho, wo = _leaf(h), _leaf(w)
    st = fused_linear_cross_entropy_stats(ho, wo, y.to(DEV), reduction="mean", softcap=softcap,
                                          _backend="triton", _chunk_rows=16)
    st.loss.backward()
    ref[valid].mean().backward()
    assert _rel(st.loss.detach().cpu(), ref[valid].mean().detach()) < 2e-5
    # the rows are near one-hot (entropy ~1e-21): lse - E[z] cancels at |z| ~ 140, so absolute
    torch.testing.assert_close(st.entropy.cpu()[valid], ent_ref.detach()[valid].float(), rtol=0, atol=1e-4)
    assert torch.equal(st.is_top1.cpu(), (z.argmax(-1) == y) & valid)
    assert _rel(ho.grad.cpu(), hr.grad) < 2e-5
    assert _rel(wo.grad.cpu(), wr.grad) < 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_pass_equals_two_pass(monkeypatch, backend, dtype, reduction):
    # same bf16/fp32 logits buffer, read once (unnormalised values + per-row factor) or twice
    h, w, _, y = _inputs(dtype, seed=41)
    up = torch.rand(N, generator=torch.Generator().manual_seed(2)) + 0.5
    results = {}
    for one_pass in ("1", "0"):
        monkeypatch.setenv("SFT_PLUGINS_CE_ONE_PASS", one_pass)
        ho, wo = _leaf(h), _leaf(w)
        st = fused_linear_cross_entropy_stats(ho, wo, y.to(DEV), reduction=reduction, softcap=20.0,
                                              logit_scale=1.1, _backend=backend, _chunk_rows=12)
        (st.loss * 0.7 if reduction == "mean" else st.loss * up.to(DEV)).sum().backward()
        results[one_pass] = [t.detach().cpu() for t in (st.loss, st.entropy, st.is_top1, ho.grad, wo.grad)]
    one, two = results["1"], results["0"]
    for a, b_ in zip(one[:3], two[:3]):  # fp32 statistics of the same logits
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)
    grad_tol = 2e-5 if dtype == torch.float32 else 1e-2  # bf16: values rounded before vs after the 1/sum
    assert _rel(one[3], two[3]) < grad_tol and _rel(one[4], two[4]) < grad_tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_no_grad_and_autocast(backend):
    h, w, _, y = _inputs(torch.float32, seed=11)
    ref = _reference(h.double(), w.double(), y)
    # [B, T, H] input, labels [B, T]
    out = fused_linear_cross_entropy(h.view(4, 10, H).to(DEV), w.to(DEV), y.view(4, 10).to(DEV),
                                     _backend=backend)
    assert _rel(out.cpu(), ref) < 2e-5
    none = fused_linear_cross_entropy(h.view(4, 10, H).to(DEV), w.to(DEV),
                                      y.view(4, 10).to(DEV), reduction="none", _backend=backend)
    assert none.shape == (4, 10)
    # eval: no graph, no gradient work
    ho = _leaf(h)
    with torch.no_grad():
        out = fused_linear_cross_entropy(ho, w.to(DEV), y.to(DEV), _backend=backend)
    assert not out.requires_grad and _rel(out.cpu(), ref) < 2e-5
    # autocast to bf16 with fp32 master weights: grads come back in the parameters' dtype
    ho = _leaf(h)
    wo = _leaf(w)
    with torch.autocast(device_type=DEV, dtype=torch.bfloat16):
        out = fused_linear_cross_entropy(ho, wo, y.to(DEV), _backend=backend)
    out.backward()
    assert ho.grad.dtype == torch.float32 and wo.grad.dtype == torch.float32
    hr, wr = _leaf(h.double(), "cpu"), _leaf(w.double(), "cpu")
    _reference(hr, wr, y).backward()
    assert _rel(out.detach().cpu(), ref) < 2e-2
    assert _rel(wo.grad.cpu(), wr.grad) < 2e-2


def test_second_backward_raises_instead_of_silent_zero():
    h, w, _, y = _inputs(torch.float32)
    ho = _leaf(h)
    out = fused_linear_cross_entropy(ho, w.to(DEV), y.to(DEV), _backend="torch")
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.backward()


def test_bad_arguments():
    h, w, _, y = _inputs(torch.float32)
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(h, w[:, :-1], y)
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(h, w, y[:-1])


@pytest.mark.parametrize("split", ["4", "8"])  # V = 300: 4 even slices; 8 slices + a 4-column tail
@pytest.mark.parametrize("backend", BACKENDS)
def test_dh_split_k(backend, split, monkeypatch):
    monkeypatch.setenv("SFT_PLUGINS_CE_DH_SPLIT", split)
    h, w, _, y = _inputs(torch.bfloat16, seed=13)
    hr, wr = _leaf(h.double(), "cpu"), _leaf(w.double(), "cpu")
    _reference(hr, wr, y, reduction="sum").backward()
    ho, wo = _leaf(h), _leaf(w)
    fused_linear_cross_entropy(ho, wo, y.to(DEV), reduction="sum", _backend=backend,
                               _chunk_rows=16).backward()
    assert _rel(ho.grad.cpu(), hr.grad) < 1e-2
    assert _rel(wo.grad.cpu(), wr.grad) < 1e-2


def test_workspace_is_bounded_and_ignored_rows_skip_the_gemms(monkeypatch):
    from sft_plugins.kernels._function import _plan_chunk_rows

    # real shapes: the [C, V] logits buffer stays inside the budget and the chunks are balanced
    budget = 240 << 20
    for n, h_, v in ((7373, 4096, 128256), (14745, 2048, 128256), (7373, 2304, 256000)):
        rows = _plan_chunk_rows(n, v, h_, 2, "triton", budget)
        assert rows * (v * 2 + 2 * h_ * 2) <= budget
        chunks = -(-n // rows)
        assert n - (chunks - 1) * rows > rows // 2  # no tiny last chunk

    # only valid rows reach the logits GEMM ([C, H] x [H, V]), in chunks of at most _chunk_rows
    seen = []
    real_mm = torch.mm

    def spy(a, b, **kw):
        if b.shape[-1] == V:  # the logits GEMM: h_c @ W^T
            seen.append(a.shape[0])
        return real_mm(a, b, **kw)

    monkeypatch.setattr(torch, "mm", spy)
    h, w, _, y = _inputs(torch.float32, n_ignored=15)
    fused_linear_cross_entropy(_leaf(h), _leaf(w), y.to(DEV), _backend="torch", _chunk_rows=8)
    assert sum(seen) == int((y != -100).sum()) and max(seen) <= 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the hardware tanh exists on CUDA only")
def test_hardware_tanh_softcap_matches_the_exact_path(monkeypatch):
    # bf16 logits with softcap use tanh.approx.f32 on CUDA; wide logits (std ~8, many near the cap)
    # are where an approximation would show: loss and gradients must agree with the exact path
    g = torch.Generator().manual_seed(5)
    n, hd, v = 512, 64, 4096
    h = (torch.randn(n, hd, generator=g) * 8 / hd**0.5).bfloat16().cuda()
    w = torch.randn(v, hd, generator=g).bfloat16().cuda()
    y = torch.randint(0, v, (n,), generator=g).cuda()
    out = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("SFT_PLUGINS_CE_TANH", mode)
        ho, wo = _leaf(h), _leaf(w)
        loss = fused_linear_cross_entropy(ho, wo, y, softcap=30.0, _backend="triton")
        loss.backward()
        out[mode] = (loss.detach(), ho.grad, wo.grad)
    assert _rel(out["1"][0], out["0"][0]) < 1e-4
    assert _rel(out["1"][1], out["0"][1]) < 5e-3 and _rel(out["1"][2], out["0"][2]) < 5e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the run-time choice of the row kernel's shape is CUDA only")
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
def test_run_time_row_kernel_choice_matches_a_fixed_shape(monkeypatch, softcap):
    # the tuner times each shape on the first chunk in place (restoring it between runs): the chunk it
    # then computes must equal a fixed launch's, and the choice is kept for the row shape
    from sft_plugins.kernels import _triton_ce

    g = torch.Generator().manual_seed(7)
    n, hd, v = 1024, 64, 32000
    h = (torch.randn(n, hd, generator=g) / hd**0.5).bfloat16().cuda()
    w = torch.randn(v, hd, generator=g).bfloat16().cuda()
    y = torch.randint(0, v, (n,), generator=g).cuda()
    out = {}
    for mode in ("tuned", "fixed"):
        if mode == "fixed":
            monkeypatch.setenv("SFT_PLUGINS_CE_BLOCK_V", "4096")
            monkeypatch.setenv("SFT_PLUGINS_CE_NUM_WARPS", "8")
        ho, wo = _leaf(h), _leaf(w)
        loss = fused_linear_cross_entropy(ho, wo, y, softcap=softcap, _backend="triton", _chunk_rows=256)
        loss.backward()
        out[mode] = (loss.detach(), ho.grad, wo.grad)
    tuner = _triton_ce._one_pass_tuned
    assert tuner is not None, "the tuned kernel did not run"
    chosen = [c for key, c in tuner.cache.items() if key[0] == v]  # the key starts with V (then the flags)
    assert chosen and all(c.kwargs["BLOCK_V"] in {b for b, _ in _triton_ce.ONE_PASS_CONFIGS} for c in chosen)
    torch.testing.assert_close(out["tuned"][0], out["fixed"][0], rtol=1e-5, atol=0)
    # the block size changes the order of the fp32 row sums only
    assert _rel(out["tuned"][1], out["fixed"][1]) < 1e-2 and _rel(out["tuned"][2], out["fixed"][2]) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_ignored", [0, 8, 35, 40], ids=["none", "some", "most", "all"])
def test_first_chunk_launched_before_the_count_gives_the_same_result(backend, n_ignored):
    # N = 40 rows in chunks of 8: a batch of >= 4 chunks, so the first chunk's GEMM is launched before the
    # count of valid rows is read (with 35 ignored only 5 of its rows are valid; all ignored: none)
    h, w, b, y = _inputs(torch.float32, n_ignored=n_ignored, bias=True, seed=21)
    results = []
    for chunk_rows in (8, N):  # early first chunk vs one chunk planned from the count
        ho, wo, bo = _leaf(h), _leaf(w), _leaf(b)
        st = fused_linear_cross_entropy_stats(ho, wo, y.to(DEV), bias=bo, reduction="mean", softcap=5.0,
                                              _backend=backend, _chunk_rows=chunk_rows)
        st.loss.backward()
        results.append([t.detach().cpu() for t in (st.loss, st.entropy, st.is_top1, ho.grad, wo.grad, bo.grad)])
    for a, b_ in zip(*results):
        assert torch.isfinite(a.float()).all()
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)
