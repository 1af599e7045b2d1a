"""method=sparse: W = S only (SLTrain with rank 0): the sparse factor alone, on the same fixed random support."""
from .sltrain import SPARSE_KEYS, SLTrain, sparse_lowrank_layer


class Sparse(SLTrain):
    name, order = "sparse", 5
    keys = ("target_modules", *SPARSE_KEYS)

    def check(self, cfg) -> None:
        from ..errors import ConfigError

        if not cfg.delta > 0:
            raise ConfigError("method.delta", f"must be > 0 for method=sparse, got {cfg.delta}")

    def swap(self, linear, path, cfg):
        return sparse_lowrank_layer(linear, path, cfg, 0)


METHOD = Sparse()
