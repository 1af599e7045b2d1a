"""method=sltrain: W = (alpha/r) B A + S, S on a sparse support fixed at random before training (the paper)."""
from dataclasses import dataclass

from . import fields
from .base import Method


@dataclass
class Config(fields.Common, fields.Targets, fields.Sparse, fields.Alpha, fields.Rank):
    """method=sltrain: the low-rank factor (rank, alpha), the sparse factor's support, the targets, the kernel."""


class SLTrain(Method):
    name, order = "sltrain", 4
    Config = Config
    dense_weights = False
    builds_dense_weight = True

    def check(self, cfg) -> None:
        from ..errors import ConfigError

        if not (cfg.rank >= 1 or cfg.delta > 0):
            raise ConfigError("method.rank", "sltrain needs rank >= 1 or delta > 0 (use method=sparse for rank 0)")
        check_kernel(cfg)

    def swap(self, linear, path, cfg):
        return sparse_lowrank_layer(linear, path, cfg, cfg.rank)

    def card_rows(self, cfg):
        return [("rank", cfg.rank), ("delta (support density)", cfg.delta), ("alpha", cfg.alpha)]

    def describe(self, cfg) -> str:
        rank = f" r={cfg.rank}" if self.uses("rank") else ""
        return f"{self.name}{rank} delta={cfg.delta:g} ({getattr(cfg.support, 'value', cfg.support)} support)"


def check_kernel(cfg) -> None:
    from ..errors import ConfigError

    if getattr(cfg.kernel, "value", cfg.kernel) == "dense":
        raise ConfigError("method.kernel", "dense keeps W fixed, for inference only (generate and bench-infer "
                                           "take --kernel dense); train with auto, compose or factored")


def sparse_lowrank_layer(linear, path: str, cfg, rank: int):
    """A SparseLowRankLinear in place of ``linear``: its support seed is a hash of (support_seed, path), so layers
    differ and every process draws the same supports; support=top takes the largest entries of ``linear``."""
    import torch

    from ..core.convert import module_support_seed
    from ..core.sparse_lowrank import SparseLowRankLinear, _index_dtype, sample_support

    w, bias = linear.weight, linear.bias is not None
    n_in, n_out = linear.in_features, linear.out_features
    layer = SparseLowRankLinear(n_in, n_out, rank, cfg.delta, cfg.alpha, bias=bias,
                                support_seed=module_support_seed(cfg.support_seed, path),
                                index_dtype=_index_dtype(cfg.index_dtype), support=cfg.support,
                                block_size=cfg.block_size, kernel=getattr(cfg.kernel, "value", cfg.kernel),
                                device=w.device, dtype=w.dtype)
    if layer.support == "top" and layer.nnz and not w.is_meta:
        # the largest entries of the weight being replaced (meaningful after a warm start / pretrained load)
        layer.set_support(sample_support(n_out, n_in, cfg.delta, "top", reference=w))
    if bias and not w.is_meta:
        with torch.no_grad():
            layer.bias.copy_(linear.bias)
    return layer


METHOD = SLTrain()
