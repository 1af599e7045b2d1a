"""SparseLowRankLinear's kernels: compose and factored compute the same function and gradients; factored keeps no
(out, in) tensor; its cached CSR structure follows the support; auto decides once and reproducibly."""
import copy
import io
import json
import pickle
import shutil

import pytest
import torch
import torch.nn.functional as F

import sltrain_cli.core.sparse_kernels as sk
from sltrain_cli.core.kernel_choice import choose_kernel, kernel_cost
from sltrain_cli.core.sparse_lowrank import SparseLowRankLinear, choose_kernels

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

KERNELS = ["compose", "factored"]


def _layer(n_in=24, n_out=40, rank=4, delta=0.1, bias=True, kernel="factored", index_dtype=torch.int64, seed=0):
    layer = SparseLowRankLinear(n_in, n_out, rank=rank, delta=delta, alpha=8.0, bias=bias, support_seed=3,
                                index_dtype=index_dtype, kernel=kernel)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero: give every factor values so that every gradient path is exercised
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer


def _reference(layer, x):
    """x @ dense_weight().T + bias, plain autograd, in x's dtype."""
    W = layer.dense_weight().to(x.dtype)
    return F.linear(x, W, None if layer.bias is None else layer.bias.to(x.dtype))


def _run(layer, x, fn):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=torch.float32).view(y.shape).to(y.dtype)
    (y * w).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def _assert_same(got, want, rtol, atol):
    (y, dx, g), (y_ref, dx_ref, g_ref) = got, want
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(dx, dx_ref, rtol=rtol, atol=atol)
    assert g.keys() == g_ref.keys()
    for name in g:
        scale = max(1.0, float(g_ref[name].abs().max()))
        torch.testing.assert_close(g[name], g_ref[name], rtol=rtol, atol=atol * scale, msg=name)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rank,delta,bias", [(4, 0.1, True), (4, 0.1, False), (0, 0.2, True), (4, 0.0, False)])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_kernels_match_autograd_reference_fp32(kernel, rank, delta, bias, ndim, index_dtype):
    layer = _layer(rank=rank, delta=delta, bias=bias, kernel=kernel, index_dtype=index_dtype)
    assert layer.chosen_kernel == kernel
    x = torch.randn((7, 24) if ndim == 2 else (2, 7, 24))
    got = _run(layer, x, layer)
    assert got[0].shape == (*x.shape[:-1], 40)
    _assert_same(got, _run(layer, x, lambda t: _reference(layer, t)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rank,delta", [(4, 0.1), (0, 0.2)])
def test_kernels_match_reference_bf16(kernel, rank, delta):
    layer = _layer(rank=rank, delta=delta, kernel=kernel)
    x = torch.randn(3, 6, 24)
    want = _run(layer, x, lambda t: _reference(layer, t))  # fp32 truth
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed: fp32 parameters, bf16 compute
        y, dx, g = _run(layer, x, layer)
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.float32 and all(v.dtype == torch.float32 for v in g.values())
    _assert_same((y.float(), dx, g), want, rtol=0.05, atol=0.1)
    layer.to(torch.bfloat16)  # bf16-pure
    y, dx, g = _run(layer, x.bfloat16(), layer)
    assert y.dtype == dx.dtype == torch.bfloat16 and all(v.dtype == torch.bfloat16 for v in g.values())
    _assert_same((y.float(), dx.float(), {n: v.float() for n, v in g.items()}), want, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("bwd_steps", [(5, 5), (4, 7), (7, 3)])  # backward: one shared loop, or one per product
def test_factored_equals_compose_when_every_loop_runs_in_chunks(monkeypatch, bwd_steps):
    # tiny slabs and chunks: the token loops of the sparse products and of the recomputed x A^T run many times
    monkeypatch.setattr(sk, "_SLAB_BYTES", 64)
    monkeypatch.setattr(sk, "_bwd_steps", lambda in_f, out_f, tokens: bwd_steps)
    monkeypatch.setattr(sk, "_lowrank_chunk", lambda rank, out_f, in_f: 7)
    layer = _layer(n_in=6, n_out=5, rank=2, delta=0.3, kernel="factored")  # T r = 60 > in out = 30: recompute x A^T
    x = torch.randn(30, 6)
    _assert_same(_run(layer, x, layer), _run(layer, x, lambda t: _reference(layer, t)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank,delta,shuffled", [(3, 0.2, False), (0, 0.2, False), (3, 0.0, False), (3, 0.2, True)])
def test_factored_gradcheck_float64(rank, delta, shuffled):
    layer = _layer(n_in=7, n_out=5, rank=rank, delta=delta, bias=True, kernel="factored").double()
    if shuffled:  # a support stored out of row-major order (values permuted alike): the CSR permutations are used
        perm = torch.randperm(layer.nnz, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            layer.indices.copy_(layer.indices[perm].clone())
            layer.values.copy_(layer.values[perm].clone())
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("tokens", [8, 1000])  # x A^T (tokens, 8) kept at 8 tokens, recomputed at 1000
def test_factored_saves_no_dense_tensor(tokens):
    n_in, n_out, rank = 64, 96, 8
    layer = _layer(n_in, n_out, rank=rank, delta=0.05, kernel="factored")
    x = torch.randn(2, tokens // 2, n_in, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved, "the Function saved nothing?"
    shapes = [tuple(t.shape) for t in saved]
    assert not any(s in ((n_out, n_in), (n_in, n_out)) for s in shapes), shapes
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    budget = sum(nbytes(t) for t in (x, layer.A, layer.B, layer.values))
    budget += tokens * rank * 4 if 2 * tokens * rank <= n_in * n_out else 0  # x A^T, when kept
    assert sum(nbytes(t) for t in saved) <= budget, shapes
    y.sum().backward()  # and what was saved suffices
    assert x.grad is not None and layer.values.grad is not None and layer.A.grad is not None


def test_csr_cache_follows_the_support_and_is_never_state():
    layer = _layer(kernel="factored")
    other = _layer(kernel="factored")
    other.set_support(torch.arange(0, 960, 7))  # a different support (and size)
    x = torch.randn(5, 24)

    def check(m):
        torch.testing.assert_close(m(x), _reference(m, x), rtol=1e-5, atol=1e-5)

    check(layer)
    plan = layer._csr._plan
    check(layer)
    assert layer._csr._plan is plan  # built once, reused
    assert not any("csr" in k for k in layer.state_dict())
    # load_state_dict copies new indices into the buffer in place: the cached structure must be rebuilt
    fresh = SparseLowRankLinear(24, 40, rank=4, delta=0.1, alpha=8.0, bias=True, support_seed=99, kernel="factored")
    check(fresh)
    before = fresh._csr._plan
    state = {k: v for k, v in layer.state_dict().items()}
    fresh.load_state_dict(state)
    assert torch.equal(fresh.indices, layer.indices)
    check(fresh)
    assert fresh._csr._plan is not before
    # set_support with another size, then back to the seeded draw (reset_support, in place)
    fresh.set_support(other.indices, other.values.detach())
    check(fresh)
    fresh.reset_support()
    fresh.values = torch.nn.Parameter(torch.randn(fresh.indices.numel()))
    check(fresh)
    # an unsorted support loaded into the buffer (values permuted to match) still computes the same function
    perm = torch.randperm(layer.indices.numel(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.indices.copy_(layer.indices[perm].clone())
        layer.values.copy_(layer.values[perm].clone())
    check(layer)
    assert layer._csr._plan.perm is not None
    # dtype and device moves, copies and pickles start from a structure of their own
    layer.double()
    torch.testing.assert_close(layer(x.double()), _reference(layer, x.double()))
    clone = copy.deepcopy(layer)
    assert clone._csr._plan is None
    torch.testing.assert_close(clone(x.double()), layer(x.double()))
    buf = io.BytesIO()
    torch.save(layer, buf)  # a whole-module pickle works (the cache pickles as empty)
    assert pickle.loads(pickle.dumps(layer._csr))._plan is None


def test_auto_decides_once_and_reproducibly(monkeypatch):
    import sltrain_cli.core.sparse_lowrank as sl

    calls = []

    def flip(tokens, *args, **kwargs):  # a cost model that would answer differently every time
        calls.append(tokens)
        return KERNELS[len(calls) % 2]

    layer = _layer(kernel="auto")
    assert layer.chosen_kernel is None and "kernel=auto" in repr(layer)
    with monkeypatch.context() as m:
        m.setattr(sl, "choose_kernel", flip)
        layer(torch.randn(3, 24))
        first = layer.chosen_kernel
        assert first in KERNELS and f"kernel=auto ({first})" in repr(layer)
        layer(torch.randn(2, 50, 24))
        assert layer.chosen_kernel == first and calls == [3]  # decided at the first call, from its 3 tokens; kept
    # the cost model: factored where r (in + out) + nnz is far below in out (1B MLP at 512 tokens), compose where
    # the layer is tiny (call overhead) -- and always the same answer for the same inputs
    big = dict(n_in=2048, n_out=5461, rank=512, nnz=335523, dtype=torch.float32, device="cpu")
    assert choose_kernel(512, **big) == "factored"
    assert choose_kernel(512, 64, 64, 8, 122, torch.float32, "cpu") == "compose"
    assert kernel_cost("factored", 512, **big) < kernel_cost("compose", 512, **big)
    assert [choose_kernel(t, **big) for t in (512, 2048, 8192)] == [choose_kernel(t, **big) for t in (512, 2048, 8192)]

    model = torch.nn.Sequential(_layer(kernel="auto"), torch.nn.ReLU(), _layer(40, 24, kernel="compose"),
                                _layer(24, 40, kernel="auto"))
    kernels = choose_kernels(model, 512, "fp32", "cpu")
    assert set(kernels) == {"24->40", "40->24"} and kernels["40->24"] == "compose"
    assert choose_kernels(model, 1, torch.bfloat16, "cpu") == kernels  # fixed at the first call
    with pytest.raises(ValueError, match="kernel must be one of auto, compose, factored, dense"):
        SparseLowRankLinear(8, 8, 2, 0.1, 1.0, kernel="fast")


# ----------------------------------------------------------------------------------------- runs
def _pretrain(*args):
    from typer.testing import CliRunner

    from sltrain_cli.cli import app

    result = CliRunner().invoke(app, ["pretrain", "--quiet", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)


def _rows(run_dir):
    keep = ("step", "tokens", "loss", "lr", "grad_norm", "val_loss", "val_ppl")  # not timings, not memory
    return [{k: v for k, v in json.loads(line).items() if k in keep}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_curve(a, b, tol=1e-4):
    """The same logged steps, and losses, gradient norms and validation losses to ``tol``."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "val_loss"):
            assert (key in ra) == (key in rb) and abs(ra.get(key, 0) - rb.get(key, 0)) <= tol, (key, ra, rb)


def _copy_at_step_4(run_dir, dest):
    """A copy of a finished run folder as if it had been stopped after step 4 (later checkpoints, summary gone)."""
    from sltrain_cli.checkpoint import LATEST

    shutil.copytree(run_dir, dest)
    for p in (dest / "checkpoints").glob("step_*.pt"):
        if int(p.stem.split("_")[1]) > 4:
            p.unlink()
    (dest / "checkpoints" / LATEST).write_text("step_000004.pt\n")
    (dest / "summary.json").unlink()
    return dest


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow  # three tiny pretrains: ~3 s (the kernels themselves are checked fast above)
def test_factored_and_compose_runs_agree_and_auto_resumes_with_the_same_kernels(tmp_path, cache_dir):
    from typer.testing import CliRunner

    from sltrain_cli.cli import app

    from helpers import tiny_overrides

    base = tiny_overrides(tmp_path, "method=sltrain", "rank=8")
    for kernel in ("compose", "factored", "auto"):
        _pretrain(*base, f"method.kernel={kernel}", f"run_name={kernel}")
    runs = {k: tmp_path / "pretrain" / k for k in ("compose", "factored", "auto")}
    assert set(_summary(runs["factored"])["kernels"].values()) == {"factored"}
    assert set(_summary(runs["compose"])["kernels"].values()) == {"compose"}
    _assert_same_curve(_rows(runs["compose"]), _rows(runs["factored"]))

    # auto: resumed from step 4, the same kernels are chosen and the curve continues identically
    auto = runs["auto"]
    kernels = _summary(auto)["kernels"]
    assert set(kernels) == {"64->64", "64->176", "176->64"}
    resumed = _copy_at_step_4(auto, tmp_path / "pretrain" / "auto_resumed")
    _pretrain(*base, "method.kernel=auto", "run_name=auto_resumed", "train.resume=true")
    assert _summary(resumed)["kernels"] == kernels
    assert _rows(resumed) == _rows(auto)
    # eval-ppl loads the run; its layers choose at their first call from the same token count: the same number
    result = CliRunner().invoke(app, ["eval-ppl", str(auto)])
    assert result.exit_code == 0, result.output
    assert json.loads((auto / "eval" / "sotu.json").read_text())["val_ppl"] == _summary(auto)["val_ppl"]


# ----------------------------------------------------------------------------------------- CUDA (a lent GPU)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_reference(kernel, dtype):
    layer = _layer(256, 192, rank=16, delta=0.03, kernel=kernel, index_dtype=torch.int32).cuda().to(dtype)
    x = torch.randn(4, 64, 256, device="cuda", dtype=dtype)
    got = _run(layer, x, layer)
    want = _run(layer, x, lambda t: _reference(layer, t))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.03, atol=0.03)
    _assert_same(got, want, **tol)
    assert layer._csr._plan is None or layer._csr._plan.device.type == "cuda"
    assert choose_kernels(torch.nn.Sequential(_layer(kernel="auto").cuda()), 512, dtype, "cuda")


@pytest.mark.slow  # torch.compile: ~9 s
def test_compiled_blocks_train_like_eager_and_resume_either_way(tmp_path, cache_dir):
    # train.compile=true: the decoder blocks run under torch.compile (SparseLowRankLinear eager inside); the same loss
    # curve as eager to 1e-4, and a run may be resumed with the flag flipped (it only moves rounding)
    from torch._dynamo.utils import counters

    from helpers import tiny_overrides

    base = tiny_overrides(tmp_path, "method=sltrain", "rank=8", "method.kernel=factored")
    _pretrain(*base, "run_name=eager")
    torch._dynamo.reset()
    counters.clear()
    _pretrain(*base, "train.compile=true", "run_name=compiled")
    assert counters["stats"]["unique_graphs"] >= 1  # something was compiled, not silently run eager
    eager = _rows(tmp_path / "pretrain" / "eager")
    _assert_same_curve(eager, _rows(tmp_path / "pretrain" / "compiled"))
    # an eager run resumed at step 4 under compile
    resumed = _copy_at_step_4(tmp_path / "pretrain" / "eager", tmp_path / "pretrain" / "eager_resumed")
    _pretrain(*base, "run_name=eager_resumed", "train.resume=true", "train.compile=true")
    _assert_same_curve(_rows(resumed), eager)
