"""SLTrain's sparse-plus-low-rank linear layer.

The weight of a linear layer is reparameterized as

    W = (alpha / rank) * B @ A  +  S          B: (out, rank), A: (rank, in)

where S is zero except on a **fixed** support of ``nnz = int(delta * in * out)`` positions, drawn once (uniformly at
random by default) and stored as flat row-major ``indices`` (a buffer, no gradient) plus trainable ``values``.
By Proposition 1 of the paper, BA + S is full rank with high probability for delta = Omega(log n / n), while the
number of trained numbers is ``(in + out) * rank + nnz`` instead of ``in * out``.

How it runs (``_SparseLowRankFn``): forward builds the dense W (one rank-r matmul, one ``index_add_`` of the values
into a flat view), does **one dense** ``F.linear`` and drops W. Backward rebuilds W for ``dx = G W`` and forms the
transient dense weight gradient ``Gw = G^T x`` once, from which ``dB = s Gw A^T``, ``dA = s B^T Gw`` and
``dvalues = Gw[indices]`` (a gather). So only x, A, B, values and indices are kept between forward and backward --
never an (out, in) tensor: the layer's persistent memory (weights, gradients, optimizer moments) scales with the
parameter count, and the dense W exists only for the duration of one matmul. The cost is one extra rank-r product
per backward and a scatter/gather of nnz entries.

    layer = SparseLowRankLinear(512, 1376, rank=128, delta=0.03, alpha=32, support_seed=0)
    y = layer(x)                      # x: (..., 512) -> y: (..., 1376)
    W = layer.dense_weight()          # the materialized (1376, 512) weight
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORT_KINDS = ("random", "row_balanced", "block", "top")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------ support
def _nnz(out_features: int, in_features: int, delta: float) -> int:
    return int(delta * in_features * out_features)


def sample_support(out_features: int, in_features: int, delta: float, kind: str = "random",
                   generator: Optional[torch.Generator] = None, block_size: int = 16,
                   reference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sorted unique flat row-major positions (int64) of a sparse support with ``int(delta*in*out)`` entries.

    kind: ``random`` uniform over all subsets of that size (the paper); ``row_balanced`` uniform within each row,
    every row holding nnz // out or nnz // out + 1 entries; ``block`` whole random block_size x block_size tiles of
    the block grid (edge tiles clipped, the last tile cut so the count is exact); ``top`` the nnz largest |reference|
    entries (reference: (out, in), required). Random kinds draw only from ``generator`` (a fresh nondeterministically
    seeded one when None), never from the global RNG, and return a CPU tensor.
    """
    kind = getattr(kind, "value", kind)
    if kind not in SUPPORT_KINDS:
        raise ValueError(f"support kind must be one of {', '.join(SUPPORT_KINDS)}, got {kind!r}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    n = out_features * in_features
    nnz = _nnz(out_features, in_features, delta)
    if kind == "top":
        if reference is None or tuple(reference.shape) != (out_features, in_features):
            raise ValueError(f"support 'top' needs a reference tensor of shape ({out_features}, {in_features})")
        flat = reference.detach().abs().reshape(-1).float()
        return torch.topk(flat, nnz, sorted=False).indices.sort().values
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    if nnz == 0:
        return torch.empty(0, dtype=torch.long)
    if kind == "random":
        return _random_support(n, nnz, generator)
    if kind == "row_balanced":
        return _row_balanced_support(out_features, in_features, nnz, generator)
    return _block_support(out_features, in_features, nnz, block_size, generator)


def _random_support(n: int, nnz: int, gen: torch.Generator) -> torch.Tensor:
    if 4 * nnz > n:  # dense-ish: a full permutation is cheap enough
        return torch.randperm(n, generator=gen)[:nnz].sort().values
    # Sparse: draw i.i.d. positions until nnz distinct ones exist, then keep a random nnz of them. The stopping rule
    # only looks at the count, so the distinct set is uniform given its size and the subset is uniform too. This avoids
    # a randperm of in*out numbers (45M for a 7B MLP matrix).
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < nnz:
        extra = int((nnz - chosen.numel()) * 1.1) + 16
        chosen = torch.unique(torch.cat([chosen, torch.randint(n, (extra,), generator=gen)]))
    if chosen.numel() > nnz:
        chosen = chosen[torch.randperm(chosen.numel(), generator=gen)[:nnz]]
    return chosen.sort().values


def _row_balanced_support(out_f: int, in_f: int, nnz: int, gen: torch.Generator) -> torch.Tensor:
    per_row, extra = divmod(nnz, out_f)
    counts = torch.full((out_f,), per_row, dtype=torch.long)
    counts[torch.randperm(out_f, generator=gen)[:extra]] += 1
    width = per_row + (extra > 0)
    parts, chunk = [], max(1, (1 << 22) // in_f)  # bound the random-key matrix to ~16 MB
    for r0 in range(0, out_f, chunk):
        rows = torch.arange(r0, min(out_f, r0 + chunk))
        cols = torch.rand(rows.numel(), in_f, generator=gen).topk(width, dim=1).indices  # a random width-subset/row
        keep = torch.arange(width) < counts[rows, None]
        parts.append((rows[:, None] * in_f + cols)[keep])
    return torch.cat(parts).sort().values


def _block_support(out_f: int, in_f: int, nnz: int, block_size: int, gen: torch.Generator) -> torch.Tensor:
    bs = max(1, int(block_size))
    grid_r, grid_c = -(-out_f // bs), -(-in_f // bs)
    cells = torch.randperm(grid_r * grid_c, generator=gen)
    r0, c0 = (cells // grid_c) * bs, (cells % grid_c) * bs
    sizes = (torch.clamp(out_f - r0, max=bs) * torch.clamp(in_f - c0, max=bs))
    used = int(torch.searchsorted(sizes.cumsum(0), torch.tensor(nnz))) + 1  # tiles needed to reach nnz
    d = torch.arange(bs)
    rows = r0[:used, None, None] + d[None, :, None]
    cols = c0[:used, None, None] + d[None, None, :]
    inside = (rows < out_f) & (cols < in_f)
    flat = (rows * in_f + cols)[inside]  # tile by tile, so the cut below drops part of the last tile only
    return flat[:nnz].sort().values


def _index_dtype(index_dtype) -> torch.dtype:
    value = getattr(index_dtype, "value", index_dtype)
    table = {"int64": torch.int64, "int32": torch.int32, torch.int64: torch.int64, torch.int32: torch.int32}
    if value not in table:
        raise ValueError(f"index_dtype must be int64 or int32, got {index_dtype!r}")
    return table[value]


# ------------------------------------------------------------------------------------------------ autograd
def _work_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # CPUs without native bf16 GEMM fall back to very slow kernels for some layouts; the rank-r product and the
    # factor gradients are small, so on CPU they are done in fp32 (also more accurate) and only W is cast down.
    return torch.float32 if device.type == "cpu" and dtype in _LOW_PRECISION else dtype


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


class _SparseLowRankFn(torch.autograd.Function):
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


# ------------------------------------------------------------------------------------------------ module
class SparseLowRankLinear(nn.Module):
    """y = x W^T (+ bias), W = (alpha/rank) B A + S on a fixed sparse support. See the module docstring.

    rank=0: sparse only (no A, B). delta=0 (or nnz rounding to 0): low-rank only (no values, indices).
    The support is drawn from a dedicated generator seeded with ``support_seed`` (a fresh random seed, recorded in
    ``self.support_seed``, when None), so it is reproducible and independent of the global RNG. ``reset_parameters``
    redraws it from that seed (identical result) unless it was set explicitly with ``set_support`` (e.g. ``top``).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, delta: float, alpha: float,
                 bias: bool = False, support_seed: Optional[int] = None,
                 index_dtype: Union[torch.dtype, str] = torch.int64, support: str = "random",
                 block_size: int = 16, device=None, dtype=None):
        super().__init__()
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        if rank > min(in_features, out_features):
            raise ValueError(f"rank {rank} exceeds min(in_features, out_features)={min(in_features, out_features)}")
        if not 0.0 <= delta <= 1.0:
            raise ValueError(f"delta must be in [0, 1], got {delta}")
        support = getattr(support, "value", support)
        if support not in SUPPORT_KINDS:
            raise ValueError(f"support must be one of {', '.join(SUPPORT_KINDS)}, got {support!r}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.delta, self.alpha = int(rank), float(delta), float(alpha)
        self.scale = self.alpha / self.rank if self.rank else 0.0
        self.index_dtype = _index_dtype(index_dtype)
        if self.index_dtype == torch.int32 and in_features * out_features >= 2 ** 31:
            raise ValueError(f"int32 indices cannot address {in_features}x{out_features} entries; use int64")
        self.support, self.block_size = support, int(block_size)
        if support_seed is None:
            support_seed = torch.Generator().seed()  # nondeterministic, but recorded so reset redraws the same
        self.support_seed = int(support_seed)
        self._support_from_seed = True
        nnz = _nnz(out_features, in_features, delta)
        if self.rank == 0 and nnz == 0:
            raise ValueError(f"SparseLowRankLinear({in_features}, {out_features}) needs rank >= 1 or "
                             f"int(delta*in*out) >= 1 (rank=0, delta={delta})")
        factory = {"device": device, "dtype": dtype}
        if self.rank:
            self.A = nn.Parameter(torch.empty(self.rank, in_features, **factory))
            self.B = nn.Parameter(torch.empty(out_features, self.rank, **factory))
        else:
            self.register_parameter("A", None)
            self.register_parameter("B", None)
        if nnz:
            self.values = nn.Parameter(torch.empty(nnz, **factory))
            self.register_buffer("indices", torch.empty(nnz, dtype=self.index_dtype, device=device))
        else:
            self.register_parameter("values", None)
            self.register_buffer("indices", None)
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    @property
    def nnz(self) -> int:
        return 0 if self.values is None else self.values.numel()

    def _is_meta(self) -> bool:
        return any(p.is_meta for p in self.parameters())

    @torch.no_grad()
    def reset_support(self) -> None:
        """Redraw the support from ``support_seed`` (same seed -> same support)."""
        if self.indices is None or self._is_meta():
            return
        gen = torch.Generator().manual_seed(self.support_seed)
        kind = "random" if self.support == "top" else self.support  # top needs a reference: see set_support
        idx = sample_support(self.out_features, self.in_features, self.delta, kind, gen, self.block_size)
        self.indices.copy_(idx.to(self.index_dtype))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Support from the seed (unless set explicitly); A Kaiming-uniform, B zeros, values U(+-1/sqrt(in))."""
        if self._support_from_seed:
            self.reset_support()
        bound = 1.0 / math.sqrt(self.in_features)
        if self.A is not None:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # a=sqrt(5): U(+-1/sqrt(in)), the LoRA convention
            nn.init.zeros_(self.B)
        if self.values is not None:
            nn.init.uniform_(self.values, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def set_support(self, indices: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """Replace the support with ``indices`` (flat row-major, unique); values given or U(+-1/sqrt(in)).

        ``values`` becomes a new Parameter when its size changes: build the optimizer after this call.
        """
        idx = torch.as_tensor(indices).reshape(-1).to(torch.long)
        n = self.in_features * self.out_features
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"support indices must lie in [0, {n})")
        idx, order = idx.cpu().sort()
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError("support indices must be unique")
        ref = self.A if self.A is not None else self.values
        device, dtype = ref.device, ref.dtype
        if idx.numel() == 0 and self.rank == 0:
            raise ValueError("an empty support leaves a rank-0 layer with no parameters")
        if idx.numel() == 0:
            self.values, self.indices = None, None
        else:
            new = torch.empty(idx.numel(), device=device, dtype=dtype)
            if values is None:
                bound = 1.0 / math.sqrt(self.in_features)
                nn.init.uniform_(new, -bound, bound)
            else:
                vals = torch.as_tensor(values).reshape(-1)
                if vals.numel() != idx.numel():
                    raise ValueError(f"got {vals.numel()} values for {idx.numel()} indices")
                new.copy_(vals[order.to(vals.device)])
            grad = self.values.requires_grad if self.values is not None else True
            self._parameters["values"] = nn.Parameter(new, requires_grad=grad)
            self._buffers["indices"] = idx.to(device=device, dtype=self.index_dtype)
        if idx.numel() != _nnz(self.out_features, self.in_features, self.delta):
            self.delta = idx.numel() / n  # the density actually held (extra_repr)
        self._support_from_seed = False

    def dense_weight(self) -> torch.Tensor:
        """The materialized (out, in) weight (alpha/rank) B A + S, built with ordinary (differentiable) torch ops."""
        ref = self.A if self.A is not None else self.values
        W = (self.scale * (self.B @ self.A) if self.A is not None
             else torch.zeros(self.out_features, self.in_features, dtype=ref.dtype, device=ref.device))
        if self.values is not None:
            W = W.reshape(-1).index_add(0, self.indices, self.values).view(self.out_features, self.in_features)
        return W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if torch.is_autocast_enabled(x.device.type):
            # autocast does not reach into a custom Function: run it in the autocast dtype, as F.linear would
            dt = torch.get_autocast_dtype(x.device.type)
            x = x.to(dt)
        return _SparseLowRankFn.apply(x, self.A, self.B, self.values, self.indices, bias, self.scale,
                                      self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"delta={self.delta:g}, nnz={self.nnz}, alpha={self.alpha:g}, support={self.support}, "
                f"support_seed={self.support_seed}, index_dtype={str(self.index_dtype).replace('torch.', '')}, "
                f"bias={self.bias is not None}")
