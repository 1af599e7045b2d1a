"""Fira: GaLore's projected Adam plus the full-rank rest of the gradient, scaled by the projected Adam's norm ratio
and held back by a norm-growth limiter (Chen et al., 2024, arXiv:2410.01623).

Semantics of the reference, fira 1.0.2 (``FiraAdamW``, ``proj_type="std"``), for a target W (out, in) with gradient
G, its SVD projector P refreshed as GaLore's (core/galore.py: the same side rule, the same schedule) and
``alpha`` the reference's scale (``method.scale``):

    R = project(G);   Adam on R:  m, v, t as GaLore;   N = m / (sqrt(v) + eps)
    s = ||N||_channel / (||R||_channel + 1e-8)        (per row of R when out >= in, else per column)
    E = (G - alpha * back(R)) * s                       the rest of the gradient, scaled like the projected part
    if a previous norm c exists: l = max(||E|| / (c + 1e-8), 1.01) / 1.01;  E = E / l;  c = ||E||
    W = W - lr * sqrt(1 - b2^t) / (1 - b1^t) * (alpha * back(N) + E);    W = W - lr * wd * W

Where the reference is off, and what this does: the residual it subtracts is ``alpha * back(R)``, the projected
gradient *scaled by alpha*, so with alpha != 1 the "rest" still holds (1 - alpha) of the projected part, while the
paper defines it as G - back(R). Fira's own scripts train with alpha 0.25 (60M, 350M) and 0.0625 (1B), so their
published numbers come from the reference's form: this optimizer follows it (the tests compare it bitwise at alpha
0.25 and 1; at 1 both readings agree). Other parameters: GaLore's plain AdamW.
The state is tensors and ints (GaLore's plus the limiter's ``update_norm``): resume is bitwise.
"""
from __future__ import annotations

import math

import torch

from .galore import GaLoreAdamW


class FiraAdamW(GaLoreAdamW):
    """Groups flagged ``galore=True`` (``rank``, ``update_proj_gap``, ``scale`` = Fira's alpha) hold the targets."""

    def _update(self, p: torch.Tensor, state: dict, group: dict, R) -> None:
        if R is None:
            return super()._update(p, state, group, R)
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(R, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(R, memory_format=torch.preserve_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        t = state["step"]
        exp_avg.mul_(beta1).add_(R, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(eps)
        step_size = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
        normalized = exp_avg / denom
        del denom
        scale = group["scale"]
        dim = 0 if normalized.shape[0] < normalized.shape[1] else 1
        factor = torch.norm(normalized, dim=dim) / (torch.norm(R, dim=dim) + 1e-8)
        if dim == 1:
            factor = factor.unsqueeze(1)
        rest = (p.grad - self._back(p, state, R) * scale) * factor
        norm = torch.norm(rest)
        if "update_norm" in state:
            limiter = max(norm / (state["update_norm"] + 1e-8), 1.01) / 1.01
            rest = rest / limiter
            state["update_norm"] = norm / limiter
        else:
            state["update_norm"] = norm
        p.add_(self._back(p, state, normalized) * scale + rest, alpha=-step_size)
        if wd > 0.0:
            p.add_(p, alpha=-lr * wd)
