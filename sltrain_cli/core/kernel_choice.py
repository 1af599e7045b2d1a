"""kernel="auto": which SparseLowRankLinear kernel (compose or factored, sparse_kernels.py) a layer shape runs, from a
cost model fitted to measured timings -- deterministic, so a run and its resumption pick the same kernel."""
from __future__ import annotations

import torch

from .sparse_kernels import _bwd_steps, _keeps_xa, _lowrank_chunk, _slab

KERNELS = ("auto", "compose", "factored", "dense")  # dense: inference only (W built once, kept)

# The cost model, in multiply-adds of a dense GEMM of the compute dtype (so only ratios matter), fitted to interleaved
# timings of both kernels against dense on this project's CPU (one thread, 60M and 1B shapes, 512-8192 tokens;
# benchmarks/bench_layer.py): per multiply-add of the dense products (compose: 3T io), of the rank-r products
# (compose: the 4 r io that build W twice and form dA, dB; factored: 3T r (in + out), plus T r in when x A^T is
# recomputed), per multiply-add of the CSR products (3T nnz), and per element of the memory passes (compose: io --
# building W, its cast, Gw; factored: T (in + out) -- the transposes of x and g slabs and the transposed adds).
# bf16 on CPU: the sparse products run in fp32 and compose builds W in fp32, hence the larger costs. ``call``: seconds
# per kernel call, against a dense rate ``rate`` (multiply-adds/s). CUDA: NOT yet measured -- conservative guesses
# (cuSPARSE in fp32 against tensor cores) that keep compose except where the sparse part is cheap.
_FIT32 = dict(dense=1.02, rank=0.94, c_pass=153.0, lowrank=0.82, sparse=8.1, f_pass=379.0, rate=50e9, call=8e-6)
_FIT16 = dict(dense=1.0, rank=4.68, c_pass=2063.0, lowrank=0.5, sparse=34.2, f_pass=1900.0, rate=125e9, call=8e-6)
_COST = {
    "cpu": {torch.float32: _FIT32, torch.float64: _FIT32, torch.bfloat16: _FIT16, torch.float16: _FIT16},
    "cuda": {torch.float32: dict(dense=1.0, rank=1.0, c_pass=800.0, lowrank=1.5, sparse=50.0, f_pass=800.0,
                                 rate=25e12, call=10e-6),
             torch.bfloat16: dict(dense=1.0, rank=1.0, c_pass=4800.0, lowrank=1.5, sparse=300.0, f_pass=4800.0,
                                  rate=300e12, call=10e-6)},
}
_COST["cuda"][torch.float16] = _COST["cuda"][torch.bfloat16]
_COST["cuda"][torch.float64] = _COST["cuda"][torch.float32]
# factored only where modelled >= 10% cheaper: near a tie the paper's path (and its numbers) stay. The model is
# symmetric in in/out; measured, a wide-in narrow-out layer (60M's 1376->512 at 8192 tokens) runs factored
# ~15% slower than modelled, and a 5% margin picked it there (1.15x dense against compose's 1.06x).
_MARGIN = 0.90


def kernel_cost(kernel: str, tokens: int, n_in: int, n_out: int, rank: int, nnz: int, dtype: torch.dtype,
                device, forward_only: bool = False) -> float:
    """Modelled seconds of one forward + backward of the layer with ``kernel`` (compose | factored); with
    ``forward_only`` (inference: prefill, decoding) of the forward alone."""
    device = torch.device(device)
    table = _COST.get(device.type, _COST["cuda"])
    c = table.get(dtype, table[torch.float32])
    T, io = max(1, int(tokens)), n_in * n_out
    if forward_only:  # compose: build W (B A, the sparse add), one dense product; factored: x A^T B^T + x S^T
        if kernel == "compose":
            return (c["dense"] * T * io + c["rank"] * rank * io + c["c_pass"] * io) / c["rate"] + 4 * c["call"]
        work = c["lowrank"] * T * rank * (n_in + n_out) + (c["sparse"] * T * nnz + c["f_pass"] * T * n_out
                                                             if nnz else 0.0)
        return work / c["rate"] + 4 * c["call"]
    if kernel == "compose":
        work = c["dense"] * 3 * T * io + (c["rank"] * 4 * rank * io if rank else 0.0) + c["c_pass"] * io
        return work / c["rate"] + 14 * c["call"]
    work, calls = 0.0, 12
    if rank:
        recompute = 0 if _keeps_xa(T, rank, n_out, n_in) else T * rank * n_in
        work += c["lowrank"] * (3 * T * rank * (n_in + n_out) + recompute)
        if recompute:
            calls += 7 * -(-T // _lowrank_chunk(rank, n_out, n_in))
    if nnz:
        work += c["sparse"] * 3 * T * nnz + c["f_pass"] * T * (n_in + n_out)
        st_step, dv_step = _bwd_steps(n_in, n_out, T)
        calls += 3 * -(-T // _slab(n_in, n_out, T)) + 2 * -(-T // st_step) + 2 * -(-T // dv_step)
    return work / c["rate"] + calls * c["call"]


def choose_kernel(tokens: int, n_in: int, n_out: int, rank: int, nnz: int, dtype: torch.dtype, device,
                  forward_only: bool = False) -> str:
    """factored where ``kernel_cost`` puts it at least 10% below compose, else compose. Deterministic: a function of
    the arguments only (no timing), so a run and its resumption pick the same."""
    factored = kernel_cost("factored", tokens, n_in, n_out, rank, nnz, dtype, device, forward_only)
    compose = kernel_cost("compose", tokens, n_in, n_out, rank, nnz, dtype, device, forward_only)
    return "factored" if factored < _MARGIN * compose else "compose"
