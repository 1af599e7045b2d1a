"""method=lowrank: every target weight is a product W = B A (B: out x r, A: r x in), trained from scratch."""
from .base import Method, require_rank


class LowRank(Method):
    name, order = "lowrank", 1
    dense_weights = False
    keys = ("rank", "target_modules")
    low_rank_activations = True

    def check(self, cfg) -> None:
        require_rank(self, cfg)

    def swap(self, linear, path, cfg):
        from ..core.lowrank import LowRankLinear

        w = linear.weight
        return LowRankLinear(linear.in_features, linear.out_features, cfg.rank, bias=linear.bias is not None,
                             device=w.device, dtype=w.dtype)


METHOD = LowRank()
