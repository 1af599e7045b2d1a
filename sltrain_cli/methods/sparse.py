"""method=sparse: W = S only (SLTrain with rank 0): the sparse factor alone, on the same fixed random support."""
from dataclasses import dataclass

from . import fields
from .sltrain import SLTrain, check_kernel, sparse_lowrank_layer


@dataclass
class Config(fields.Common, fields.Targets, fields.Sparse):
    """method=sparse: the sparse factor's support and the targets (no rank, no alpha)."""


class Sparse(SLTrain):
    name, order = "sparse", 5
    Config = Config

    def check(self, cfg) -> None:
        from ..errors import ConfigError

        if not cfg.delta > 0:
            raise ConfigError("method.delta", f"must be > 0 for method=sparse, got {cfg.delta}")
        check_kernel(cfg)

    def swap(self, linear, path, cfg):
        return sparse_lowrank_layer(linear, path, cfg, 0)


METHOD = Sparse()
