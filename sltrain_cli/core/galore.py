"""GaLore: AdamW whose moments live in a rank-r projection of each weight gradient.

For a target matrix W (out, in) with gradient G, GaLore keeps a projector P built from the top-r singular
vectors of G, projected on the smaller side so the moments are as small as possible:

    out <= in:  P = U[:, :r]  (out, r)    R = P^T G  (r, in)    back(N) = P N
    out >  in:  P = V[:, :r]  (in, r)     R = G P    (out, r)   back(N) = N P^T

Adam runs on R (moments of shape R), and the weight moves by the back-projected, scaled Adam direction:

    m = b1 m + (1 - b1) R;   v = b2 v + (1 - b2) R*R;   t += 1
    N = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    W = W * (1 - lr * wd) - lr * scale * back(N)               (decoupled weight decay, as torch AdamW)

P is recomputed from the current gradient (SVD in fp32 for half-precision gradients) every ``update_proj_gap``
steps, at step 0 too; the
moments are carried across a refresh as in the GaLore reference. Optimizer memory per target matrix is
2 r max(out, in) moment numbers + r min(out, in) projector numbers instead of 2 out in.

Parameter groups flagged ``galore=True`` (with ``rank``, ``update_proj_gap``, ``scale``) hold the target
2-D matrices; every other group (and any non-2-D tensor in a galore group) gets plain AdamW with the same
formula. The state is tensors and ints only, so ``torch.load(weights_only=True)`` restores it and a resumed
run continues bitwise.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch


class GaLoreAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25):
        if lr < 0:
            raise ValueError(f"invalid lr {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if rank < 1 or update_proj_gap < 1:
            raise ValueError(f"GaLore needs rank >= 1 and update_proj_gap >= 1, got {rank}, {update_proj_gap}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, galore=False, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale)
        super().__init__(params, defaults)

    @staticmethod
    def _projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
        """Top-`rank` singular vectors of `grad` on its smaller side: (out, r) if out <= in else (in, r)."""
        out_f, in_f = grad.shape
        r = min(rank, out_f, in_f)
        work = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()  # no bf16 SVD
        U, _, Vh = torch.linalg.svd(work, full_matrices=False)
        P = U[:, :r] if out_f <= in_f else Vh[:r].T
        return P.to(grad.dtype).contiguous()

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                state = self.state[p]
                projected = group["galore"] and p.dim() == 2
                if not state:
                    state["step"] = 0
                if projected and state["step"] % group["update_proj_gap"] == 0:
                    state["proj"] = self._projector(grad, group["rank"])
                if projected:
                    P = state["proj"]
                    left = p.shape[0] <= p.shape[1]
                    grad = P.T @ grad if left else grad @ P
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]

                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                bias_c1 = 1.0 - beta1 ** t
                bias_c2_sqrt = math.sqrt(1.0 - beta2 ** t)
                denom = (exp_avg_sq.sqrt() / bias_c2_sqrt).add_(eps)
                direction = (exp_avg / bias_c1).div_(denom)

                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                if projected:
                    direction = P @ direction if left else direction @ P.T
                    p.add_(direction, alpha=-lr * group["scale"])
                else:
                    p.add_(direction, alpha=-lr)
        return loss
