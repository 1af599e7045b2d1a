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

import torch

from .galore import GaLoreAdamW


def limit_norm_growth(update: torch.Tensor, state: dict) -> torch.Tensor:
    """Fira's norm-growth limiter (APOLLO uses it too): an update whose norm grew by more than 1% over the last one
    is scaled back to 1.01 times it; ``state["update_norm"]`` keeps the (limited) norm. The references' arithmetic."""
    norm = torch.norm(update)
    if "update_norm" in state:
        limiter = max(norm / (state["update_norm"] + 1e-8), 1.01) / 1.01
        update = update / limiter
        state["update_norm"] = norm / limiter
    else:
        state["update_norm"] = norm
    return update


class FiraAdamW(GaLoreAdamW):
    """Groups flagged ``galore=True`` (``rank``, ``update_proj_gap``, ``scale`` = Fira's alpha) hold the targets."""

    def _update(self, p: torch.Tensor, state: dict, group: dict, R) -> None:
        if R is None:
            return super()._update(p, state, group, R)
        normalized, step_size = self._adam(state, R, group)
        scale = group["scale"]
        dim = 0 if normalized.shape[0] < normalized.shape[1] else 1
        factor = torch.norm(normalized, dim=dim) / (torch.norm(R, dim=dim) + 1e-8)
        if dim == 1:
            factor = factor.unsqueeze(1)
        rest = limit_norm_growth((p.grad - self._back(p, state, R) * scale) * factor, state)
        p.add_(self._back(p, state, normalized) * scale + rest, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])
