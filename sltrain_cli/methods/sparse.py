"""method=sparse: W = S only (SLTrain with rank 0): the sparse factor alone, on the same fixed random support."""
from .base import Method
from .sltrain import SPARSE_KEYS, SLTrain, sparse_lowrank_layer


class Sparse(Method):
    name, order = "sparse", 5
    dense_weights = False
    keys = ("target_modules", *SPARSE_KEYS)
    builds_dense_weight = True

    def check(self, cfg) -> None:
        from ..errors import ConfigError

        if not cfg.delta > 0:
            raise ConfigError("method.delta", f"must be > 0 for method=sparse, got {cfg.delta}")

    def swap(self, linear, path, cfg):
        return sparse_lowrank_layer(linear, path, cfg, 0)

    card_rows = SLTrain.card_rows
    describe = SLTrain.describe


METHOD = Sparse()
