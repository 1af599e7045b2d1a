"""ReLoRA baseline: a frozen dense W0 plus a trainable low-rank adapter, merged every k steps.

    y = x W0^T + (alpha / r) * (x A^T) B^T          W0: (out, in) frozen, A: (r, in), B: (out, r)

Every ``method.merge_every`` optimizer steps the adapter is folded into the dense weight
(W0 <- W0 + (alpha/r) B A), A is re-drawn Kaiming-uniform and B zeroed, so the layer computes the same
function right after a merge while the next adapter starts fresh. The adapters' Adam moments are then
reset (zeroed or pruned, ``method.reset``) and the learning rate restarts from 0 with a short linear
re-warmup (the "jagged" cosine schedule, ``core.optim.relora_lr_factor``). The sum of many rank-r updates can reach
full rank, but W0 is stored in full, so ReLoRA is not parameter efficient.

The order is the reference's (Guitaricet/relora torchrun_main.py: optimizer.step(); scheduler.step();
update_step += 1; then merge_and_reinit and optimizer_reset when update_step % relora == 1): with 0-based
update indices, update k * merge_every (k >= 1) runs with lr factor 0 -- its gradient enters the moments but
moves nothing -- and right after it the adapters are merged and their moments reset, so update
k * merge_every + 1, the first of the re-warmup, starts from reset moments. The train loop calls, after
every optimizer step (and scheduler step) of update index ``s``::

    merge_after_update(model, optimizer, method, s, total_steps, seed)   # merges when merge_due(s, ...)

The scheduler built by ``core.optim.build_scheduler`` yields factor 0 for update index k * merge_every.
A checkpoint written after update s holds the merged model and the reset state, so resume is exact.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from sltrain_cli.configs import MethodConfig, ResetKind
from sltrain_cli.core.optim import BNB_BLOCKSIZE  # optim must never import this module


class ReLoRALinear(nn.Module):
    """A linear layer y = x W0^T (+ bias) + (alpha/rank) x A^T B^T with W0 frozen.

    ``weight`` (out, in) is an ``nn.Parameter`` with ``requires_grad=False`` so it is checkpointed and moved
    with the module but never seen by the optimizer; a caller swapping an existing ``nn.Linear`` copies its
    weight with ``layer.weight.data.copy_(linear.weight)``. ``bias`` (if any) is trainable.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, bias: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"ReLoRALinear needs rank >= 1, got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, float(alpha)
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def reset_parameters(self) -> None:
        """nn.Linear's init for W0 (and bias); A Kaiming-uniform, B zero (so the adapter starts at 0)."""
        if self.weight.is_meta:  # no values to draw (and meta init ops are slow enough to matter for a 7B model)
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self, generator: Optional[torch.Generator] = None) -> None:
        # a=sqrt(5) gives U(+-1/sqrt(in)), the LoRA / nn.Linear convention
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(F.linear(x, self.A), self.B)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The effective (out, in) weight W0 + (alpha/r) B A (a new tensor)."""
        return self.weight + self.scaling * (self.B @ self.A).to(self.weight.dtype)

    @torch.no_grad()
    def merge_and_reinit(self, generator: Optional[torch.Generator] = None) -> None:
        """W0 += (alpha/r) B A; then A re-drawn Kaiming-uniform and B zeroed. The function is unchanged."""
        self.weight.add_((self.B @ self.A).to(self.weight.dtype), alpha=self.scaling)
        self.reset_adapter(generator)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, bias={self.bias is not None}")


def merge_all(model: nn.Module, generator: Optional[torch.Generator] = None) -> List[Tuple[nn.Parameter, nn.Parameter]]:
    """Merge and re-initialise every ReLoRALinear in ``model``; returns the (A, B) pairs that were reset."""
    pairs = []
    for module in model.modules():
        if isinstance(module, ReLoRALinear):
            module.merge_and_reinit(generator)
            pairs.append((module.A, module.B))
    return pairs


def merge_due(update_index: int, merge_every: int) -> bool:
    """True when the merge and the optimizer reset follow the 0-based update ``update_index``: the lr-0
    update k * merge_every, k >= 1 (the reference's update_step % relora == 1 after its increment)."""
    return update_index >= merge_every and update_index % merge_every == 0


def merge_after_update(model: nn.Module, optimizer, method_cfg: MethodConfig, update_index: int,
                       total_steps: int, seed: int, device=None) -> bool:
    """The train loop's ReLoRA hook, called after the optimizer step of ``update_index``: when
    ``merge_due`` (and not after the last update, where a merge would change nothing), merge every adapter
    and reset its moments. The generator is seeded from (seed, update_index), the same on every rank and on
    resume, so re-initialised adapters and pruning masks agree. Returns whether it merged."""
    if not merge_due(update_index, method_cfg.merge_every) or update_index + 1 >= total_steps:
        return False
    gen = torch.Generator(device=device or "cpu").manual_seed(seed * 1_000_003 + update_index)
    adapters = merge_all(model, generator=gen)
    reset_optimizer_state(optimizer, adapters, method_cfg.reset, method_cfg.reset_ratio, generator=gen)
    return True


# ----------------------------------------------------------------------------- optimizer reset

def _flatten_params(params) -> List[torch.Tensor]:
    out = []
    for p in params:
        if isinstance(p, (tuple, list)):
            out.extend(_flatten_params(p))
        else:
            out.append(p)
    return out


def _keep_mask(magnitude: torch.Tensor, kind: ResetKind, ratio: float,
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """Bool mask (same shape) of the entries that survive pruning ``ratio`` of them."""
    n = magnitude.numel()
    if kind == ResetKind.random:
        gen_device = generator.device if generator is not None else magnitude.device
        draw = torch.rand(magnitude.shape, generator=generator, device=gen_device).to(magnitude.device)
        return draw >= ratio  # each entry kept with probability 1 - ratio
    keep = int(round((1.0 - ratio) * n))
    mask = torch.zeros(n, dtype=torch.bool, device=magnitude.device)
    if keep >= n:
        mask.fill_(True)
    elif keep > 0:  # exactly `keep` entries, the largest |moment| (ties broken arbitrarily)
        mask[torch.topk(magnitude.reshape(-1).float(), keep, sorted=False).indices] = True
    return mask.view(magnitude.shape)


def _prune_dense_(t: torch.Tensor, kind: ResetKind, ratio: float, generator) -> None:
    if kind == ResetKind.zero or ratio >= 1.0:
        t.zero_()
    elif ratio > 0.0:
        t.mul_(_keep_mask(t.abs(), kind, ratio, generator))


def _prune_8bit_(codes: torch.Tensor, qmap: torch.Tensor, absmax: torch.Tensor, kind: ResetKind,
                 ratio: float, generator) -> None:
    """Prune a bitsandbytes blockwise 8-bit state in place: pruned entries get the code of exactly 0.

    The dequantized value of entry i is qmap[codes[i]] * absmax[i // BNB_BLOCKSIZE]; magnitude pruning ranks that.
    """
    zero_code = int(torch.argmin(qmap.abs()).item())
    if kind == ResetKind.zero or ratio >= 1.0:
        codes.fill_(zero_code)
        return
    if ratio <= 0.0:
        return
    flat = codes.view(-1)
    scale = absmax.reshape(-1).repeat_interleave(BNB_BLOCKSIZE)[: flat.numel()]
    magnitude = qmap[flat.long()].abs() * scale
    keep = _keep_mask(magnitude, kind, ratio, generator)
    flat.masked_fill_(~keep, zero_code)


def reset_optimizer_state(optimizer, params: Iterable, kind: ResetKind, ratio: float,
                          generator: Optional[torch.Generator] = None) -> int:
    """Reset the Adam moments of ``params`` (tensors, or (A, B) pairs as returned by ``merge_all``).

    kind zero: both moments set to 0. magnitude: each moment keeps its largest ``round((1 - ratio) * n)``
    entries by |value| (independently for the first and second moment), the rest are set to 0. random:
    each entry of each moment is kept independently with probability ``1 - ratio`` (``generator`` makes it
    reproducible). The step count (bias correction) is left alone, as in the ReLoRA reference.

    Works with any optimizer exposing ``.state[param]`` (torch AdamW, GaLoreAdamW, LayerwiseOptimizer) whose
    moments are ``exp_avg``/``exp_avg_sq``, and with bitsandbytes 8-bit Adam (``state1``/``state2``: fp32 for
    small tensors; blockwise uint8 codes + ``qmap``/``absmax`` otherwise, pruned on the dequantized values).
    Parameters without state yet are skipped. Returns the number of parameters whose state was reset.
    """
    kind = ResetKind(kind)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"reset ratio must be in [0, 1], got {ratio}")
    n_reset = 0
    for p in _flatten_params(params):
        st = optimizer.state.get(p)
        if not st:
            continue
        with torch.no_grad():
            for i, key in ((1, "exp_avg"), (2, "exp_avg_sq"), (1, "state1"), (2, "state2")):
                t = st.get(key)
                if not isinstance(t, torch.Tensor):
                    continue
                if t.dtype == torch.uint8:
                    qmap, absmax = st.get(f"qmap{i}"), st.get(f"absmax{i}")
                    if qmap is None or absmax is None or absmax.numel() * BNB_BLOCKSIZE < t.numel():
                        raise RuntimeError(f"unsupported 8-bit optimizer state layout for {key}")
                    _prune_8bit_(t, qmap, absmax, kind, ratio, generator)
                else:
                    _prune_dense_(t, kind, ratio, generator)
        n_reset += 1
    return n_reset
