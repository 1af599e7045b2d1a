"""method=apollo: dense weights; AdamW moments of the target weights live in a random rank-r projection of their
gradients and only scale the raw gradient, channel-wise or tensor-wise (core/apollo.py has the optimizer).
APOLLO-Mini is ``method=apollo method.rank=1 method.scale_type=tensor method.scale=128``."""
from dataclasses import dataclass

from . import fields
from .base import Method, linear_weights, require_32bit_moments


@dataclass
class Config(fields.Common, fields.Projection, fields.Targets, fields.Rank):
    """method=apollo: the projection's rank, how the scaling is shared, its scale, how often P is redrawn."""

    scale_type: str = fields.option("channel", "apollo: gradient scaling per channel (row or column) or one factor "
                                               "per tensor (channel | tensor; APOLLO-Mini: tensor)",
                                    lambda v: v in ("channel", "tensor"), "must be channel or tensor")


class APOLLO(Method):
    name, order = "apollo", 6
    Config = Config
    catalog_extras = ("scale_type", "scale", "update_proj_gap")
    fsdp = False  # the projection and its channel norms need whole gradients
    projects_moments = True
    state_scalars = 1  # the norm-growth limiter's last update norm

    def check(self, cfg) -> None:
        from ..errors import ConfigError

        if cfg.rank < 1:
            raise ConfigError("method.rank", f"must be >= 1 for method=apollo (APOLLO-Mini: 1), got {cfg.rank}")

    def check_run(self, run_cfg) -> None:
        from ..errors import ConfigError

        require_32bit_moments(self, run_cfg)
        if run_cfg.train.layerwise:
            raise ConfigError("train.layerwise", "method=apollo seeds each projection by the parameter's place in "
                                                 "one optimizer; layer-wise updates would change them (use false)")

    def projected_params(self, model, cfg) -> list:
        return linear_weights(self, model, cfg)

    def projected_group(self, params, cfg) -> dict:
        return {"params": params, "apollo": True, "rank": cfg.rank, "scale_type": cfg.scale_type,
                "scale": cfg.scale, "update_proj_gap": cfg.update_proj_gap}

    def projected_optimizer(self, groups, optim_cfg):
        from ..core.apollo import APOLLOAdamW
        from ..core.optim import adam_kwargs

        return APOLLOAdamW(groups, **adam_kwargs(optim_cfg))

    def card_rows(self, cfg):
        return [("rank", cfg.rank), ("scale type", cfg.scale_type), ("scale", cfg.scale)]


METHOD = APOLLO()
