"""Method swapping: turn a dense LlamaForCausalLM into the model a method trains, and count its parameters.

``apply_method(model, method_cfg)`` replaces every ``nn.Linear`` whose attribute name is in
``method.target_modules`` (default q, k, v, o, gate, up, down; never the lm_head or the embeddings) by the layer
the method's ``swap`` builds (sltrain_cli/methods/NAME.py); a method that trains dense weights builds none.

Every sparse layer gets its own support seed, a hash of (method.support_seed, module path): layers differ from one
another, and the same support_seed gives the same supports in every process (how DDP ranks agree).
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch.nn as nn

from ..configs import ConfigError, MethodConfig, ModelConfig
from ..methods import get_method


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


def method_rank_limit(model_cfg: ModelConfig, method_cfg: MethodConfig) -> Optional[int]:
    """The largest rank the method can use on this model's target layers (None when it uses no rank)."""
    if not get_method(method_cfg.name).uses("rank"):
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
    """Swap the targeted nn.Linear modules in place for the method's layer (``Method.swap``; a method that keeps
    dense weights swaps nothing); returns the model."""
    method = get_method(method_cfg.name)
    for parent, attr, path, linear in _targets(model, set(method_cfg.target_modules)):
        layer = method.swap(linear, path, method_cfg)
        if layer is not None:
            setattr(parent, attr, layer)
    return model


def stored_tensors(model: nn.Module):
    """(path, tensor, kind) of every value the model stores, each parameter once (works on the meta device).

    kind: dense (embeddings, norms, lm_head, untouched or frozen linears), lowrank (A and B factors), sparse_values
    (the values of sparse supports) or indices (the index entries of those supports: a buffer)."""
    seen = set()
    for path, module in model.named_modules():
        plain = type(module) in (nn.Linear, nn.Embedding)
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield f"{path}.{name}", p, ("lowrank" if name in ("A", "B") and not plain else
                                            "sparse_values" if name == "values" and not plain else "dense")
        for name, b in module.named_buffers(recurse=False):
            if name == "indices" and b is not None:
                yield f"{path}.{name}", b, "indices"


def count_parameters(model: nn.Module) -> dict:
    """Numbers of stored values by kind (``stored_tensors``); total = dense + lowrank + sparse_values (the
    paper's convention: indices excluded); trainable: requires_grad."""
    counts = dict(dense=0, lowrank=0, sparse_values=0, indices=0, total=0, trainable=0)
    for _, t, kind in stored_tensors(model):
        counts[kind] += t.numel()
        if kind != "indices" and t.requires_grad:
            counts["trainable"] += t.numel()
    counts["total"] = counts["dense"] + counts["lowrank"] + counts["sparse_values"]
    return counts
