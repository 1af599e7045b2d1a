"""SLTrain's sparse-plus-low-rank linear layer.

The weight of a linear layer is reparameterized as

    W = (alpha / rank) * B @ A  +  S          B: (out, rank), A: (rank, in)

where S is zero except on a **fixed** support of ``nnz = int(delta * in * out)`` positions, drawn once (uniformly at
random by default) and stored as flat row-major ``indices`` (a buffer, no gradient) plus trainable ``values``.
By Proposition 1 of the paper, BA + S is full rank with high probability for delta = Omega(log n / n), while the
number of trained numbers is ``(in + out) * rank + nnz`` instead of ``in * out``.

How it runs: two kernels compute the same function (``sparse_kernels.py`` has both; ``kernel_choice.py`` the cost
model behind kernel="auto").
``compose`` (the paper's) builds the dense W for one dense matmul and drops it; ``factored`` never builds W
(``y = (x A^T)(s B)^T + x S^T`` with S as a CSR sparse-dense product, the support's CSR structure cached on the
layer). Neither keeps an (out, in) tensor between forward and backward: the layer's persistent memory (weights,
gradients, optimizer moments) scales with the parameter count. ``kernel="auto"`` (the default) picks the cheaper
one for the token count of a micro-batch, the shapes, dtype and device from an analytic cost model: once per run
through ``choose_kernels(model, tokens, dtype, device)`` (train does this), or at a layer's first call from that
input's token count when used on its own; the choice is kept (so numbers are reproducible, resume exact).

    layer = SparseLowRankLinear(512, 1376, rank=128, delta=0.03, alpha=32, support_seed=0)
    y = layer(x)                      # x: (..., 512) -> y: (..., 1376)
    W = layer.dense_weight()          # the materialized (1376, 512) weight
    SparseLowRankLinear(512, 1376, 128, 0.03, 32, kernel="factored")   # or "compose"; default "auto"
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods.fields import SupportKind
from .kernel_choice import KERNELS, choose_kernel
from .sparse_kernels import CsrCache, _ComposeFn, _FactoredFn

SUPPORT_KINDS = tuple(kind.value for kind in SupportKind)  # the config's choices, in the study's order


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


# ------------------------------------------------------------------------------------------------ module
class SparseLowRankLinear(nn.Module):
    """y = x W^T (+ bias), W = (alpha/rank) B A + S on a fixed sparse support. See the module docstring.

    rank=0: sparse only (no A, B). delta=0 (or nnz rounding to 0): low-rank only (no values, indices).
    The support is drawn from a dedicated generator seeded with ``support_seed`` (a fresh random seed, recorded in
    ``self.support_seed``, when None), so it is reproducible and independent of the global RNG. ``reset_parameters``
    redraws it from that seed (identical result) unless it was set explicitly with ``set_support`` (e.g. ``top``).
    """

    @classmethod
    def prepare_compile(cls) -> None:
        """Run this layer eagerly inside torch.compile'd code (LlamaForCausalLM.compile_blocks, train.compile): its
        kernels are fused by hand already, and dynamo traces neither the CSR plan's construction nor torch's sparse
        CSR products. Applied on first use, not at import, so that importing the layer never imports dynamo."""
        if not getattr(cls.forward, "_eager_under_compile", False):
            cls.forward = torch.compiler.disable(cls.forward)
            cls.forward._eager_under_compile = True

    def __init__(self, in_features: int, out_features: int, rank: int, delta: float, alpha: float,
                 bias: bool = False, support_seed: Optional[int] = None,
                 index_dtype: Union[torch.dtype, str] = torch.int64, support: str = "random",
                 block_size: int = 16, device=None, dtype=None, kernel: str = "auto"):
        super().__init__()
        kernel = getattr(kernel, "value", kernel)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.kernel = kernel
        self.chosen_kernel: Optional[str] = None if kernel == "auto" else kernel  # auto: decided once, then kept
        self._csr = CsrCache()  # the support's CSR structure for the factored kernel (not state, never saved)
        self._dense_w: Optional[torch.Tensor] = None  # kernel="dense" (inference): W, built at the first call
        self._infer_S: Optional[tuple] = None  # factored without autograd: (key, S as one CSR matrix), kept
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
        self._csr.clear()
        gen = torch.Generator().manual_seed(self.support_seed)
        kind = "random" if self.support == "top" else self.support  # top needs a reference: see set_support
        idx = sample_support(self.out_features, self.in_features, self.delta, kind, gen, self.block_size)
        self.indices.copy_(idx.to(self.index_dtype))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Support from the seed (unless set explicitly); A Kaiming-uniform, B zeros, values U(+-1/sqrt(in))."""
        if self._is_meta():  # no values to draw (and meta init ops are slow enough to matter for a 7B model)
            return
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
        self._csr.clear()
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

    def choose_kernel(self, tokens: int, dtype: torch.dtype, device, inference: bool = False) -> str:
        """Fix the kernel ``auto`` runs from a micro-batch's token count, the compute dtype and the device (an
        explicit kernel is kept); returns the kernel this layer runs from now on. ``inference``: choose again, for
        forward passes alone (a prefill, then one token per step: each phase picks its own)."""
        if self.kernel == "auto" and (self.chosen_kernel is None or inference):
            self.chosen_kernel = choose_kernel(int(tokens), self.in_features, self.out_features, self.rank, self.nnz,
                                               dtype, torch.device(device), forward_only=inference)
        return self.chosen_kernel

    def _dense_forward(self, x: torch.Tensor, bias) -> torch.Tensor:
        """kernel="dense": one product with W built at the first call and kept (inference: the weights are fixed)."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise RuntimeError("kernel=dense keeps W fixed; it is for inference (train with auto, compose or "
                               "factored)")
        if self._dense_w is None or self._dense_w.dtype != x.dtype or self._dense_w.device != x.device:
            with torch.no_grad():
                self._dense_w = self.dense_weight().to(x.dtype)
        return F.linear(x, self._dense_w, bias)

    def _factored_inference(self, x: torch.Tensor, bias) -> torch.Tensor:
        """The factored kernel without autograd (generate, bench-infer: the weights are fixed): the same products,
        with S as one CSR matrix built once and kept while its values do not change -- at one token per step the
        per-call setup of the training kernel costs more than the products."""
        x2 = x.reshape(-1, self.in_features)
        y = torch.mm(torch.mm(x2, self.A.t()).mul_(self.scale), self.B.t()) if self.A is not None else \
            torch.zeros(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        if self.values is not None:
            try:
                version = self.values._version
            except RuntimeError:  # inference tensors carry no version counter
                version = -1
            key = (self.values.data_ptr(), version, self.values.dtype, self.indices.data_ptr())
            if self._infer_S is None or self._infer_S[0] != key:
                plan = self._csr.plan(self.indices, self.out_features, self.in_features)
                self._infer_S = (key, plan.S(self.values.detach()))
            y.add_(torch.mm(self._infer_S[1], x2.t()).t())
        if bias is not None:
            y.add_(bias)
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if torch.is_autocast_enabled(x.device.type):
            # autocast does not reach into a custom Function: run it in the autocast dtype, as F.linear would
            dt = torch.get_autocast_dtype(x.device.type)
            x = x.to(dt)
        kernel = self.chosen_kernel or self.choose_kernel(x.numel() // max(1, self.in_features), x.dtype, x.device)
        if kernel == "dense":
            return self._dense_forward(x, bias)
        if kernel == "factored" and not torch.is_grad_enabled() and x.dtype in (torch.float32, torch.float64):
            return self._factored_inference(x, bias)  # the training kernel's products in its dtype, less setup
        if kernel == "factored":
            plan = None if self.values is None else self._csr.plan(self.indices, self.out_features, self.in_features)
            return _FactoredFn.apply(x, self.A, self.B, self.values, bias, plan, self.scale, self.out_features,
                                     self.in_features)
        return _ComposeFn.apply(x, self.A, self.B, self.values, self.indices, bias, self.scale,
                                self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"delta={self.delta:g}, nnz={self.nnz}, alpha={self.alpha:g}, support={self.support}, "
                f"support_seed={self.support_seed}, index_dtype={str(self.index_dtype).replace('torch.', '')}, "
                f"bias={self.bias is not None}, kernel={self.kernel}"
                + (f" ({self.chosen_kernel})" if self.kernel == "auto" and self.chosen_kernel else ""))


def choose_kernels(model: nn.Module, tokens_per_microbatch: int, dtype, device, inference: bool = False) -> dict:
    """Fix every SparseLowRankLinear's kernel for a run (``auto`` layers choose from the cost model; explicit ones
    keep theirs) and return ``{"in->out": kernel}`` per layer shape, e.g. ``{"64->176": "factored"}`` -- what train
    writes to summary.json as "kernels". Deterministic: the same config picks the same kernels, on resume too.
    dtype: the compute dtype, or a train.precision name (fp32 | bf16-mixed | bf16-pure)."""
    if isinstance(dtype, str):
        dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    found = {}
    for module in model.modules():
        if isinstance(module, SparseLowRankLinear):
            kernel = module.choose_kernel(tokens_per_microbatch, dtype, device, inference)
            found.setdefault(f"{module.in_features}->{module.out_features}", set()).add(kernel)
    return {shape: "/".join(sorted(kinds)) for shape, kinds in sorted(found.items())}


def set_kernels(model: nn.Module, kernel: str) -> None:
    """Every SparseLowRankLinear of ``model`` runs ``kernel`` from now on (auto: chosen again at the next call or
    ``choose_kernels``); inference commands' --kernel, ``dense`` included."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    for module in model.modules():
        if isinstance(module, SparseLowRankLinear):
            module.kernel, module.chosen_kernel, module._dense_w = kernel, None if kernel == "auto" else kernel, None
