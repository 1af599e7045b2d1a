"""GaLore: AdamW whose moments live in a rank-r projection of each weight gradient (32-bit and 8-bit moments).

Semantics of the reference, galore-torch 1.0 (``GaLoreAdamW`` / ``GaLoreAdamW8bit``, ``proj_type="std"``,
galore_projector.py): for a target matrix W (out, in) with gradient G the projector P comes from the top-r
singular vectors of G, on the right when out >= in (square matrices included) and on the left otherwise:

    out >= in:  P = Vh[:r]    (r, in)     R = G P^T   (out, r)    back(N) = N P
    out <  in:  P = U[:, :r]  (out, r)    R = P^T G   (r, in)     back(N) = P N

P is recomputed from the current gradient (an fp32 SVD for half-precision gradients) at every step index
t with t % update_proj_gap == 0 (t = 0, the first update, included); the moments are carried across a
refresh unchanged, as in the reference. Adam runs on R:

    m = b1 m + (1 - b1) R;   v = b2 v + (1 - b2) R*R;   t += 1
    W = W - lr * sqrt(1 - b2^t) / (1 - b1^t) * scale * back(m / (sqrt(v) + eps))
    W = W - lr * wd * W                                   (decay after the update, as the reference)

``GaLoreAdamW`` applies that formula (scale 1, no projection) to its other parameters too, as the reference
optimizer does for its plain group: eps outside the bias correction and weight decay after the update,
unlike torch AdamW. ``GaLoreAdamW8bit`` holds the moments (of R, or of the gradient for the other
parameters) in bitsandbytes' blockwise 8-bit layout and steps them with bitsandbytes' own fused Adam update
(``optimizer_update_8bit_blockwise``; CPU and CUDA): exactly what the reference does. The projected update
is computed into a zero scratch of R's shape (bnb's step with weight decay 0), back-projected, scaled and
added to W, then W is decayed; the other parameters get bitsandbytes AdamW8bit's update as it is (decay first).
Tensors with fewer than ``min_8bit_size`` entries keep fp32 moments, like bitsandbytes.

Optimizer memory per target matrix: 2 r max(out, in) moment numbers + r min(out, in) projector numbers
instead of 2 out in. Parameter groups flagged ``galore=True`` (with ``rank``, ``update_proj_gap``,
``scale``) hold the target 2-D matrices; any non-2-D tensor in such a group is not projected. The state is
tensors and ints only, so ``torch.load(weights_only=True)`` restores it and a resumed run continues bitwise.
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
    def right_side(shape) -> bool:
        """The reference's side rule: project on the right (P = Vh[:r]) when out >= in, else on the left."""
        return shape[0] >= shape[1]

    @staticmethod
    def _projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
        """Top-`rank` singular vectors of `grad`: Vh[:r] (r, in) if out >= in, else U[:, :r] (out, r)."""
        work = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()  # no bf16 SVD
        U, _, Vh = torch.linalg.svd(work, full_matrices=False)
        P = Vh[:rank] if GaLoreAdamW.right_side(grad.shape) else U[:, :rank]
        return P.to(grad.dtype).contiguous()

    def _project(self, p: torch.Tensor, state: dict, group: dict) -> Optional[torch.Tensor]:
        """R = the projected gradient (refreshing P on schedule), or None for a parameter that is not projected."""
        if not (group["galore"] and p.dim() == 2):
            return None
        if "proj" not in state or state["step"] % group["update_proj_gap"] == 0:
            state["proj"] = self._projector(p.grad, group["rank"])
        P = state["proj"]
        return p.grad @ P.T if self.right_side(p.shape) else P.T @ p.grad

    def _back(self, p: torch.Tensor, state: dict, N: torch.Tensor) -> torch.Tensor:
        P = state["proj"]
        return N @ P if self.right_side(p.shape) else P @ N

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                state.setdefault("step", 0)
                self._update(p, state, group, self._project(p, state, group))
        return loss

    @staticmethod
    def _adam(state: dict, grad: torch.Tensor, group: dict) -> tuple:
        """Adam's moments of ``grad`` (R, or the plain gradient) advanced one step: (m / (sqrt(v) + eps), the
        bias-corrected step size) -- the reference's arithmetic, op for op (galore_torch/adamw.py)."""
        (beta1, beta2), eps = group["betas"], group["eps"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        t = state["step"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(eps)
        return exp_avg / denom, group["lr"] * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)

    def _update(self, p: torch.Tensor, state: dict, group: dict, R: Optional[torch.Tensor]) -> None:
        """One Adam step of ``p`` from its projected gradient ``R`` (None: the plain gradient)."""
        lr, wd = group["lr"], group["weight_decay"]
        direction, step_size = self._adam(state, p.grad if R is None else R, group)
        if R is not None:
            direction = self._back(p, state, direction).mul_(group["scale"])
        p.add_(direction, alpha=-step_size)
        if wd > 0.0:
            p.add_(p, alpha=-lr * wd)


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLore with 8-bit blockwise moments (galore-torch ``GaLoreAdamW8bit`` semantics, bitsandbytes layout).

    State per parameter, the keys of bitsandbytes AdamW8bit (so ReLoRA-style resets and byte counts treat both
    alike): ``step`` (int), ``state1``/``state2`` (uint8 codes of m and v, shaped like R or the gradient) with
    ``absmax1``/``absmax2`` (one fp32 scale per ``blocksize`` entries) and ``qmap1``/``qmap2`` (bitsandbytes'
    signed / unsigned dynamic maps, one pair shared by every parameter of this optimizer); fp32 ``state1``/
    ``state2`` for tensors with fewer than ``min_8bit_size`` entries; ``proj`` for a projected matrix.
    ``blocksize`` must be bitsandbytes' kernel block (core.optim passes ``BNB_BLOCKSIZE``).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25, *,
                 blocksize: int, min_8bit_size: int):
        import bitsandbytes.functional as bnb_f  # the caller (core.optim) reports a missing bitsandbytes

        self._bnb_f, self.blocksize, self.min_8bit_size = bnb_f, int(blocksize), int(min_8bit_size)
        self._qmaps: dict = {}
        super().__init__(params, lr, betas, eps, weight_decay, rank, update_proj_gap, scale)

    def _qmap_pair(self, device: torch.device):
        key = str(device)
        if key not in self._qmaps:
            self._qmaps[key] = (self._bnb_f.create_dynamic_map(signed=True).to(device),
                                self._bnb_f.create_dynamic_map(signed=False).to(device))
        return self._qmaps[key]

    def _init_moments(self, state: dict, like: torch.Tensor) -> None:
        if like.numel() < self.min_8bit_size:
            state["state1"] = torch.zeros_like(like, dtype=torch.float32)
            state["state2"] = torch.zeros_like(like, dtype=torch.float32)
            return
        blocks = -(-like.numel() // self.blocksize)
        state["state1"] = torch.zeros_like(like, dtype=torch.uint8)
        state["state2"] = torch.zeros_like(like, dtype=torch.uint8)
        state["qmap1"], state["qmap2"] = self._qmap_pair(like.device)
        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)
        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)

    def _bnb_adam(self, group: dict, state: dict, g: torch.Tensor, p: torch.Tensor, weight_decay: float) -> None:
        """bitsandbytes' Adam step of ``p`` with gradient ``g`` (what AdamW8bit.update_step does)."""
        (beta1, beta2), t = group["betas"], state["step"]
        if state["state1"].dtype == torch.float32:
            self._bnb_f.optimizer_update_32bit("adam", g, p, state["state1"], beta1, group["eps"], t, group["lr"],
                                               state["state2"], beta2, 0.0, 0.0, weight_decay, 1.0, None,
                                               max_unorm=0.0, skip_zeros=False)
        else:
            self._bnb_f.optimizer_update_8bit_blockwise(
                "adam", g, p, state["state1"], state["state2"], beta1, beta2, 0.0, 0.0, group["eps"], t,
                group["lr"], state["qmap1"], state["qmap2"], state["absmax1"], state["absmax2"], weight_decay,
                gnorm_scale=1.0, skip_zeros=False)

    def _update(self, p: torch.Tensor, state: dict, group: dict, R: Optional[torch.Tensor]) -> None:
        if "state1" not in state:
            self._init_moments(state, p.grad if R is None else R)
        state["step"] += 1
        if R is None:  # bitsandbytes AdamW8bit's update, weight decay included
            if not p.is_contiguous():
                p.data = p.data.contiguous()
            self._bnb_adam(group, state, p.grad.contiguous(), p, group["weight_decay"])
            return
        update = torch.zeros_like(R)  # becomes -lr * Adam direction of R (bnb's step, no decay)
        self._bnb_adam(group, state, R.contiguous(), update, 0.0)
        p.add_(self._back(p, state, update).mul_(group["scale"]))
        del update
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader would cast every float state tensor to the parameter's dtype (fp32 moments and
        absmax of a bf16 parameter included); keep the saved dtypes, move to the parameter's device and
        share one qmap pair per device again."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})  # checks and restores the param groups
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid not in saved:
                continue
            st = {k: v.to(p.device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in saved[pid].items()}
            if "qmap1" in st:
                st["qmap1"], st["qmap2"] = self._qmap_pair(p.device)
            self.state[p] = st
