"""Optimizers and learning-rate schedules: AdamW, 8-bit AdamW, GaLore, and layer-wise (in-backward) updates.

``build_optimizer`` turns an ``OptimConfig`` + ``MethodConfig`` into one optimizer over the trainable
parameters; ``build_scheduler`` wraps it in a ``LambdaLR`` whose factor is ``lr_factor`` (warmup, then
cosine / linear / constant) or ReLoRA's jagged ``relora_lr_factor``. Step indices are 0-based: factor(s)
is the one used by update s (LambdaLR applies factor(0) at construction; call ``scheduler.step()`` after
every ``optimizer.step()``).

Layer-wise updates (``train.layerwise``, the paper's memory extension) give every trainable parameter its
own optimizer and step it from a ``post_accumulate_grad`` hook inside backward, freeing its gradient at
once, so the gradients of the whole model never exist together. The loop then looks like::

    lw = LayerwiseOptimizer(model, optim_cfg, method_cfg, total_steps)   # sets lr for update 0
    for step in range(start, total_steps):
        lw.zero_grad()
        for i, micro in enumerate(micro_batches):
            lw.sync(i == len(micro_batches) - 1)   # hooks step only on the last micro-batch
            (loss(micro) / len(micro_batches)).backward()   # last one: params updated, grads freed
        lw.step_scheduler()                       # lr for the next update

Global-norm clipping needs all gradients at once, so it is refused with layer-wise updates.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from sltrain_cli.configs import MethodConfig, OptimConfig, OptimName, Schedule, UserError
from sltrain_cli.methods import get_method

BNB_MISSING = "optim.name=adamw8bit needs bitsandbytes: pip install 'sltrain[bnb]'"
# bitsandbytes 0.50 AdamW8bit state layout (optim/optimizer.py, Optimizer2State.init_state): a tensor with
# fewer than min_8bit_size = 4096 entries keeps two fp32 moments; a larger one keeps two uint8 moments,
# blockwise quantized with one fp32 absmax per 256 entries (blocksize 256). Used by memory.py's estimate
# by core/relora.py's 8-bit moment pruning and by GaLoreAdamW8bit (the same layout for its projected moments).
BNB_BLOCKSIZE = 256
BNB_MIN_8BIT_SIZE = 4096


# ----------------------------------------------------------------------------- schedules

def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float, schedule) -> float:
    """Multiplier of the peak lr for the 0-based update ``step``.

    Linear warmup step / warmup_steps (0 at step 0, as the GaLore/HF harness), then over
    [warmup_steps, total_steps]: cosine or linear decay from 1 to ``min_lr_ratio`` (reached at
    ``total_steps``, held after), or constant 1.
    """
    schedule = Schedule(schedule)
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == Schedule.constant:
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == Schedule.cosine:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def relora_lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float, merge_every: int,
                     restart_warmup: int) -> float:
    """The ReLoRA "jagged" cosine: the global warmup + cosine of ``core.optim.lr_factor``, except that for
    the ``restart_warmup`` updates from each merge (update index k * merge_every, k >= 1) the factor ramps
    linearly from 0 to the cosine value at the end of that re-warmup (ReLoRA's reference schedule).
    ``step`` is the 0-based update index.
    """
    def base(s: int) -> float:
        return lr_factor(s, total_steps, warmup_steps, min_lr_ratio, "cosine")

    if step < warmup_steps or step < merge_every or restart_warmup <= 0:
        return base(step)
    since = step % merge_every
    if since < restart_warmup:
        return since / restart_warmup * base(step - since + restart_warmup)
    return base(step)


def warmup_steps(optim_cfg: OptimConfig, total_steps: int) -> int:
    """optim.warmup_steps when set, else int(optim.warmup_ratio * total_steps)."""
    if optim_cfg.warmup_steps is not None:
        return int(optim_cfg.warmup_steps)
    return int(optim_cfg.warmup_ratio * total_steps)


def schedule_fn(optim_cfg: OptimConfig, method_cfg: MethodConfig, total_steps: int) -> Callable[[int], float]:
    """step -> lr factor for this run: the method's own schedule (ReLoRA's jagged cosine), else ``lr_factor``."""
    warm = warmup_steps(optim_cfg, total_steps)
    min_ratio, sched = optim_cfg.min_lr_ratio, Schedule(optim_cfg.schedule)
    own = get_method(method_cfg.name).schedule(method_cfg, total_steps, warm, min_ratio)
    return own if own is not None else (lambda s: lr_factor(s, total_steps, warm, min_ratio, sched))


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, method_cfg: MethodConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over ``schedule_fn``; its state_dict holds only numbers (the lambda is not saved)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_fn(optim_cfg, method_cfg, total_steps))


# ----------------------------------------------------------------------------- optimizers

def import_bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise UserError(BNB_MISSING) from e
    except Exception as e:  # a broken install (e.g. a CUDA library mismatch) fails at import, not ImportError
        raise UserError(f"{BNB_MISSING} (import failed: {e})") from e
    return bnb


def adam_kwargs(optim_cfg: OptimConfig) -> dict:
    return dict(lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
                weight_decay=optim_cfg.weight_decay)


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig, method_cfg: MethodConfig) -> torch.optim.Optimizer:
    """One optimizer over the trainable parameters of ``model``.

    A method with projected parameters (``Method.projected_params``: GaLore, APOLLO): the method's own optimizer
    (``projected_optimizer``) with its projected group for those weights and a plain group for the rest. Otherwise
    optim.name=adamw8bit: bitsandbytes AdamW8bit; adamw: torch AdamW.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    kw = adam_kwargs(optim_cfg)
    method = get_method(method_cfg.name)
    targets = method.projected_params(model, method_cfg)
    if targets:
        ids = {id(p) for p in targets}
        others = [p for p in params if id(p) not in ids]
        groups = ([{"params": others}] if others else []) + [method.projected_group(targets, method_cfg)]
        return method.projected_optimizer(groups, optim_cfg)
    if OptimName(optim_cfg.name) == OptimName.adamw8bit:
        return import_bnb().optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


# ----------------------------------------------------------------------------- layer-wise updates

def check_layerwise(optim_cfg: OptimConfig, world_size: int = 1) -> None:
    """Refuse settings layer-wise updates cannot honour (they would silently change the training)."""
    if optim_cfg.grad_clip > 0:
        raise UserError(f"optim.grad_clip={optim_cfg.grad_clip} needs the global gradient norm, which "
                        "train.layerwise=true never has; set optim.grad_clip=0 or train.layerwise=false")
    if world_size > 1:
        raise UserError("train.layerwise=true is single-process only: with DDP/FSDP the in-backward steps "
                        "would use gradients before they are reduced across ranks")


class LayerwiseOptimizer:
    """One optimizer per trainable parameter (the kind ``build_optimizer`` would use for it), stepped by a
    ``post_accumulate_grad`` hook as soon as that parameter's gradient is complete; the gradient is then
    freed. ``sync(False)`` makes the hooks let gradients accumulate (non-last micro-batches).

    Not a ``torch.optim.Optimizer``: the lr schedule is applied by ``step_scheduler()`` /
    ``set_lr_factor()``, and ``state_dict()`` holds the per-parameter optimizer states in parameter order
    plus the schedule position (only tensors and numbers: ``torch.load(weights_only=True)`` works).
    """

    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, method_cfg: MethodConfig,
                 total_steps: Optional[int] = None, world_size: int = 1):
        check_layerwise(optim_cfg, world_size)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise UserError("the model has no trainable parameters")
        kw = adam_kwargs(optim_cfg)
        self.base_lr = optim_cfg.lr
        method = get_method(method_cfg.name)
        projected = {id(p) for p in method.projected_params(model, method_cfg)}
        eight_bit = OptimName(optim_cfg.name) == OptimName.adamw8bit
        bnb = import_bnb() if eight_bit else None
        self.optimizers: List[torch.optim.Optimizer] = []
        self._by_param: Dict[int, torch.optim.Optimizer] = {}
        for p in self.params:
            if id(p) in projected:
                opt = method.projected_optimizer([method.projected_group([p], method_cfg)], optim_cfg)
            elif projected:  # the same update as the plain group of build_optimizer's projecting optimizer
                opt = method.projected_optimizer([p], optim_cfg)
            elif eight_bit:
                opt = bnb.optim.AdamW8bit([p], **kw)
            else:
                opt = torch.optim.AdamW([p], **kw)
            self.optimizers.append(opt)
            self._by_param[id(p)] = opt
        self._sync = True
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]
        self._schedule = schedule_fn(optim_cfg, method_cfg, total_steps) if total_steps is not None else None
        self.last_step = 0  # index of the next update; the schedule factor applied is schedule(last_step)
        if self._schedule is not None:
            self.set_lr_factor(self._schedule(0))

    def _hook(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        opt = self._by_param[id(p)]
        opt.step()
        p.grad = None

    def sync(self, step_now: bool = True) -> None:
        """Whether the next backward updates the parameters (True: last micro-batch) or only accumulates."""
        self._sync = bool(step_now)

    def set_lr_factor(self, factor: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = self.base_lr * factor

    def step_scheduler(self) -> None:
        """Advance the schedule by one update (call after each optimizer step, like ``scheduler.step()``)."""
        if self._schedule is None:
            raise RuntimeError("LayerwiseOptimizer was built without total_steps; use set_lr_factor()")
        self.last_step += 1
        self.set_lr_factor(self._schedule(self.last_step))

    def current_lr(self) -> float:
        """The lr the next update will use (every parameter shares it)."""
        return self.optimizers[0].param_groups[0]["lr"]

    def get_last_lr(self) -> List[float]:
        return [self.current_lr()]

    @property
    def param_groups(self) -> List[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> Dict[torch.Tensor, dict]:
        """param -> its optimizer state (the live dicts, so in-place edits such as ReLoRA resets apply)."""
        out = {}
        for p, opt in zip(self.params, self.optimizers):
            if p in opt.state:
                out[p] = opt.state[p]
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop any leftover gradients (normally none: the hooks free them)."""
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        opts = state_dict["optimizers"]
        if len(opts) != len(self.optimizers):
            raise ValueError(f"layer-wise state has {len(opts)} optimizers, this model needs {len(self.optimizers)}")
        for opt, sd in zip(self.optimizers, opts):
            opt.load_state_dict(sd)
        self.last_step = int(state_dict["last_step"])
        if self._schedule is not None:
            self.set_lr_factor(self._schedule(self.last_step))

    def remove(self) -> None:
        """Unregister the hooks (the parameters then get ordinary gradients again)."""
        for h in self._handles:
            h.remove()
        self._handles = []


# ----------------------------------------------------------------------------- measurement

def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer state (moments, projectors, 8-bit codes/scales/maps, and the
    scalar ``step`` tensors torch AdamW keeps); Python ints/floats (GaLoreAdamW's and bitsandbytes' step) and
    param_groups are not counted. A tensor shared between parameters (bitsandbytes' qmap) counts once.
    Accepts a torch optimizer or a LayerwiseOptimizer.
    """
    opts = optimizer.optimizers if isinstance(optimizer, LayerwiseOptimizer) else [optimizer]
    seen: set = set()
    total = 0
    for opt in opts:
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    key: Tuple = (v.device, v.data_ptr(), v.numel(), v.dtype) if v.numel() else (id(v),)
                    if key not in seen:
                        seen.add(key)
                        total += v.numel() * v.element_size()
    return total
