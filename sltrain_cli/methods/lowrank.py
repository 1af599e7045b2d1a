"""method=lowrank: every target weight is a product W = B A (B: out x r, A: r x in), trained from scratch."""
from dataclasses import dataclass

from . import fields
from .base import Method, require_rank


@dataclass
class Config(fields.Common, fields.Targets, fields.Rank):
    """method=lowrank: the rank of every product and which layers become one."""


class LowRank(Method):
    name, order = "lowrank", 1
    Config = Config
    dense_weights = False
    low_rank_activations = True

    def check(self, cfg) -> None:
        require_rank(self, cfg)

    def swap(self, linear, path, cfg):
        from ..core.lowrank import LowRankLinear

        w = linear.weight
        return LowRankLinear(linear.in_features, linear.out_features, cfg.rank, bias=linear.bias is not None,
                             device=w.device, dtype=w.dtype)


METHOD = LowRank()
