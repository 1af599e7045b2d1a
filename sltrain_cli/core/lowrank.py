"""The paper's Low-Rank baseline: a linear layer whose weight is W = s * B @ A, B (out, rank), A (rank, in).

It computes ``y = s * (x A^T) B^T`` -- two skinny matmuls, never the dense W -- so it saves x and the (tokens, rank)
intermediate for backward and costs 2 * tokens * rank * (in + out) FLOPs instead of 2 * tokens * in * out.
``s = 1`` unless ``alpha`` is given (then ``alpha / rank``, as in SparseLowRankLinear).

Init: A Kaiming-uniform U(+-1/sqrt(in)) and B U(+-1/sqrt(rank)), both random. Unlike SLTrain or LoRA there is no
other path for the signal: with B = 0 every block would output zero, no gradient would reach any A or B
(dA = B^T Gw = 0, and Gw of the layers feeding a zero layer is zero), and the model would never train. With both
factors random, entries of W have std 1/(3 sqrt(in)), about 0.6x nn.Linear's own default init.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class LowRankLinear(nn.Module):
    """y = x (s B A)^T (+ bias). See the module docstring."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: Optional[float] = None,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if rank > min(in_features, out_features):
            raise ValueError(f"rank {rank} exceeds min(in_features, out_features)={min(in_features, out_features)}")
        self.in_features, self.out_features, self.rank = in_features, out_features, int(rank)
        self.alpha = None if alpha is None else float(alpha)
        self.scale = 1.0 if alpha is None else self.alpha / self.rank
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(self.rank, in_features, **factory))
        self.B = nn.Parameter(torch.empty(out_features, self.rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A U(+-1/sqrt(in)), B U(+-1/sqrt(rank)) (both random: see the module docstring), bias U(+-1/sqrt(in))."""
        if self.A.is_meta:  # no values to draw (and meta init ops are slow enough to matter for a 7B model)
            return
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def dense_weight(self) -> torch.Tensor:
        """The materialized (out, in) weight s B A."""
        W = self.B @ self.A
        return W * self.scale if self.scale != 1.0 else W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.A)
        if self.scale != 1.0:
            h = h * self.scale  # on the (tokens, rank) intermediate: the cheapest place
        return F.linear(h, self.B, self.bias)

    def extra_repr(self) -> str:
        alpha = "None" if self.alpha is None else f"{self.alpha:g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={alpha}, bias={self.bias is not None}")
