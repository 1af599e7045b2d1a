"""The two ways SparseLowRankLinear computes ``y = x W^T + bias``, ``W = s B A + S`` (s = alpha / rank).

``compose`` (the paper's, ``_ComposeFn``): build the dense W (one rank-r matmul, one ``index_add_`` of the values),
do one dense matmul and drop W; backward rebuilds W for ``dx = G W`` and forms the transient dense weight gradient
``Gw = G^T x`` once, from which ``dB = s Gw A^T``, ``dA = s B^T Gw`` and ``dvalues = Gw[indices]``. Multiply-adds per
micro-batch of T tokens: ``(3T + 4r) in out`` -- more than dense, whatever T.

``factored`` (``_FactoredFn``): never build W.

    y  = (x A^T)(s B)^T + x S^T          dx = (g s B) A + g S          dA = (g s B)^T x
    dB = s g^T (x A^T)                   dvalues[k] = sum_t g[t, row_k] x[t, col_k]   (sampled dense-dense product)

S and S^T are CSR sparse-dense products (MKL on CPU, cuSPARSE on CUDA); dvalues is ``torch.sparse.sampled_addmm``
at the support. Multiply-adds: ``3T (r (in + out) + nnz)``. The support is fixed, so the CSR structure of S and S^T
(``CsrPlan``: row pointers, column indices, and the permutations that put the flat ``values`` in CSR order) is built
once per support and cached on the module; the values stay one flat Parameter. It keeps x, A, B, values (and
``x A^T``, T x r, when that is smaller than one dense weight; otherwise recomputes it) -- never an (out, in) tensor.
Tokens are processed in chunks: small ones (a cache-sized slab of x^T) for the sparse products, larger ones for the
rank-r products when ``x A^T`` is recomputed, so temporaries stay bounded. Torch's CPU CSR kernels take fp32 only:
with bf16/fp16 inputs the sparse part runs in fp32 there (so does the rank-r part on CPUs without native bf16).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

_LOW_PRECISION = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------ dtypes
def _cpu_native_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001 -- private helpers; absent means "don't know": take the safe path
        return False


_NATIVE_BF16 = _cpu_native_bf16()


def _work_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # CPUs without native bf16 GEMM fall back to very slow kernels for some layouts; the rank-r product and the
    # factor gradients are small, so on CPU compose does them in fp32 (also more accurate) and only casts W down.
    return torch.float32 if device.type == "cpu" and dtype in _LOW_PRECISION else dtype


def _lowrank_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """factored's rank-r products: the compute dtype, except low precision on a CPU without native bf16."""
    if device.type == "cpu" and dtype in _LOW_PRECISION and not (dtype == torch.bfloat16 and _NATIVE_BF16):
        return torch.float32
    return dtype


def _sparse_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The CSR kernels' dtype: torch's CPU ones take fp32/fp64 only; on CUDA fp32 too unless proven otherwise."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ------------------------------------------------------------------------------------------------ compose
def _build_weight(A, B, values, indices, scale: float, shape, dtype, device) -> torch.Tensor:
    """The dense (out, in) weight (scale * B @ A) + S, contiguous, in ``dtype``. Uses plain ops, no autograd."""
    work = _work_dtype(dtype, device)
    if A is not None:
        a, b = A.to(work), B.to(work)
        # fold the scale into the smaller factor: one pass over r*min(in,out) numbers instead of over W
        if a.numel() <= b.numel():
            W = torch.mm(b, a * scale) if scale != 1.0 else torch.mm(b, a)
        else:
            W = torch.mm(b * scale, a) if scale != 1.0 else torch.mm(b, a)
    else:
        W = torch.zeros(shape, dtype=work, device=device)
    if values is not None:
        # unique indices: index_add_ on a flat view is one pass over nnz entries, no copy of W (CPU scatter_add_ in
        # bf16 copies the whole weight), and it accepts int32 indices as they are
        W.view(-1).index_add_(0, indices, values.to(work))
    return W.to(dtype)


class _ComposeFn(torch.autograd.Function):
    """y = x W^T + bias with W = scale * B A + S(values @ indices); saves x, A, B, values, indices only."""

    @staticmethod
    def forward(ctx, x, A, B, values, indices, bias, scale: float, out_features: int, in_features: int):
        with torch.autocast(x.device.type, enabled=False):  # the module already chose the compute dtype
            W = _build_weight(A, B, values, indices, scale, (out_features, in_features), x.dtype, x.device)
            y = F.linear(x, W, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x, A, B, values, indices)
        ctx.scale, ctx.shape = scale, (out_features, in_features)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, values, indices = ctx.saved_tensors
        need_x, need_A, need_B, need_v = ctx.needs_input_grad[:4]
        need_bias = ctx.needs_input_grad[5]
        out_f, in_f = ctx.shape
        dtype, device = x.dtype, x.device
        work = _work_dtype(dtype, device)
        G = grad_out.reshape(-1, out_f).to(dtype)
        dx = dA = dB = dv = dbias = None
        with torch.autocast(device.type, enabled=False):
            if need_x:
                W = _build_weight(A, B, values, indices, ctx.scale, ctx.shape, work, device)  # rebuilt, not saved
                if work != dtype:
                    # CPU low precision: hold W transposed in memory so that G @ W runs as the fast "NT" bf16 GEMM
                    # (the "NN" fallback is many times slower on CPUs without native bf16); the transpose is folded
                    # into the down-cast copy
                    Wt = torch.empty((in_f, out_f), dtype=dtype, device=device)
                    Wt.copy_(W.t())
                    W = Wt.t()
                dx = torch.mm(G, W).view(x.shape)
                del W
            if need_A or need_B or need_v:
                Gw = torch.mm(G.t(), x.reshape(-1, in_f))  # (out, in): the transient dense weight gradient
                if need_v:
                    dv = Gw.view(-1).index_select(0, indices).to(values.dtype)
                if need_A or need_B:
                    Gw = Gw.to(work)
                    if need_A:
                        dA = torch.mm((B.to(work) * ctx.scale).t(), Gw).to(A.dtype)
                    if need_B:
                        dB = torch.mm(Gw, (A.to(work) * ctx.scale).t()).to(B.dtype)
                del Gw
            if need_bias:
                dbias = G.sum(0).to(ctx.bias_dtype)
        return dx, dA, dB, dv, None, dbias, None, None, None


# ------------------------------------------------------------------------------------------------ CSR plan
def _csr(crow, col, values, size):
    with warnings.catch_warnings():  # "sparse CSR support is in beta" (once per process): not the user's concern
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class CsrPlan:
    """CSR structure of S (out, in) and of S^T (in, out) for one support: row pointers, column indices (int32 where
    they fit) and the permutations of the flat ``values`` into each CSR order (None = already in order, as for the
    sorted row-major supports the layer draws)."""

    def __init__(self, indices: torch.Tensor, out_features: int, in_features: int):
        idx = indices.reshape(-1).to(torch.int64)
        dev = idx.device
        small = max(out_features, in_features, idx.numel()) < 2 ** 31 - 1
        itype = torch.int32 if small else torch.int64
        order = None
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            order = torch.argsort(idx)
            idx = idx[order]
        rows, cols = idx // in_features, idx % in_features
        self.crow = self._crow(rows, out_features).to(itype)
        self.col = cols.to(itype)
        self.perm = order  # values[perm] is S's CSR order
        t_order = torch.argsort(cols * out_features + rows)  # S^T row-major = S column-major
        self.t_crow = self._crow(cols, in_features).to(itype)
        self.t_col = rows[t_order].to(itype)
        self.t_perm = (t_order if order is None else order[t_order]).to(itype)  # index_select takes int32
        self.size, self.nnz, self.device = (out_features, in_features), idx.numel(), dev

    @staticmethod
    def _crow(rows: torch.Tensor, n: int) -> torch.Tensor:
        crow = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
        crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
        return crow

    def S(self, values: torch.Tensor) -> torch.Tensor:
        v = values if self.perm is None else values.index_select(0, self.perm)
        return _csr(self.crow, self.col, v, self.size)

    def St(self, values: torch.Tensor) -> torch.Tensor:
        return _csr(self.t_crow, self.t_col, values.index_select(0, self.t_perm), self.size[::-1])

    def unpermute(self, csr_values: torch.Tensor) -> torch.Tensor:
        """Values in S's CSR order -> the layer's flat order."""
        if self.perm is None:
            return csr_values
        out = torch.empty_like(csr_values)
        out[self.perm] = csr_values
        return out


class CsrCache:
    """A module's cached CsrPlan, keyed on the indices tensor itself (identity, storage, version, device): moving the
    module, ``set_support``/``reset_support`` or loading a state dict all invalidate it. Never pickled or copied
    (a copy starts empty) and not part of any state dict."""

    def __init__(self):
        self._plan, self._key, self._ref = None, None, None

    def __reduce__(self):
        return (CsrCache, ())

    def clear(self) -> None:
        self._plan, self._key, self._ref = None, None, None

    def plan(self, indices: torch.Tensor, out_features: int, in_features: int) -> CsrPlan:
        try:
            version = indices._version
        except RuntimeError:  # inference tensors carry no version counter
            version = -1
        key = (indices.data_ptr(), version, str(indices.device), indices.dtype, indices.numel(), out_features,
               in_features)
        if self._plan is None or self._key != key or self._ref is None or self._ref() is not indices:
            with torch.no_grad():
                self._plan = CsrPlan(indices.detach(), out_features, in_features)
            self._key, self._ref = key, weakref.ref(indices)
        return self._plan


# ------------------------------------------------------------------------------------------------ factored
_SLAB_BYTES = 1 << 19  # the slab of x^T a forward sparse product reads per chunk (fits the 2 MB L2 with its output)
# Backward's two sparse products each read one slab at random rows: S^T g^T the slab of g^T (out, c), the sampled
# product for dvalues the slab of x^T (in, c). Each slab is kept within half of that L2, with at least _BWD_STEP
# tokens, and one loop shares the slab of g^T at the smaller of the two chunks -- unless that would leave the sampled
# product under _DV_MIN tokens, too few to amortise its per-entry dot products: then each runs its own loop. Measured
# (one thread, 512 tokens, interleaved): at 4096->11008 S^T g^T is best at 32 tokens (48 is 1.8x slower) and the
# sampled product at 48-64 (32 is 1.2x slower), so the two loops there save ~4% of the layer's time; at 2048->5461
# a second loop costs 3-5% (its extra copy of g^T) and both products are as fast at 48 tokens as at 64.
_BWD_SLAB_BYTES = 1 << 20
_DV_MIN = 48
_BWD_STEP = 32


def _slab_cap(in_f: int, out_f: int) -> int:
    """Tokens per sparse chunk such that its two fp32 slabs, (in, c) and (out, c), stay within a quarter of one dense
    W: on small layers the sparse temporaries then never lift factored's peak above compose's."""
    return max(16, (in_f * out_f) // (4 * (in_f + out_f)) // 16 * 16)


def _chunk(in_f: int, out_f: int, tokens: int, rows: int, nbytes: int, least: int) -> int:
    """Tokens per sparse chunk (a multiple of 16): the fp32 slab of ``rows`` numbers per token that the product reads
    at random stays within ``nbytes``, and within _slab_cap and the micro-batch; at least ``least`` tokens."""
    return max(least, min(tokens, _slab_cap(in_f, out_f), (nbytes // max(1, rows * 4)) // 16 * 16))


def _slab(in_f: int, out_f: int, tokens: int) -> int:
    """Forward's sparse chunk: a slab of x^T (in, c) within _SLAB_BYTES."""
    return _chunk(in_f, out_f, tokens, in_f, _SLAB_BYTES, 16)


def _bwd_steps(in_f: int, out_f: int, tokens: int) -> tuple[int, int]:
    """Backward's sparse chunks (for S^T g^T, for the sampled product); equal when one loop serves both."""
    st = _chunk(in_f, out_f, tokens, out_f, _BWD_SLAB_BYTES, _BWD_STEP)  # S^T g^T reads rows of g^T
    dv = _chunk(in_f, out_f, tokens, in_f, _BWD_SLAB_BYTES, _BWD_STEP)  # the sampled product reads rows of x^T
    if st < _DV_MIN < dv:
        return st, dv
    return min(st, dv), min(st, dv)


def _keeps_xa(tokens: int, rank: int, out_f: int, in_f: int) -> bool:
    """Keep x A^T (tokens, r) for backward when it is at most half a dense W; then it and backward's (tokens, r)
    g s B together stay within the one transient W (or Gw) compose holds, so factored never peaks above compose."""
    return bool(rank) and 2 * tokens * rank <= out_f * in_f


def _lowrank_chunk(rank: int, out_f: int, in_f: int) -> int:
    """Token chunk for the rank-r products when x A^T is not kept: (chunk, r) temporaries of a quarter W each."""
    return max(256, (out_f * in_f) // (4 * rank))


def _accumulate(total: Optional[torch.Tensor], part: torch.Tensor) -> torch.Tensor:
    """Sum of per-chunk factor gradients; in fp32 once there is more than one low-precision chunk."""
    if total is None:
        return part
    return (total.float() if total.dtype in _LOW_PRECISION else total).add_(part)


class _FactoredFn(torch.autograd.Function):
    """y = (x A^T)(s B)^T + x S^T + bias without building W; see the module docstring."""

    @staticmethod
    def forward(ctx, x, A, B, values, bias, plan: Optional[CsrPlan], scale: float, out_features: int,
                in_features: int):
        device, dtype = x.device, x.dtype
        lr, sp = _lowrank_dtype(dtype, device), _sparse_dtype(dtype, device)
        acc = lr  # y: the sparse part's fp32 slabs are added into it (no fp32 copy of a bf16 output)
        x2 = x.reshape(-1, in_features)
        T, rank = x2.shape[0], 0 if A is None else A.shape[0]
        keep_xa = _keeps_xa(T, rank, out_features, in_features)
        xa = None
        with torch.autocast(device.type, enabled=False):
            if rank:  # the scale goes on the (T, r) x A^T, not on the (out, r) B: fewer numbers at small T
                a, b = A.to(lr), B.to(lr)
                xl = x2.to(lr)
                if keep_xa:
                    xa = torch.mm(xl, a.t()).mul_(scale)  # s x A^T, kept for dB
                    y = torch.mm(xa, b.t()).to(acc)
                else:
                    y = torch.empty(T, out_features, dtype=acc, device=device)
                    step = _lowrank_chunk(rank, out_features, in_features)
                    for t0 in range(0, T, step):
                        torch.mm(torch.mm(xl[t0:t0 + step], a.t()).mul_(scale), b.t(), out=y[t0:t0 + step])
                del xl
            else:
                y = torch.zeros(T, out_features, dtype=acc, device=device)
            if values is not None:
                S = plan.S(values.to(sp))
                step = _slab(in_features, out_features, T)
                for t0 in range(0, T, step):
                    xT = x2[t0:t0 + step].t().to(sp).contiguous()  # (in, c): the slab the sparse product reads
                    y[t0:t0 + step].add_(torch.mm(S, xT).t())
            if bias is not None:
                y.add_(bias.to(acc))
            y = y.to(dtype)
        ctx.save_for_backward(x, xa, A, B, values)
        ctx.plan, ctx.scale, ctx.shape = plan, scale, (out_features, in_features)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out):
        x, xa, A, B, values = ctx.saved_tensors
        need_x, need_A, need_B, need_v, need_bias = ctx.needs_input_grad[:5]
        out_f, in_f = ctx.shape
        device, dtype = x.device, x.dtype
        lr, sp = _lowrank_dtype(dtype, device), _sparse_dtype(dtype, device)
        acc = lr
        x2, g2 = x.reshape(-1, in_f), grad_out.reshape(-1, out_f).to(dtype)
        T = x2.shape[0]
        dx = dA = dB = dv = dbias = None
        with torch.autocast(device.type, enabled=False):
            if need_x:
                dx = torch.zeros(T, in_f, dtype=acc, device=device) if values is None or T == 0 else \
                    torch.empty(T, in_f, dtype=acc, device=device)
            # the sparse part first, while no factor gradient exists yet (a lower peak): dx = g S, dvalues
            if values is not None and (need_x or need_v):
                plan = ctx.plan
                St = plan.St(values.to(sp)) if need_x else None
                dvals = _csr(plan.crow, plan.col, torch.zeros(plan.nnz, dtype=sp, device=device), plan.size) \
                    if need_v else None
                st_step, dv_step = _bwd_steps(in_f, out_f, T)
                shared = need_x and need_v and st_step == dv_step  # one slab of g^T serves both products

                def g_slab(t0, c):  # (out, c)
                    return g2[t0:t0 + c].t().to(sp).contiguous()

                def add_dvalues(gT, t0, c):  # dvalues[k] += sum_t g[t, row_k] x[t, col_k], in place
                    torch.sparse.sampled_addmm(dvals, gT, x2[t0:t0 + c].to(sp), beta=1.0, out=dvals)

                if need_x:
                    for t0 in range(0, T, st_step):
                        gT = g_slab(t0, st_step)
                        dx[t0:t0 + st_step].copy_(torch.mm(St, gT).t())
                        if shared:
                            add_dvalues(gT, t0, st_step)
                if need_v and not shared:
                    for t0 in range(0, T, dv_step):
                        add_dvalues(g_slab(t0, dv_step), t0, dv_step)
                del St  # its permuted values copy: gone before the factor gradients pile up
                if need_v:
                    dv = plan.unpermute(dvals.values()).to(values.dtype)
            # the rank-r part: dx += (g s B) A in place, dA = (g s B)^T x, dB = s g^T (x A^T)
            if A is not None and (need_x or need_A or need_B):
                a, b = A.to(lr), B.to(lr)
                step = T if xa is not None else _lowrank_chunk(A.shape[0], out_f, in_f)
                for t0 in range(0, T, step):
                    gc, xc = g2[t0:t0 + step].to(lr), x2[t0:t0 + step].to(lr)
                    gb = torch.mm(gc, b).mul_(ctx.scale)  # (c, r) = g s B
                    if need_x:
                        dx[t0:t0 + step].addmm_(gb, a)
                    if need_A:
                        dA = _accumulate(dA, torch.mm(gb.t(), xc))
                    if need_B:
                        xac = xa[t0:t0 + step] if xa is not None else torch.mm(xc, a.t()).mul_(ctx.scale)
                        dB = _accumulate(dB, torch.mm(gc.t(), xac))  # g^T (s x A^T)
                    del gb, gc, xc
                dA = None if dA is None else dA.to(A.dtype)
                dB = None if dB is None else dB.to(B.dtype)
            if dx is not None:
                dx = dx.to(dtype).view(x.shape)
            if need_bias:
                dbias = g2.sum(0).to(ctx.bias_dtype)
        return dx, dA, dB, dv, dbias, None, None, None, None
