"""APOLLO: AdamW moments kept in a random rank-r projection of each target gradient, used only to scale the raw
gradient channel-wise (or tensor-wise); "SGD-like memory". APOLLO-Mini is rank 1, tensor-wise, scale 128.

Semantics of the reference, apollo-torch 1.0.3 (``APOLLOAdamW`` with ``proj="random"``, ``proj_type="std"``,
``scale_front=False``, the norm-growth limiter on), for a target matrix W (out, in) with gradient G:

    out >= in:  P ~ N(0, 1/r) (r, in)    R = G P^T  (out, r)    channel factors per row    (over R's dim 1)
    out <  in:  P ~ N(0, 1/r) (out, r)   R = P^T G  (r, in)     channel factors per column (over R's dim 0)

P is drawn from a generator seeded with the parameter's projection seed at every step index t with
t % update_proj_gap == 0 (t = 0 included), and the seed then advances (the 15th draw of a generator seeded with it:
``next_seed``). A parameter's first seed is its 1-based position among the optimizer's parameters, as the reference
numbers them. Adam runs on R (eps outside the bias correction, as GaLore's reference):

    m = b1 m + (1 - b1) R;   v = b2 v + (1 - b2) R*R;   t += 1;   N = m / (sqrt(v) + eps)
    s = ||N||_channel / (||R||_channel + 1e-8)        (tensor: ||N|| / (||R|| + 1e-8), one number)
    U = G * s;   if a previous norm c exists: l = max(||U|| / (c + 1e-8), 1.01) / 1.01;  U = U / l;  c = ||U||
    W = W - lr * sqrt(1 - b2^t) / (1 - b1^t) * sqrt(scale) * U;    W = W - lr * wd * W

The limiter (from Fira) keeps the update's norm from growing more than 1% per step. Other parameters get the
reference's AdamW (the same update with U = N, no scale). The state is tensors and ints only, so a checkpoint
restores it under ``torch.load(weights_only=True)`` and a resumed run continues bitwise, projections included.
Optimizer memory per target: 2 r max(out, in) moment numbers + r min(out, in) for P (as GaLore).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from .fira import limit_norm_growth
from .galore import GaLoreAdamW

SEED_ADVANCE = 15  # the reference's next_seed: the last of 15 draws of a generator seeded with the current seed


def next_seed(seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (SEED_ADVANCE,), generator=gen).tolist()[-1]


def random_projection(grad: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """N(0, 1/rank) of shape (rank, in) when out >= in, else (out, rank), drawn in fp32 on the gradient's device."""
    shape = (rank, grad.shape[1]) if grad.shape[0] >= grad.shape[1] else (grad.shape[0], rank)
    gen = torch.Generator(device=grad.device).manual_seed(seed)
    proj = torch.randn(shape, generator=gen, device=grad.device, dtype=torch.float32) / math.sqrt(rank)
    return proj if grad.dtype == torch.float32 else proj.to(grad.dtype)


class APOLLOAdamW(GaLoreAdamW):
    """Groups flagged ``apollo=True`` (with ``rank``, ``scale_type`` channel | tensor, ``scale``,
    ``update_proj_gap``) hold the target matrices; see the module doc. GaLoreAdamW's loop and Adam arithmetic with
    APOLLO's projection (``_project``) and update (``_update``)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, rank: int = 128, scale_type: str = "channel", scale: float = 1.0,
                 update_proj_gap: int = 200):
        if lr < 0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid lr {lr} or betas {betas}")
        if rank < 1 or update_proj_gap < 1 or scale_type not in ("channel", "tensor"):
            raise ValueError(f"APOLLO needs rank >= 1, update_proj_gap >= 1 and scale_type channel|tensor, got "
                             f"{rank}, {update_proj_gap}, {scale_type!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, apollo=False, rank=rank,
                        scale_type=scale_type, scale=scale, update_proj_gap=update_proj_gap)
        torch.optim.Optimizer.__init__(self, params, defaults)
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.requires_grad:
                    self.state[p]["proj_seed"] = index

    def _project(self, p: torch.Tensor, state: dict, group: dict):
        """R = the gradient in the random projection (redrawn on schedule), or None for a plain parameter."""
        if not (group["apollo"] and p.dim() == 2):
            return None
        grad = p.grad
        if "proj" not in state or state["step"] % group["update_proj_gap"] == 0:
            state["proj"] = random_projection(grad, group["rank"], state["proj_seed"])
            state["proj_seed"] = next_seed(state["proj_seed"])
        proj = state["proj"]
        return grad @ proj.t() if self.right_side(grad.shape) else proj.t() @ grad

    def _update(self, p: torch.Tensor, state: dict, group: dict, R) -> None:
        update, step_size = self._adam(state, p.grad if R is None else R, group)
        if R is not None:
            update = self._scaled_gradient(p.grad, R, update, self.right_side(p.shape), group, state)
        p.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    @staticmethod
    def _scaled_gradient(grad, low, normalized, right: bool, group, state) -> torch.Tensor:
        """The raw gradient times APOLLO's scaling factor, through the norm-growth limiter, times sqrt(scale)."""
        if group["scale_type"] == "channel":
            dim = 1 if right else 0
            factor = torch.norm(normalized, dim=dim) / (torch.norm(low, dim=dim) + 1e-8)
            if right:
                factor = factor.unsqueeze(1)
        else:
            factor = torch.norm(normalized) / (torch.norm(low) + 1e-8)
        return limit_norm_growth(grad * factor, state) * math.sqrt(group["scale"])
