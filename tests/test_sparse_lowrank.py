"""SparseLowRankLinear, its autograd Function, support sampling, and LowRankLinear (the kernels side by side, and
the factored kernel's own checks, are in test_kernels.py)."""
import io
import math

import pytest
import torch
import torch.nn.functional as F

from sltrain_cli.core.lowrank import LowRankLinear
from sltrain_cli.core.sparse_lowrank import SparseLowRankLinear, sample_support

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _randomize(layer, seed=0):
    """B starts at zero; give every factor nonzero values so every gradient path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.5)
    return layer


def _reference(layer, x):
    """The same function with the dense weight built from ordinary, autograd-tracked ops."""
    out_f, in_f = layer.out_features, layer.in_features
    W = torch.zeros(out_f * in_f, dtype=x.dtype, device=x.device)
    if layer.values is not None:
        W = W.index_put((layer.indices.long(),), layer.values.to(x.dtype))
    W = W.view(out_f, in_f)
    if layer.A is not None:
        W = W + (layer.alpha / layer.rank) * (layer.B @ layer.A).to(x.dtype)
    return F.linear(x, W, None if layer.bias is None else layer.bias.to(x.dtype))


def _grads(layer, x, fn):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view(y.shape)).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("shape", [(24, 24), (24, 40), (40, 24)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_gradients_match_plain_autograd(shape, bias, ndim, index_dtype):
    n_in, n_out = shape
    layer = _randomize(SparseLowRankLinear(n_in, n_out, rank=4, delta=0.1, alpha=8.0, bias=bias, support_seed=3,
                                           index_dtype=index_dtype))
    assert layer.indices.dtype == index_dtype
    x = torch.randn((5, n_in) if ndim == 2 else (2, 5, n_in))
    y, dx, grads = _grads(layer, x, layer)
    y_ref, dx_ref, grads_ref = _grads(layer, x, lambda t: _reference(layer, t))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys() == {"A", "B", "values"} | ({"bias"} if bias else set())
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("rank,delta", [(3, 0.2), (0, 0.2), (3, 0.0)])
def test_gradcheck_float64(rank, delta):
    layer = _randomize(SparseLowRankLinear(7, 5, rank=rank, delta=delta, alpha=6.0, bias=True, support_seed=0))
    layer.double()
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    assert torch.autograd.gradcheck(fn, (x, *params))


def test_forward_saves_no_dense_weight():
    n_in, n_out, tokens = 64, 96, 8
    layer = _randomize(SparseLowRankLinear(n_in, n_out, rank=8, delta=0.05, alpha=16.0, bias=True, support_seed=0,
                                           kernel="compose"))  # factored's saved set: test_kernels.py
    x = torch.randn(2, tokens, n_in, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert saved, "the Function saved nothing?"
    assert not any(tuple(t.shape) == (n_out, n_in) for t in saved), [tuple(t.shape) for t in saved]
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    budget = sum(nbytes(t) for t in (x, layer.A, layer.B, layer.values, layer.indices))
    assert sum(nbytes(t) for t in saved) <= budget
    y.sum().backward()  # and the saved set suffices for backward
    assert x.grad is not None and layer.values.grad is not None


def test_proposition1_sparse_plus_lowrank_is_full_rank():
    n, r = 256, 8
    layer = SparseLowRankLinear(n, n, rank=r, delta=0.03, alpha=float(r), support_seed=0)
    torch.nn.init.normal_(layer.B, std=0.1)  # B starts at zero; any nonzero B
    layer.double()  # exact enough that the numerical rank is the rank
    with torch.no_grad():
        W = layer.dense_weight()
        lowrank = layer.scale * layer.B @ layer.A
    assert int(torch.linalg.matrix_rank(W)) == n
    assert int(torch.linalg.matrix_rank(lowrank)) == r


def test_init_and_shapes():
    layer = SparseLowRankLinear(100, 60, rank=16, delta=0.03, alpha=32.0, support_seed=0)
    assert layer.A.shape == (16, 100) and layer.B.shape == (60, 16)
    assert layer.nnz == int(0.03 * 100 * 60) == layer.values.numel() == layer.indices.numel()
    assert torch.all(layer.B == 0)
    assert layer.A.abs().max() <= 1 / math.sqrt(100) and layer.values.abs().max() <= 1 / math.sqrt(100)
    idx = layer.indices
    assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all()) and 0 <= int(idx[0]) and int(idx[-1]) < 6000
    # at init W = S exactly
    S = torch.zeros(6000).index_put((idx,), layer.values.detach()).view(60, 100)
    torch.testing.assert_close(layer.dense_weight().detach(), S)
    assert "rank=16" in repr(layer) and "nnz=180" in repr(layer)

    sparse_only = SparseLowRankLinear(100, 60, rank=0, delta=0.1, alpha=1.0)
    assert sparse_only.A is None and sparse_only.B is None and sparse_only.nnz == 600
    lowrank_only = SparseLowRankLinear(100, 60, rank=4, delta=0.0, alpha=1.0)
    assert lowrank_only.values is None and lowrank_only.indices is None
    x = torch.randn(3, 100)
    torch.testing.assert_close(lowrank_only(x), x @ lowrank_only.dense_weight().T)
    with pytest.raises(ValueError, match=r"rank 61 exceeds min\(in_features, out_features\)=60"):
        SparseLowRankLinear(100, 60, rank=61, delta=0.03, alpha=1.0)
    with pytest.raises(ValueError, match="rank >= 1"):
        SparseLowRankLinear(100, 60, rank=0, delta=0.0, alpha=1.0)


def test_support_reproducible_independent_and_checkpointed():
    a = SparseLowRankLinear(64, 48, rank=4, delta=0.05, alpha=8.0, support_seed=7)
    torch.manual_seed(123)  # the global RNG has no say in the support
    b = SparseLowRankLinear(64, 48, rank=4, delta=0.05, alpha=8.0, support_seed=7)
    c = SparseLowRankLinear(64, 48, rank=4, delta=0.05, alpha=8.0, support_seed=8)
    assert torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, c.indices)
    before = a.indices.clone()
    a.reset_parameters()
    assert torch.equal(a.indices, before)  # re-init redraws the same support from the seed

    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(c.indices, a.indices) and torch.equal(c.values, a.values)
    x = torch.randn(3, 64)
    torch.testing.assert_close(c(x), a(x))


@pytest.mark.parametrize("kind", ["random", "row_balanced", "block"])
def test_sample_support_kinds(kind):
    out_f, in_f, delta = 50, 40, 0.1
    idx = sample_support(out_f, in_f, delta, kind, torch.Generator().manual_seed(0), block_size=4)
    assert idx.dtype == torch.int64 and idx.numel() == int(delta * in_f * out_f)
    assert bool((idx[1:] > idx[:-1]).all()) and int(idx[0]) >= 0 and int(idx[-1]) < out_f * in_f
    again = sample_support(out_f, in_f, delta, kind, torch.Generator().manual_seed(0), block_size=4)
    assert torch.equal(idx, again)
    rows = torch.bincount(idx // in_f, minlength=out_f)
    if kind == "row_balanced":
        assert int(rows.max() - rows.min()) <= 1
    if kind == "block":
        mask = torch.zeros(out_f * in_f, dtype=torch.bool)
        mask[idx] = True
        full = mask.view(out_f, in_f)[: out_f // 4 * 4, : in_f // 4 * 4].reshape(out_f // 4, 4, in_f // 4, 4)
        per_tile = full.sum((1, 3))
        assert int(((per_tile > 0) & (per_tile < 16)).sum()) <= 1  # whole tiles, except the one cut short


def test_sample_support_random_is_uniform():
    counts = torch.zeros(24)
    for s in range(1500):
        counts[sample_support(4, 6, 0.25, "random", torch.Generator().manual_seed(s))] += 1
    freq = counts / 1500
    assert float((freq - 0.25).abs().max()) < 0.06  # each position ~ 6/24 of the time


def test_sample_support_top_and_set_support():
    ref = torch.randn(12, 10)
    idx = sample_support(12, 10, 0.1, "top", reference=ref)
    expected = ref.abs().flatten().topk(12).indices.sort().values
    assert torch.equal(idx, expected)
    with pytest.raises(ValueError, match="reference"):
        sample_support(12, 10, 0.1, "top")

    layer = SparseLowRankLinear(10, 12, rank=2, delta=0.1, alpha=2.0, index_dtype=torch.int32)
    new = torch.tensor([5, 1, 30, 119])
    layer.set_support(new, torch.tensor([0.5, 0.1, 3.0, 11.9]))
    assert layer.indices.dtype == torch.int32 and layer.indices.tolist() == [1, 5, 30, 119]
    assert layer.values.tolist() == pytest.approx([0.1, 0.5, 3.0, 11.9])
    W = layer.dense_weight().detach().flatten()
    assert float(W[119]) == pytest.approx(11.9)
    layer.reset_parameters()  # an explicit support is kept through re-init
    assert layer.indices.tolist() == [1, 5, 30, 119] and layer.values.abs().max() <= 1 / math.sqrt(10)
    with pytest.raises(ValueError, match="unique"):
        layer.set_support(torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"\[0, 120\)"):
        layer.set_support(torch.tensor([120]))


def test_bf16_params_and_cpu_autocast():
    layer = _randomize(SparseLowRankLinear(48, 32, rank=4, delta=0.1, alpha=8.0, bias=True, support_seed=0))
    x = torch.randn(4, 6, 48)
    y32, dx32, g32 = _grads(layer, x, layer)

    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed: fp32 params, bf16 compute
        y, dx, g = _grads(layer, x, layer)
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in g.values()) and g.keys() == g32.keys()
    for name in g:
        torch.testing.assert_close(g[name], g32[name], rtol=0.05, atol=0.05 * float(g32[name].abs().max()))
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.1)

    layer.to(torch.bfloat16)  # bf16-pure
    yb, dxb, gb = _grads(layer, x.bfloat16(), layer)
    assert yb.dtype == dxb.dtype == torch.bfloat16 and all(v.dtype == torch.bfloat16 for v in gb.values())
    torch.testing.assert_close(yb.float(), y32, rtol=0.05, atol=0.1)
    for name in gb:
        torch.testing.assert_close(gb[name].float(), g32[name], rtol=0.05, atol=0.05 * float(g32[name].abs().max()))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    layer = _randomize(SparseLowRankLinear(256, 192, rank=16, delta=0.03, alpha=32.0, bias=True, support_seed=0,
                                           index_dtype=torch.int32)).cuda().to(dtype)
    x = torch.randn(4, 64, 256, device="cuda", dtype=dtype)
    y, dx, g = _grads(layer, x, layer)
    y_ref, dx_ref, g_ref = _grads(layer, x, lambda t: _reference(layer, t))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.03, atol=0.03)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    for name in g:
        scale = float(g_ref[name].abs().max())
        torch.testing.assert_close(g[name], g_ref[name], rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer.float()
        y = layer(x.float())
    assert y.dtype == torch.bfloat16


def test_lowrank_linear():
    layer = LowRankLinear(40, 24, rank=6, bias=True)
    assert layer.A.shape == (6, 40) and layer.B.shape == (24, 6)
    assert layer.A.abs().max() > 0 and layer.B.abs().max() > 0  # both random: a pure low-rank model must train
    x = torch.randn(2, 5, 40)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias))
    scaled = LowRankLinear(40, 24, rank=6, alpha=12.0)
    assert scaled.scale == 2.0
    torch.testing.assert_close(scaled(x), x @ scaled.dense_weight().T)
    torch.testing.assert_close(scaled.dense_weight(), 2.0 * scaled.B @ scaled.A)
    with pytest.raises(ValueError, match=r"rank 25 exceeds min\(in_features, out_features\)=24"):
        LowRankLinear(40, 24, rank=25)
