"""Method swapping: turn a dense LlamaForCausalLM into the model a method trains, and count its parameters.

``apply_method(model, method_cfg)`` replaces every ``nn.Linear`` whose attribute name is in
``method.target_modules`` (default q, k, v, o, gate, up, down; never the lm_head or the embeddings):

    full, galore  nothing (dense weights; GaLore works inside the optimizer)
    lowrank       LowRankLinear(rank)                          W = B A
    sltrain       SparseLowRankLinear(rank, delta, alpha)      W = (alpha/r) B A + S
    sparse        SparseLowRankLinear(rank=0, delta)           W = S
    relora        ReLoRALinear(rank, alpha), frozen W0 = the current dense weight (so a warm start carries over)

Every sparse layer gets its own support seed, a hash of (method.support_seed, module path): layers differ from one
another, and the same support_seed gives the same supports in every process (how DDP ranks agree).
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.nn as nn

from ..configs import ConfigError, MethodConfig, MethodName, ModelConfig
from .lowrank import LowRankLinear
from .sparse_lowrank import SparseLowRankLinear, _index_dtype, sample_support


def module_support_seed(support_seed: int, module_path: str) -> int:
    """A 63-bit seed from the run's support_seed and a module path such as ``layers.3.mlp.up`` (stable across
    processes and Python runs, unlike ``hash``)."""
    digest = hashlib.sha256(f"{support_seed}/{module_path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def _targets(model: nn.Module, names) -> list:
    """(parent, attribute, path, linear) for every plain nn.Linear child whose attribute name is targeted."""
    found = []
    for path, parent in model.named_modules():
        for attr, child in parent.named_children():
            if attr in names and type(child) is nn.Linear:
                found.append((parent, attr, f"{path}.{attr}" if path else attr, child))
    return found


def _swap(linear: nn.Linear, path: str, method: MethodName, cfg: MethodConfig) -> nn.Module:
    w = linear.weight
    factory = {"device": w.device, "dtype": w.dtype}
    bias = linear.bias is not None
    n_in, n_out = linear.in_features, linear.out_features
    if method == MethodName.lowrank:
        return LowRankLinear(n_in, n_out, cfg.rank, bias=bias, **factory)
    if method in (MethodName.sltrain, MethodName.sparse):
        rank = 0 if method == MethodName.sparse else cfg.rank
        layer = SparseLowRankLinear(n_in, n_out, rank, cfg.delta, cfg.alpha, bias=bias,
                                    support_seed=module_support_seed(cfg.support_seed, path),
                                    index_dtype=_index_dtype(cfg.index_dtype), support=cfg.support,
                                    block_size=cfg.block_size, kernel=cfg.kernel.value, **factory)
        if layer.support == "top" and layer.nnz and not w.is_meta:
            # the largest entries of the weight being replaced (meaningful after a warm start / pretrained load)
            layer.set_support(sample_support(n_out, n_in, cfg.delta, "top", reference=w))
    elif method == MethodName.relora:
        from .relora import ReLoRALinear  # another module's layer; imported only when used

        with torch.device(w.device):
            layer = ReLoRALinear(n_in, n_out, cfg.rank, cfg.alpha, bias=bias)
        if layer.weight.dtype != w.dtype:  # a no-op .to() still walks every tensor
            layer.to(w.dtype)
        if not w.is_meta:
            with torch.no_grad():
                layer.weight.copy_(w)
                if bias:
                    layer.bias.copy_(linear.bias)
        return layer
    else:
        raise ValueError(f"apply_method: unknown method {method!r}")
    if bias and not w.is_meta:
        with torch.no_grad():
            layer.bias.copy_(linear.bias)
    return layer


def method_rank_limit(model_cfg: ModelConfig, method_cfg: MethodConfig) -> Optional[int]:
    """The largest rank the method can use on this model's target layers (None when it uses no rank)."""
    method = MethodName(getattr(method_cfg.name, "value", method_cfg.name))
    if method not in (MethodName.lowrank, MethodName.relora, MethodName.galore, MethodName.sltrain):
        return None
    d, m = model_cfg.hidden_size, model_cfg.intermediate_size
    sides = {"q": d, "k": d, "v": d, "o": d, "gate": min(d, m), "up": min(d, m), "down": min(d, m)}
    return min(sides[t] for t in method_cfg.target_modules) if method_cfg.target_modules else None


def check_method_fits(model_cfg: ModelConfig, method_cfg: MethodConfig) -> None:
    """A rank above the smallest side of a target layer is a ConfigError (before any model is built)."""
    limit = method_rank_limit(model_cfg, method_cfg)
    if limit is not None and method_cfg.rank > limit:
        raise ConfigError("method.rank", f"{method_cfg.rank} exceeds the smallest target layer dimension {limit} "
                                         f"of model {model_cfg.name}")


def apply_method(model: nn.Module, method_cfg: MethodConfig) -> nn.Module:
    """Swap the targeted nn.Linear modules in place for the method's layer; returns the model."""
    method = MethodName(getattr(method_cfg.name, "value", method_cfg.name))
    if method in (MethodName.full, MethodName.galore):
        return model
    for parent, attr, path, linear in _targets(model, set(method_cfg.target_modules)):
        setattr(parent, attr, _swap(linear, path, method, method_cfg))
    return model


def count_parameters(model: nn.Module) -> dict:
    """Numbers of stored values by kind (works on the meta device).

    dense: ordinary weights (embeddings, norms, lm_head, untouched or frozen linears); lowrank: A and B factors;
    sparse_values: the values of sparse supports; indices: index entries of those supports (a buffer);
    total = dense + lowrank + sparse_values (the paper's convention: indices excluded); trainable: requires_grad.
    """
    counts = dict(dense=0, lowrank=0, sparse_values=0, indices=0, total=0, trainable=0)
    seen = set()
    for module in model.modules():
        plain = type(module) in (nn.Linear, nn.Embedding)
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            kind = ("lowrank" if name in ("A", "B") and not plain else
                    "sparse_values" if name == "values" and not plain else "dense")
            counts[kind] += p.numel()
            if p.requires_grad:
                counts["trainable"] += p.numel()
        for name, b in module.named_buffers(recurse=False):
            if name == "indices" and b is not None:
                counts["indices"] += b.numel()
    counts["total"] = counts["dense"] + counts["lowrank"] + counts["sparse_values"]
    return counts
