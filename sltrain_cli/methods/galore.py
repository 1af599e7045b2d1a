"""method=galore: dense weights; the Adam moments of the target weights live in a rank-r projection of their
gradients, refreshed by an SVD every update_proj_gap steps (core/galore.py has the optimizer)."""
from dataclasses import dataclass

from . import fields
from .base import Method, linear_weights, require_rank


@dataclass
class Config(fields.Common, fields.Projection, fields.Targets, fields.Rank):
    """method=galore: the projection's rank, which weights it projects, how often it is refreshed, its scale."""


class GaLore(Method):
    name, order = "galore", 3
    Config = Config
    catalog_extras = ("update_proj_gap", "scale")
    fsdp = False  # its SVD needs whole gradients
    projects_moments = True

    def check(self, cfg) -> None:
        require_rank(self, cfg)

    def projected_params(self, model, cfg) -> list:
        return linear_weights(self, model, cfg)

    def projected_group(self, params, cfg) -> dict:
        return {"params": params, "galore": True, "rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap,
                "scale": cfg.scale}

    def projected_optimizer(self, groups, optim_cfg):
        """GaLoreAdamW, or GaLoreAdamW8bit (bitsandbytes' 8-bit blockwise moments) for optim.name=adamw8bit."""
        from ..choices import OptimName
        from ..core.galore import GaLoreAdamW, GaLoreAdamW8bit
        from ..core.optim import BNB_BLOCKSIZE, BNB_MIN_8BIT_SIZE, adam_kwargs, import_bnb

        if OptimName(optim_cfg.name) == OptimName.adamw8bit:
            import_bnb()
            return GaLoreAdamW8bit(groups, **adam_kwargs(optim_cfg), blocksize=BNB_BLOCKSIZE,
                                   min_8bit_size=BNB_MIN_8BIT_SIZE)
        return GaLoreAdamW(groups, **adam_kwargs(optim_cfg))


METHOD = GaLore()
